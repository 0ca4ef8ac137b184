"""How the torch engines run one job: params decoded strictly, blocking work in a thread.

torch blocks, so the work runs in a worker thread. What it produces on the way (text chunks, progress)
crosses to the event loop through a queue and is awaited there in order, so streaming never blocks the
loop. A cancel request, or a caller that stops waiting, sets `halt`, which the work checks between steps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from worker.engines.base import EngineError

T = TypeVar("T")
R = TypeVar("R")

#: What the thread runs: `work(send, halt)`, where `send` hands one item (never None) to the loop.
Work = Callable[[Callable[[T], None], threading.Event], R]


def parse_params(params: dict[str, Any], kind: type[T]) -> T:
    """The job's params as `kind`; a mismatch is `bad_params` naming the field."""
    try:
        return msgspec.convert(params, kind)
    except msgspec.ValidationError as exc:
        raise EngineError("bad_params", str(exc)) from None


async def run_in_thread(
    work: Work[T, R], on_item: Callable[[T], Awaitable[None]], cancelled: asyncio.Event
) -> R:
    """Run `work` in a thread, awaiting `on_item` for each item it sends; `cancelled` halts it."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[T | None] = asyncio.Queue()
    halt = threading.Event()

    def send(item: T) -> None:
        loop.call_soon_threadsafe(items.put_nowait, item)

    def body() -> R:
        try:
            return work(send, halt)
        finally:
            loop.call_soon_threadsafe(items.put_nowait, None)

    async def relay_cancel() -> None:
        await cancelled.wait()
        halt.set()

    watcher = asyncio.create_task(relay_cancel())
    done = asyncio.ensure_future(asyncio.to_thread(body))
    try:
        while (item := await items.get()) is not None:
            await on_item(item)
        result = await done
    finally:
        # Whatever ended the wait (the work, an error in `on_item`, the task being cancelled),
        # the thread must not keep the device busy for nobody.
        halt.set()
        watcher.cancel()
    if cancelled.is_set():
        raise EngineError("cancelled", "the job was cancelled")
    return result

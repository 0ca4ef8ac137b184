"""How the torch engines run one job: params decoded strictly, blocking work in a thread.

torch blocks, so the work runs in a worker thread. What it produces on the way (text chunks, progress)
crosses to the event loop through a queue and is awaited there in order, so streaming never blocks the
loop. A cancel request, or a caller that stops waiting, sets `halt`, which the work checks between steps.

Device failures become errors with a code: running out of GPU memory is `gpu_out_of_memory`, reported
once the failed work's tensors are gone and torch's cache is emptied (the worker stays healthy); a CUDA
error that poisons the process is `DeviceLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
import torch

from worker.engines.base import BaseEngine, DeviceLost, EngineError

logger = logging.getLogger(__name__)

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


#: Starts work elsewhere: `start(send, finish, halt)`; the work calls `finish(result, error)` once.
Start = Callable[[Callable[[T], None], Callable[[Any, BaseException | None], None], threading.Event], None]

#: Inference threads of their own: asyncio's default pool serves heartbeats and telemetry, which a pool
#: full of minute-long jobs would starve until the platform declares the worker lost.
_INFERENCE = ThreadPoolExecutor(max_workers=256, thread_name_prefix="inference")


class InFlight:
    """Work still running on a loaded model; unloading waits for it, so a job cut off after its grace
    period never runs on a model that is gone (its thread ends at the next step, `halt` being set)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._idle:
            self._count += 1
        try:
            yield
        finally:
            with self._idle:
                self._count -= 1
                self._idle.notify_all()

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._count == 0)


async def run_in_thread(
    work: Work[T, R], on_item: Callable[[T], Awaitable[None]], cancelled: asyncio.Event, inflight: InFlight
) -> R:
    """Run `work` in an inference thread, awaiting `on_item` for each item it sends; `cancelled` halts it."""

    def start(send: Callable[[T], None], finish: Callable[[Any, BaseException | None], None], halt: threading.Event) -> None:
        def body() -> None:
            with inflight.running():
                try:
                    result = on_device(work, send, halt)
                except BaseException as exc:
                    finish(None, exc)
                else:
                    finish(result, None)

        _INFERENCE.submit(body)

    return await relay(start, on_item, cancelled)


async def relay(start: Start[T], on_item: Callable[[T], Awaitable[None]], cancelled: asyncio.Event) -> Any:
    """Start work outside the loop and await `on_item` for each item it sends, in order, then its result."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[T | None] = asyncio.Queue()
    outcome: asyncio.Future[Any] = loop.create_future()
    halt = threading.Event()

    def send(item: T) -> None:
        deliver(loop, items.put_nowait, item)

    def settle(result: Any, error: BaseException | None) -> None:
        if not outcome.done():
            outcome.set_exception(error) if error is not None else outcome.set_result(result)
        items.put_nowait(None)

    def finish(result: Any, error: BaseException | None) -> None:
        deliver(loop, settle, result, error)

    async def relay_cancel() -> None:
        await cancelled.wait()
        halt.set()

    watcher = asyncio.create_task(relay_cancel())
    try:
        start(send, finish, halt)
        while (item := await items.get()) is not None:
            await on_item(item)
        result = await outcome
    finally:
        # Whatever ended the wait (the work, an error in `on_item`, the task being cancelled),
        # the work must not keep the device busy for nobody.
        halt.set()
        watcher.cancel()
        outcome.add_done_callback(_retrieve)
    if cancelled.is_set():
        raise EngineError("cancelled", "the job was cancelled")
    return result


class _Outbox(threading.local):
    """Calls a thread collects for event loops while it delivers together (see `delivered_together`)."""

    calls: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., None], tuple[Any, ...]]]] | None = None


_outbox = _Outbox()


def deliver(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """`callback(*args)` in `loop`, from another thread; held until the end of `delivered_together` if
    this thread is in one."""
    if _outbox.calls is None:
        loop.call_soon_threadsafe(callback, *args)
    else:
        _outbox.calls.setdefault(loop, []).append((callback, args))


@contextlib.contextmanager
def delivered_together() -> Iterator[None]:
    """Within it, this thread's `deliver` calls reach each loop at the end as one wake-up, in order: a
    decode step that gives 16 jobs a token each wakes the loop once, not 16 times (each wake-up is a
    write to the loop's self-pipe, and a handle the loop runs while the step competes for the GIL)."""
    _outbox.calls = {}
    try:
        yield
    finally:
        calls, _outbox.calls = _outbox.calls, None
        for loop, pending in calls.items():
            loop.call_soon_threadsafe(_run_all, pending)


def _run_all(calls: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
    for callback, args in calls:
        try:
            callback(*args)
        except Exception:
            # As the loop does for a call of its own that fails: the others still run.
            logger.exception("a call delivered from a worker thread failed")


def _retrieve(outcome: asyncio.Future[Any]) -> None:
    # Nobody awaits an outcome whose waiter was cancelled: read its error so asyncio does not log it.
    if not outcome.cancelled():
        outcome.exception()


class TorchEngine(BaseEngine):
    """What the torch engines share: memory given back after a failure."""

    def release_memory(self) -> None:
        free_cached_memory()


def on_device(work: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`work(*args, **kwargs)`, with a CUDA failure turned into an error that carries no tensors."""
    try:
        return work(*args, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        failure: EngineError = EngineError("gpu_out_of_memory", f"the GPU ran out of memory: {first_line(exc)}")
    except RuntimeError as exc:
        if "CUDA error" not in str(exc) and type(exc).__name__ != "AcceleratorError":
            raise
        failure = DeviceLost("gpu_device_error", f"the GPU failed: {first_line(exc)}")
    # Out of the handler the failed work's frames, and the tensors they hold, can go.
    free_cached_memory()
    raise failure


def free_cached_memory() -> None:
    """Collect unreachable tensors and hand torch's cached blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type when it has none), for one-line reports."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

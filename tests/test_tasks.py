"""Stopping a background loop ends it even when a cancel is lost on the way (Python 3.11's wait_for)."""

from __future__ import annotations

import asyncio

from sdk.tasks import cancel_and_wait


async def test_a_loop_that_lost_its_cancel_still_stops() -> None:
    ticks = 0

    async def loop() -> None:
        nonlocal ticks
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                # What wait_for does on 3.11 when the reply lands with the cancel (bpo-42130).
                if swallowed:
                    raise
                swallowed = True
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            ticks += 1

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(cancel_and_wait(task), timeout=5)
    assert task.cancelled()
    stopped_at = ticks
    await asyncio.sleep(0.05)
    assert ticks == stopped_at


async def test_finished_failed_and_absent_tasks_are_waited_without_raising() -> None:
    async def fail() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fail())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    await cancel_and_wait(failed, done, None)
    assert isinstance(failed.exception(), ValueError) and done.done()

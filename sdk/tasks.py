"""Stopping background tasks for sure.

On Python 3.11, `asyncio.wait_for` (under every nats-py request) swallows a cancel that arrives as its
future completes (cpython bpo-42130, fixed in 3.12). A loop whose one cancel was swallowed that way runs
on, and a stop that awaits it waits forever: so the cancel is repeated until the task has ended.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: How long a cancelled task may take to end before it is cancelled again.
CANCEL_RETRY_S = 0.5


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` (None and finished ones are skipped) and return once every one has ended; what they
    raised is retrieved, not raised."""
    running = {task for task in tasks if task is not None}
    pending = {task for task in running if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)
    await asyncio.gather(*running, return_exceptions=True)

"""Rebuilding the read models from the streams (DESIGN, invariant 5): the proof that they are derived.

The rebuild folds through the same `Store.apply_batch` as the live service, into a temporary file next
to the database, and swaps it in with one rename; a failed rebuild leaves the old database as it was.
Stop the projections service that uses `db_path` first: it would keep writing to the replaced file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from nats.js import JetStreamContext

from projections.feed import FOLDED_STREAMS, QUEUE_SIZE, Delivered, follow, next_batch
from projections.store import Store
from sdk import subjects
from sdk.connection import connect
from sdk.errors import Unavailable
from sdk.log import ensure_streams

logger = logging.getLogger(__name__)

#: A stream that delivers nothing for this long before its target sequence is not being read.
REPLAY_IDLE_S = 10.0


async def rebuild(
    nats_url: str, db_path: Path, until_seq: int | None = None, *, until: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Refold `db_path` from the streams as they are now, or a past state: JOBS up to `until_seq`, or
    each stream up to its position in `until` (e.g. another copy's positions, to compare the two).

    Returns the position reached in each stream.
    """
    nc = await connect(nats_url, name="projections-replay")
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        # Read the targets first, so the replay ends by itself even while events keep arriving.
        targets = {stream: await _last_seq(js, stream) for stream in FOLDED_STREAMS}
        limits = {**(until or {}), **({subjects.JOBS_STREAM: until_seq} if until_seq is not None else {})}
        for stream, limit in limits.items():
            targets[stream] = min(targets[stream], limit)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{db_path.name}.", suffix=".rebuild", dir=db_path.parent)
        os.close(fd)
        scratch = Path(name)
        try:
            store = await Store.open(scratch)
            try:
                for stream, last_seq in targets.items():
                    await _replay(js, store, stream, last_seq)
                positions = dict(store.positions)
            finally:
                await store.close()
            # A write-ahead log left by the old database must not be read as part of the new one.
            for suffix in ("-wal", "-shm"):
                Path(f"{db_path}{suffix}").unlink(missing_ok=True)
            os.replace(scratch, db_path)
        finally:
            scratch.unlink(missing_ok=True)
    finally:
        await nc.close()
    logger.info("rebuilt %s at %s", db_path, positions)
    return positions


async def _last_seq(js: JetStreamContext, stream: str) -> int:
    state = (await js.stream_info(stream)).state
    return state.last_seq if state.messages else 0


async def _replay(js: JetStreamContext, store: Store, stream: str, last_seq: int) -> None:
    """Fold `stream` from its first message up to and including `last_seq`."""
    if last_seq == 0:
        return
    queue: asyncio.Queue[Delivered] = asyncio.Queue(QUEUE_SIZE)
    sub = await follow(js, stream, 0, queue)
    try:
        while True:
            try:
                batch = await asyncio.wait_for(next_batch(queue), REPLAY_IDLE_S)
            except TimeoutError:
                raise Unavailable(
                    f"{stream} delivered nothing for {REPLAY_IDLE_S:g}s at #{store.positions.get(stream, 0)} "
                    f"of #{last_seq}"
                ) from None
            wanted = [d for d in batch if d.seq <= last_seq]
            await store.apply_batch(wanted)
            # Done at the target, or earlier when the stream has nothing more (messages aged out).
            if len(wanted) < len(batch) or wanted[-1].seq == last_seq or wanted[-1].pending == 0:
                break
    finally:
        await sub.unsubscribe()
    logger.info("replayed %s up to #%d", stream, store.positions.get(stream, 0))

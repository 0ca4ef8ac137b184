"""Rebuilding the read models from the streams (DESIGN, invariant 5): the proof that they are derived.

The rebuild reads the streams here and folds them through the same `Store.apply_batch` as the live
service in a second process (`projections.refold`, so reading and folding run side by side), into a
temporary file next to the database, and swaps it in with one rename; a failed rebuild leaves the old database as it was.
Stop the projections service that uses `db_path` first: it would keep writing to the replaced file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from nats.aio.client import Client as NatsClient

from projections.feed import FOLDED_STREAMS, log_ends
from projections.refold import frame
from projections.retention import load_snapshots
from projections.store import Store
from sdk import subjects
from sdk.connection import connect
from sdk.log import ensure_streams
from sdk.stream_reader import read_stream

logger = logging.getLogger(__name__)

#: A stream that sends nothing for this long before its target sequence is not being read.
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
        targets = await log_ends(js)
        limits = {**(until or {}), **({subjects.JOBS_STREAM: until_seq} if until_seq is not None else {})}
        for stream, limit in limits.items():
            targets[stream] = min(targets[stream], limit)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{db_path.name}.", suffix=".rebuild", dir=db_path.parent)
        os.close(fd)
        scratch = Path(name)
        try:
            # Jobs that retention took out of the log start as their archived rows.
            store = await Store.open(scratch)
            try:
                await load_snapshots(js, store, until_jobs_seq=targets[subjects.JOBS_STREAM])
            finally:
                await store.close()
            positions = await _fold_in_child(nc, scratch, targets)
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


async def _fold_in_child(nc: NatsClient, scratch: Path, targets: Mapping[str, int]) -> dict[str, int]:
    """Read each stream up to its target here and fold it in `projections.refold` (a process of its own,
    so reading and folding use two cores); return the positions it reached."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "projections.refold", str(scratch),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        for stream, last_seq in targets.items():
            await _replay(nc, child.stdin, stream, last_seq)
        child.stdin.close()
        out = await child.stdout.read()
        if await child.wait() != 0:
            raise RuntimeError(f"the fold process exited with {child.returncode} (its log is above)")
    except BaseException:
        if child.returncode is None:
            child.kill()
            await child.wait()
        raise
    return {stream: seq for stream, seq in json.loads(out).items()}


async def _replay(nc: NatsClient, fold: asyncio.StreamWriter, stream: str, last_seq: int) -> None:
    """Send `stream` from its first message up to and including `last_seq` to the fold, in batches read
    by `sdk.stream_reader` (nats-py's per-message cost was the replay's ceiling)."""
    reached = 0
    async with contextlib.aclosing(
        read_stream(nc, stream, last_seq, filter_subject=FOLDED_STREAMS[stream], idle_s=REPLAY_IDLE_S)
    ) as batches:
        async for batch in batches:
            fold.write(frame(batch))
            await fold.drain()  # waits while the fold is behind: memory stays bounded
            reached = batch[-1].seq
    logger.info("replayed %s up to #%d", stream, reached)

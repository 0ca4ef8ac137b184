"""The rebuild's second process: `python -m projections.refold DB` folds the batches it reads on stdin into
DB through `Store.apply_batch`, and prints the positions reached as JSON when stdin ends.

Why a process: in one Python process reading the streams and folding them into SQLite take turns. The
replay (`projections.replay`) reads with `sdk.stream_reader`, this process folds, so on two free cores a
rebuild runs as fast as the slower of the two, the fold (docs/benchmarks.md, "Replaying the log"). The
pipe bounds memory: the reader waits while the folder is behind, and asks the server for no more
batches meanwhile.

A frame is a 4-byte big-endian length, then one stream's batch in msgpack, by columns (`Columns`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from itertools import repeat
from pathlib import Path
from typing import BinaryIO

import msgspec

from projections.store import Message, Store
from sdk.process import setup_logging
from sdk.stream_reader import Delivered

logger = logging.getLogger(__name__)

FRAME_HEADER_BYTES = 4
#: A frame's batch, by columns: the stream, then each message's sequence, data and pending count. Columns
#: decode about ten times faster than a list of `Delivered`, which were a seventh of the fold's time.
Columns = tuple[str, list[int], list[bytes], list[int]]
batch_encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(Columns)


def frame(batch: list[Delivered]) -> bytes:
    """One stream's batch as a frame."""
    payload = batch_encoder.encode(
        (batch[0].stream, [d.seq for d in batch], [d.data for d in batch], [d.pending for d in batch])
    )
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


def read_frame(stream: BinaryIO) -> list[Message] | None:
    """The next batch, or None at the end of the input."""
    header = stream.read(FRAME_HEADER_BYTES)
    if len(header) < FRAME_HEADER_BYTES:
        return None
    name, seqs, data, pending = batch_decoder.decode(stream.read(int.from_bytes(header, "big")))
    return list(zip(repeat(name, len(seqs)), seqs, data, pending, strict=True))


async def refold(db_path: Path, source: BinaryIO) -> dict[str, int]:
    store = await Store.open(db_path)
    # The next frame is read (in a thread) while the current one is folded, so the reader never waits.
    next_frame = asyncio.ensure_future(asyncio.to_thread(read_frame, source))
    try:
        while (batch := await next_frame) is not None:
            next_frame = asyncio.ensure_future(asyncio.to_thread(read_frame, source))
            await store.apply_batch(batch)
        return dict(store.positions)
    finally:
        next_frame.cancel()
        await store.close()


if __name__ == "__main__":
    setup_logging("WARNING")
    positions = asyncio.run(refold(Path(sys.argv[1]), sys.stdin.buffer))
    print(json.dumps(positions))

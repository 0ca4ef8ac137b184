"""Following the folded streams: ordered push consumers that append to one bounded buffer, drained in batches.

The live service reads through this code (a rebuild reads whole streams with `sdk.stream_reader`, and
both fold through the same `Store.apply_batch`). A delivery costs one list append and a split of the
reply subject (no `msg.metadata` objects, no `asyncio.Queue` per message), and the service takes
everything buffered at once, so the fold works on large batches while the consumers keep delivering.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from sdk import subjects
from sdk.log import FEED_IDLE_HEARTBEAT_S, ack_fields
from sdk.stream_reader import Delivered

logger = logging.getLogger(__name__)

#: The streams the read models are folded from, and the subjects to read from each.
FOLDED_STREAMS = {
    subjects.JOBS_STREAM: subjects.JOBS_SUBJECTS,
    subjects.WORKERS_STREAM: subjects.WORKERS_SUBJECTS,
    subjects.HEARTBEATS_STREAM: subjects.HEARTBEATS_SUBJECTS,
}
#: A full buffer blocks the consumers' callbacks, and JetStream's flow control then holds back the
#: rest of a large backlog instead of it piling up in memory.
BUFFER_SIZE = 20_000
#: The most events written in one transaction: large enough that most of a backlog's job lifecycles
#: fall inside one batch (a row written once, not once per event), small enough to keep a commit short.
BATCH_MAX = 10_000


class Feed:
    """A bounded buffer of deliveries, in arrival order: `put` from the consumers, `take` batches."""

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self._size = size
        self._buffer: list[Delivered] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._buffer)

    async def put(self, delivered: Delivered) -> None:
        self._buffer.append(delivered)
        self._ready.set()
        if len(self._buffer) >= self._size:
            self._room.clear()
            await self._room.wait()

    async def take(self, max_size: int = BATCH_MAX) -> list[Delivered]:
        """Wait for one delivery, then take everything already buffered (up to `max_size`)."""
        await self._ready.wait()
        batch = self._buffer[:max_size]
        del self._buffer[:max_size]
        if not self._buffer:
            self._ready.clear()
        if len(self._buffer) < self._size:
            self._room.set()
        return batch


async def follow(js: JetStreamContext, stream: str, after_seq: int, feed: Feed) -> JetStreamContext.PushSubscription:
    """Put every message of `stream` after `after_seq` into `feed`, in order, until unsubscribed."""

    async def deliver(msg: Msg) -> None:
        seq, _, pending = ack_fields(msg.reply)
        await feed.put(Delivered(stream, seq, msg.data, pending))

    if after_seq:
        start = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
        )
    else:
        start = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    logger.info("following %s after #%d", stream, after_seq)
    return await js.subscribe(
        FOLDED_STREAMS[stream], stream=stream, cb=deliver, ordered_consumer=True, config=start,
        idle_heartbeat=FEED_IDLE_HEARTBEAT_S,
        # The feed bounds memory; nats-py's own limits would drop messages of a large backlog instead.
        pending_msgs_limit=4 * BUFFER_SIZE, pending_bytes_limit=256 * 2**20,
    )


async def log_ends(js: JetStreamContext) -> dict[str, int]:
    """The last sequence of each folded stream now (0 for an empty one)."""
    ends = {}
    for stream in FOLDED_STREAMS:
        state = (await js.stream_info(stream)).state
        ends[stream] = state.last_seq if state.messages else 0
    return ends

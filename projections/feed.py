"""Reading the folded streams: ordered push consumers that feed one bounded queue, drained in batches.

The live service and the replay read through this same code, so a rebuilt database is folded from
exactly the messages the live one saw.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from sdk import subjects
from sdk.log import FEED_IDLE_HEARTBEAT_S

logger = logging.getLogger(__name__)

#: The streams the read models are folded from, and the subjects to read from each.
FOLDED_STREAMS = {
    subjects.JOBS_STREAM: subjects.JOBS_SUBJECTS,
    subjects.WORKERS_STREAM: subjects.WORKERS_SUBJECTS,
    subjects.HEARTBEATS_STREAM: subjects.HEARTBEATS_SUBJECTS,
}
#: A full queue blocks the consumers' callbacks, and JetStream's flow control then holds back the
#: rest of a large backlog instead of it piling up in memory.
QUEUE_SIZE = 10_000
#: The most events written in one transaction.
BATCH_MAX = 1_000


class Delivered(NamedTuple):
    stream: str
    seq: int
    data: bytes
    #: Messages left in the stream after this one when it was delivered (0: caught up).
    pending: int


async def follow(
    js: JetStreamContext, stream: str, after_seq: int, queue: asyncio.Queue[Delivered]
) -> JetStreamContext.PushSubscription:
    """Put every message of `stream` after `after_seq` on `queue`, in order, until unsubscribed."""

    async def deliver(msg: Msg) -> None:
        meta = msg.metadata
        await queue.put(Delivered(stream, meta.sequence.stream, msg.data, meta.num_pending))

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
    )


async def next_batch(queue: asyncio.Queue[Delivered], max_size: int = BATCH_MAX) -> list[Delivered]:
    """Wait for one message, then take whatever else is already queued (up to `max_size`)."""
    batch = [await queue.get()]
    while len(batch) < max_size and not queue.empty():
        batch.append(queue.get_nowait())
    return batch

"""The gateway's one follower of the whole JOBS log: an ordered consumer from the first event that decodes
each event once and hands it, in stream order, to every fold kept of the log: the job feed that wakes
waits (`gateway.feed.JobFeed`), the queue depth (`gateway.backpressure.QueueDepth`) and the job metrics
(`gateway.metrics.jobs.JobMetrics`). One consumer, not one per fold: each is a delivery of every event.

A starting gateway waits until the existing events are folded (at most `CATCH_UP_S`, then it serves and
folds on in the background), so queue limits hold from the first submission and the metrics are exact
from the first scrape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from sdk import subjects
from sdk.events import JobEvent, job_event_decoder
from sdk.log import FEED_IDLE_HEARTBEAT_S, ack_fields

logger = logging.getLogger(__name__)

#: How long a starting gateway waits to have folded the existing log before it serves anyway.
CATCH_UP_S = 30.0


class JobFold(Protocol):
    def apply(self, event: JobEvent, seq: int) -> None:
        """Fold one event, delivered in stream order with its JOBS sequence."""


class JobsFollower:
    """One ordered consumer of JOBS, from its start, feeding `folds`."""

    def __init__(self, js: JetStreamContext, folds: Sequence[JobFold]) -> None:
        self._js = js
        self._folds = tuple(folds)
        self._sub: JetStreamContext.PushSubscription | None = None
        self._caught_up = asyncio.Event()

    async def start(self) -> None:
        """Follow JOBS from its first event; returns once the existing events are folded (or after
        `CATCH_UP_S`, folding on in the background)."""
        self._sub = await self._js.subscribe(
            subjects.JOBS_SUBJECTS, stream=subjects.JOBS_STREAM, cb=self._on_msg, ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.ALL, idle_heartbeat=FEED_IDLE_HEARTBEAT_S,
        )
        if (await self._sub.consumer_info()).num_pending == 0:
            self._caught_up.set()
        try:
            await asyncio.wait_for(self._caught_up.wait(), CATCH_UP_S)
        except TimeoutError:
            logger.warning("JOBS follower: still folding the log after %.0fs; serving with what is known", CATCH_UP_S)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        seq, _, pending = ack_fields(msg.reply)  # not `msg.metadata`: ten times the CPU, on every event
        try:
            event = job_event_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:  # a foreign message on jobs.* must stop no fold
            logger.warning("JOBS follower: undecodable message at %d: %s", seq, exc)
        else:
            for fold in self._folds:
                fold.apply(event, seq)
        if pending == 0:
            self._caught_up.set()

"""Backpressure: refuse a submission (429, `Retry-After`) when the queue is past an operator's limit.

The limits (`sdk.platform_config.QueueLimits`: `max_queued`, `max_queued_per_client`) live in the
`platform-config` bucket, key `limits`, and are followed live. The counts are this gateway's own fold of
JOBS (`QueueDepth`, fed by `gateway.follow`): which jobs wait for a worker, and whose they are. A job
counts from its submission until it is assigned (again after a requeue) or ends; assigned and running
jobs do not count.

Each gateway counts its own submissions at once (the append's acknowledgement) and everyone else's
when its consumer delivers them, a few milliseconds later: one gateway enforces a limit exactly,
several may together overshoot it by the submissions in flight between them. A refusal appends nothing.
"""

from __future__ import annotations

import logging
from collections import Counter

from nats.js import JetStreamContext

from sdk import subjects
from sdk.errors import QueueFull
from sdk.events import JobAssigned, JobEnded, JobEvent, JobRequeued, JobSubmitted
from sdk.platform_config import QueueLimits, SettingWatch

logger = logging.getLogger(__name__)


class QueueDepth:
    """Queued jobs, in total and per owner, folded from JOBS from its start (`gateway.follow`)."""

    def __init__(self) -> None:
        #: Live (unfinished) jobs and their owners, so a requeue knows whose job is queued again.
        self._live: dict[str, str | None] = {}
        self._queued: set[str] = set()
        self.per_owner: Counter[str | None] = Counter()
        #: The stream sequence of the last event folded.
        self.position = 0

    @property
    def total(self) -> int:
        return len(self._queued)

    def own(self, event: JobEvent, seq: int) -> None:
        """Count an event this gateway appended now, unless the consumer got there first."""
        if seq > self.position:
            self._fold(event)

    def apply(self, event: JobEvent, seq: int) -> None:
        """The consumer's copy of an event, in stream order."""
        self.position = max(self.position, seq)
        self._fold(event)

    def _fold(self, event: JobEvent) -> None:
        match event:
            case JobSubmitted():
                self._enqueue(event.job_id, event.owner)
            case JobRequeued() if event.job_id in self._live:
                self._enqueue(event.job_id, self._live[event.job_id])
            case JobAssigned():
                self._dequeue(event.job_id)
            case JobEnded():
                self._dequeue(event.job_id)
                self._live.pop(event.job_id, None)

    def _enqueue(self, job_id: str, owner: str | None) -> None:
        self._live.setdefault(job_id, owner)
        if job_id not in self._queued:
            self._queued.add(job_id)
            self.per_owner[owner] += 1

    def _dequeue(self, job_id: str) -> None:
        if job_id in self._queued:
            self._queued.discard(job_id)
            owner = self._live.get(job_id)
            self.per_owner[owner] -= 1
            if not self.per_owner[owner]:
                del self.per_owner[owner]


class Backpressure:
    """The limits in effect and the counts they apply to."""

    def __init__(self, js: JetStreamContext) -> None:
        self.depth = QueueDepth()
        self.limits = SettingWatch(js, subjects.LIMITS_KEY, QueueLimits)

    async def start(self) -> None:
        await self.limits.start()

    async def stop(self) -> None:
        await self.limits.stop()

    def admit(self, owner: str | None) -> None:
        """`QueueFull` (429) when one more queued job of `owner` would pass a limit."""
        limits = self.limits.value
        checks = (
            ("max_queued", limits.max_queued, self.depth.total),
            ("max_queued_per_client", limits.max_queued_per_client, self.depth.per_owner.get(owner, 0)),
        )
        for name, value, queued in checks:
            if value is not None and queued >= value:
                logger.info("submission of %s refused: %s %d reached (%d queued)", owner, name, value, queued)
                raise QueueFull(
                    f"{name} is {value} and {queued} jobs are queued; retry in {limits.retry_after_s}s",
                    {"limit": name, "value": value, "queued": queued, "retry_after_s": limits.retry_after_s},
                )

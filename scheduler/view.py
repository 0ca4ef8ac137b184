"""The scheduler's in-memory view: jobs, workers and their configs, folded from the streams.

No I/O here. The service feeds every event, heartbeat and config change in, and asks the view what to
decide about (queued jobs, silent workers, orphaned and expired jobs). A job is orphaned when its worker
is gone, or when the worker's latest heartbeats say it does not hold the job (`recovery.not_held`).
Leader and standbys fold the same way, so a standby that takes over already knows everything.

Only jobs that are not finished stay in memory. An event carries the stream sequence it was stored at,
and a job remembers the sequence of the last event applied to it: the leader applies its own appends at
once, and the consumer's later copy of them (`seq <= job.seq`) is ignored.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterator
from typing import Any

import msgspec

from scheduler.fairness import fair_order
from scheduler.placement import Candidate
from scheduler.recovery import NOT_HELD_AFTER_HEARTBEATS, NOT_HELD_BY_WORKER, HeldReport, is_expired, not_held
from scheduler.sessions import SessionBook
from sdk.api import WorkerConfig
from sdk.errors import BadRequest, InvalidTransition, StaleAttempt
from sdk.events import (
    Heartbeat,
    JobEvent,
    JobSubmitted,
    WorkerEvent,
    WorkerLost,
    WorkerModelLoaded,
    WorkerModelUnloaded,
    WorkerRegistered,
)
from sdk.jobs import HELD_BY_WORKER, Job, JobStatus, apply
from sdk.subjects import WORKER_CONFIG_DEFAULTS_KEY
from sdk.worker_config import effective_config
from sdk.workers import WorkerState, WorkerStatus, apply_worker

logger = logging.getLogger(__name__)

#: A worker is lost after this many heartbeat intervals without a sign of life.
LOST_AFTER_MISSED_HEARTBEATS = 3


class TrackedWorker(msgspec.Struct, kw_only=True):
    """A worker as the scheduler tracks it: its lifecycle, folded by the shared `sdk.workers.apply_worker`,
    and what depends on how the streams are delivered here (receipt times, heartbeats, their interleaving)."""

    worker_id: str
    #: None until its registration arrives: a heartbeat can come first (two streams); not placed on then.
    lifecycle: WorkerState | None = None
    #: Local monotonic time of the last sign of life (heartbeat or registration), for loss detection.
    #: Receipt time rather than the worker's clock: immune to clock skew, and a restarted scheduler
    #: gives every worker a full grace period instead of declaring it lost from a replayed heartbeat.
    last_seen_s: float = 0.0
    #: Server time of the newest heartbeat and of the newest `WorkerLost`: whichever is later wins,
    #: whatever order the two streams are delivered in.
    heartbeat_at_us: int = 0
    lost_at_us: int = 0
    heartbeat_interval_s: float | None = None
    heartbeat_draining: bool = False
    #: The latest heartbeat's models, amended by the load and unload events delivered after it.
    loaded_models: set[str] = msgspec.field(default_factory=set)
    memory_free_bytes: int | None = None
    #: What the latest heartbeats (oldest first) said this worker holds, to find jobs it does not.
    held_reports: tuple[HeldReport, ...] = ()
    #: Sequence of the last event on `workers.<id>`, applied or not, for expected-sequence appends.
    seq: int = 0

    @property
    def registered(self) -> bool:
        return self.lifecycle is not None

    @property
    def region(self) -> str:
        assert self.lifecycle is not None and self.lifecycle.region is not None, "only registered workers have one"
        return self.lifecycle.region

    @property
    def deregistered(self) -> bool:
        return self.lifecycle is not None and self.lifecycle.status is WorkerStatus.DEREGISTERED

    @property
    def draining(self) -> bool:
        in_log = self.lifecycle is not None and self.lifecycle.status is WorkerStatus.DRAINING
        return in_log or self.heartbeat_draining

    @property
    def lost(self) -> bool:
        return self.lost_at_us > self.heartbeat_at_us

    @property
    def alive(self) -> bool:
        return self.registered and not self.deregistered and not self.lost

    @property
    def gone(self) -> bool:
        """Will not run the jobs it holds: lost or deregistered."""
        return self.registered and (self.deregistered or self.lost)


def _deadline_ms(job: Job) -> float:
    """When a queued job expires (`recovery.is_expired`: once `now_ms` is past it)."""
    return job.submitted_at_ms + job.timeout_s * 1000


class SchedulerView:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, TrackedWorker] = {}
        self._queued: set[str] = set()
        #: (expiry deadline in ms, job id) for each job that entered the queue, soonest first: a sweep reads
        #: only the entries that are due, not every queued job (10,000 queued cost ~7 ms a tick that way).
        #: An entry whose job has left the queue is dropped when it comes due.
        self._deadlines: list[tuple[float, str]] = []
        #: worker id -> ids of the jobs assigned to or running on it.
        self._held: dict[str, set[str]] = {}
        self._config_defaults: dict[str, Any] = {}
        self._config_overrides: dict[str, dict[str, Any]] = {}
        self._configs: dict[str, WorkerConfig] = {}
        #: Open direct sessions: each holds a slot of its worker (`scheduler.sessions`).
        self.sessions = SessionBook()

    # --- jobs ------------------------------------------------------------------------------------

    def apply_job_event(self, event: JobEvent, seq: int) -> Job | None:
        """Fold one event from the JOBS stream; the new job, or None when the event was ignored."""
        job = self.jobs.get(event.job_id)
        if job is None and not isinstance(event, JobSubmitted):
            return None  # a job that finished before (its later events change nothing)
        if job is not None and seq <= job.seq:
            return None  # our own append, already applied
        try:
            new = apply(job, event, seq)
        except (InvalidTransition, StaleAttempt) as exc:
            # Every writer appends at the expected sequence, so this means our view is off; the next
            # append on this job fails its expected sequence and reloads it from the log.
            logger.warning("ignoring %s at seq %d: %s", type(event).__name__, seq, exc.message)
            return None
        self.put_job(new)
        return new

    def put_job(self, new: Job) -> None:
        """Replace a job's state with a newer one (from our own append or a reload from the log)."""
        old = self.jobs.get(new.id)
        if old is not None:
            if new.seq <= old.seq:
                return
            self._queued.discard(old.id)
            if old.worker_id is not None:
                self._held.get(old.worker_id, set()).discard(old.id)
        if new.status.terminal:
            self.jobs.pop(new.id, None)
            return
        self.jobs[new.id] = new
        if new.status is JobStatus.QUEUED:
            if old is None or old.status is not JobStatus.QUEUED:  # entering the queue
                heapq.heappush(self._deadlines, (_deadline_ms(new), new.id))
            self._queued.add(new.id)
        elif new.status in HELD_BY_WORKER and new.worker_id is not None:
            self._held.setdefault(new.worker_id, set()).add(new.id)

    @property
    def queued_count(self) -> int:
        return len(self._queued)

    def queued(self) -> list[Job]:
        """Queued jobs in the order they are offered: higher priority first, then clients in turn
        (`scheduler.fairness`)."""
        return fair_order(self.jobs[i] for i in self._queued)

    def expired_jobs(self, now_ms: int) -> list[Job]:
        """Queued jobs past their timeout; each is offered again at every sweep until it leaves the queue
        (its `JobExpired` may fail to land)."""
        expired: dict[str, Job] = {}
        while self._deadlines and self._deadlines[0][0] < now_ms:
            _, job_id = heapq.heappop(self._deadlines)
            if job_id in self._queued and is_expired(job := self.jobs[job_id], now_ms):
                expired[job_id] = job
        for job in expired.values():
            heapq.heappush(self._deadlines, (_deadline_ms(job), job.id))
        return list(expired.values())

    def orphaned_jobs(self) -> Iterator[tuple[Job, str]]:
        """Jobs assigned to or running on a worker that will never finish them, with the reason: the
        worker is gone, or it is alive but its latest heartbeats leave the job out (the dispatch never
        reached it, or it restarted without the job before anyone noticed it was away)."""
        for worker_id, job_ids in self._held.items():
            worker = self.workers.get(worker_id)
            if worker is None or not job_ids:
                continue
            if worker.gone:
                reason = "worker_deregistered" if worker.deregistered else "worker_lost"
                for job_id in job_ids:
                    yield self.jobs[job_id], reason
                continue
            for job_id in job_ids:
                if not_held(job := self.jobs[job_id], worker.held_reports):
                    yield job, NOT_HELD_BY_WORKER

    # --- workers ---------------------------------------------------------------------------------

    def apply_worker_event(self, event: WorkerEvent, seq: int, stored_at_us: int, now_s: float) -> None:
        worker = self.workers.get(event.worker_id) or TrackedWorker(worker_id=event.worker_id)
        worker.seq = max(worker.seq, seq)
        try:
            worker.lifecycle = apply_worker(worker.lifecycle, event, seq)
        except InvalidTransition as exc:
            logger.warning("ignoring %s at seq %d: %s", type(event).__name__, seq, exc.message)
            return  # e.g. not registered yet: nothing to attach the event to
        self.workers[event.worker_id] = worker
        # The lifecycle is the shared fold's; what follows depends on delivery here.
        match event:
            case WorkerRegistered():
                worker.lost_at_us = 0  # a registration after a loss brings the worker back
                worker.last_seen_s = now_s
            case WorkerLost():
                worker.lost_at_us = max(worker.lost_at_us, stored_at_us)
            case WorkerModelLoaded():
                worker.loaded_models.add(event.model)
            case WorkerModelUnloaded():
                worker.loaded_models.discard(event.model)

    def apply_heartbeat(self, heartbeat: Heartbeat, stored_at_us: int, now_s: float) -> None:
        worker = self.workers.setdefault(heartbeat.worker_id, TrackedWorker(worker_id=heartbeat.worker_id))
        worker.heartbeat_at_us = max(worker.heartbeat_at_us, stored_at_us)
        if worker.lost:
            return  # sent before the loss was declared: not a sign of life
        worker.last_seen_s = now_s
        report = HeldReport(stored_at_ms=stored_at_us // 1000, job_ids=frozenset(heartbeat.in_flight))
        worker.held_reports = (*worker.held_reports, report)[-NOT_HELD_AFTER_HEARTBEATS:]
        worker.heartbeat_interval_s = heartbeat.interval_s
        worker.heartbeat_draining = heartbeat.draining
        worker.loaded_models = set(heartbeat.loaded_models)
        worker.memory_free_bytes = heartbeat.memory_free_bytes
        if worker.memory_free_bytes is None and heartbeat.gpus:
            worker.memory_free_bytes = sum(gpu.memory_free_bytes for gpu in heartbeat.gpus)

    def mark_lost(self, worker_id: str, seq: int) -> None:
        """Our own `WorkerLost`: any heartbeat newer than the last one we saw brings the worker back."""
        worker = self.workers[worker_id]
        worker.lost_at_us = max(worker.lost_at_us, worker.heartbeat_at_us + 1)
        worker.seq = max(worker.seq, seq)

    def excuse_silence(self, until_s: float) -> None:
        """The broker was away: no heartbeat could reach us, so a worker's silence counts only from `until_s`
        (it reconnects after us, through the gateway's auth callout)."""
        for worker in self.workers.values():
            worker.last_seen_s = max(worker.last_seen_s, until_s)

    def heartbeat_interval_s(self, worker: TrackedWorker) -> float:
        """The worker's own interval (its latest heartbeat's), else its config's."""
        return worker.heartbeat_interval_s or self.config(worker.worker_id).heartbeat_interval_s

    def overdue_workers(self, now_s: float) -> list[tuple[TrackedWorker, float]]:
        """Alive workers silent for more than `LOST_AFTER_MISSED_HEARTBEATS` intervals, with the silence."""
        overdue = []
        for worker in self.workers.values():
            if not worker.alive:
                continue
            silent_s = now_s - worker.last_seen_s
            if silent_s > LOST_AFTER_MISSED_HEARTBEATS * self.heartbeat_interval_s(worker):
                overdue.append((worker, silent_s))
        return overdue

    def candidates(self) -> dict[str, Candidate]:
        """Every registered worker as placement sees it now."""
        out = {}
        for worker in self.workers.values():
            if worker.lifecycle is None:
                continue
            config = self.config(worker.worker_id)
            out[worker.worker_id] = Candidate(
                worker_id=worker.worker_id,
                region=worker.region,
                capabilities=tuple(worker.lifecycle.capabilities),
                max_concurrency=config.max_concurrency,
                in_flight=len(self._held.get(worker.worker_id, ())) + self.sessions.slots(worker.worker_id),
                acceptance_rate=config.load_control.acceptance_rate,
                allowed_models=tuple(config.models),
                loaded_models=tuple(sorted(worker.loaded_models)),
                memory_free_bytes=worker.memory_free_bytes,
                alive=worker.alive,
                draining=worker.draining,
            )
        return out

    # --- runtime configuration (KV `worker-config`) ---------------------------------------------

    def set_config(self, key: str, partial: dict[str, Any] | None) -> None:
        """A key of the `worker-config` bucket changed (None: deleted)."""
        if key == WORKER_CONFIG_DEFAULTS_KEY:
            self._config_defaults = partial or {}
            self._configs.clear()
        else:
            if partial is None:
                self._config_overrides.pop(key, None)
            else:
                self._config_overrides[key] = partial
            self._configs.pop(key, None)

    def config(self, worker_id: str) -> WorkerConfig:
        config = self._configs.get(worker_id)
        if config is None:
            config = self._configs[worker_id] = self._effective_config(worker_id)
        return config

    def _effective_config(self, worker_id: str) -> WorkerConfig:
        try:
            return effective_config(self._config_defaults, self._config_overrides.get(worker_id))
        except BadRequest as exc:
            logger.warning("worker %s: invalid runtime config (%s); using the defaults", worker_id, exc.message)
        try:
            return effective_config(self._config_defaults, None)
        except BadRequest:
            return WorkerConfig()

"""Job metrics, folded from the JOBS log: how many jobs entered each status (by type and region), the
queue depth (by type and region), and latency histograms (queued, running, end to end).

The gateway's follower of JOBS (`gateway.follow`) replays the log from its start into this fold, so every
gateway exports the same totals and the queue depth is exact from the first scrape on. Memory: a small
record per unfinished job; a job leaves when it reaches a terminal status.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sdk.events import JobAssigned, JobEnded, JobEvent, JobRequeued, JobStarted, JobSubmitted
from sdk.jobs import ENDED_STATUS

logger = logging.getLogger(__name__)

#: A job that asked for no region is labelled so until a worker's region is known.
ANY_REGION = "any"
#: From a few milliseconds (echo on an idle fleet) to half an hour (a long generation or a backlog).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass(slots=True)
class _Live:
    """What the metrics need of an unfinished job."""

    type: str
    requested_region: str
    region: str
    status: str
    submitted_ms: int
    #: When it last entered the queue (submission or requeue).
    queued_ms: int
    started_ms: int | None = None


class JobMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "gf_jobs", "Jobs that entered each status (a requeued job enters `queued` again)",
            ["type", "status", "region"], registry=registry,
        )
        self.queued = Histogram(
            "gf_job_queued_seconds", "From entering the queue to the scheduler's placement (placement latency)",
            ["type", "region"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.running = Histogram(
            "gf_job_running_seconds", "From a worker starting the job to its end",
            ["type", "status"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.end_to_end = Histogram(
            "gf_job_end_to_end_seconds", "From submission to a terminal status",
            ["type", "status"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self._live: dict[str, _Live] = {}
        #: The JOBS sequence folded so far (the stream's end minus this is the fold's own lag).
        self.seq = 0
        registry.register(self)

    def apply(self, event: JobEvent, seq: int) -> None:
        """Count one event. Events of a job submitted before the stream's first kept message are skipped."""
        self.seq = seq
        at = event.at_ms
        if isinstance(event, JobSubmitted):
            region = event.region or ANY_REGION
            self._live[event.job_id] = _Live(event.job_type, region, region, "queued", at, at)
            self.jobs.labels(event.job_type, "queued", region).inc()
            return
        job = self._live.get(event.job_id)
        if job is None:
            return
        match event:
            case JobAssigned():
                job.region, job.status = event.region, "assigned"
                self.queued.labels(job.type, job.region).observe(_seconds(at - job.queued_ms))
            case JobStarted():
                job.status, job.started_ms = "running", at
            case JobRequeued():
                job.region, job.status, job.queued_ms, job.started_ms = job.requested_region, "queued", at, None
            case JobEnded():
                job.status = ENDED_STATUS[type(event)].value
                if job.started_ms is not None:
                    self.running.labels(job.type, job.status).observe(_seconds(at - job.started_ms))
                self.end_to_end.labels(job.type, job.status).observe(_seconds(at - job.submitted_ms))
                del self._live[event.job_id]
            case _:
                return  # progress and cancel requests change no status
        self.jobs.labels(job.type, job.status, job.region).inc()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("gf_queue_depth", "Jobs waiting for a worker", labels=["type", "region"])
        unfinished = GaugeMetricFamily(
            "gf_jobs_unfinished", "Jobs not yet in a terminal status, by status", labels=["type", "status", "region"]
        )
        by_status = Tally((job.type, job.status, job.region) for job in self._live.values())
        for (job_type, status, region), count in sorted(by_status.items()):
            unfinished.add_metric([job_type, status, region], count)
            if status == "queued":
                depth.add_metric([job_type, region], count)
        yield depth
        yield unfinished


def _seconds(ms: int) -> float:
    return max(ms, 0) / 1000

"""A scheduler process's own metrics (`--metrics-port`, `sdk.metrics`): what this instance decided as
leader and how long a placement pass took, and its view (leadership, queue, workers) read at each scrape.
The fleet's view of the same (the leader, the queue by region) is the gateway's `/metrics`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from sdk.metrics import Reading, Readings

if TYPE_CHECKING:
    from scheduler.service import Scheduler

ASSIGNMENTS = Counter("scheduler_assignments", "Jobs this process assigned as leader")
PASS_SECONDS = Histogram(
    "scheduler_placement_pass_seconds", "One placement pass as leader: plan, append the assignments, dispatch",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def readings(scheduler: Scheduler) -> Readings:
    return Readings(
        Reading("scheduler_leader", "1 while this instance holds the leader lease", lambda: scheduler.is_leader),
        Reading("scheduler_queued_jobs", "Jobs waiting for a worker, in this instance's view",
                lambda: scheduler.view.queued_count),
        Reading("scheduler_workers_known", "Workers in this instance's view", lambda: len(scheduler.view.workers)),
    )

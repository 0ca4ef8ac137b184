"""`gpuctl status`: one screen for an operator, over HTTP as the operator key.

It reads three things the gateway serves: `/health` (NATS and JetStream), `/metrics` (the scheduler
leader, each stream's end and slowest consumer, the queue by type and region) and `/api/v1/workers`
(the projections' view of the workers, so an answer also says the projections are up).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import msgspec
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table

from sdk.api import WorkerView
from sdk.errors import PlatformError
from sdk.http import HttpClient


class Sample(msgspec.Struct, frozen=True):
    labels: dict[str, str]
    value: float


class PlatformStatus(msgspec.Struct, kw_only=True):
    #: Each component and its state in words ("ok", "leader s-1", "down: ...").
    components: dict[str, str]
    workers: list[WorkerView]
    #: stream -> (last sequence, the slowest consumer's backlog)
    streams: dict[str, tuple[int, int]]
    #: (type, region) -> jobs waiting; (type, status) -> unfinished jobs
    queue: dict[tuple[str, str], int]
    unfinished: dict[tuple[str, str], int]


def parse_metrics(text: str) -> dict[str, list[Sample]]:
    """Prometheus text as samples by name."""
    samples: dict[str, list[Sample]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append(Sample(dict(sample.labels), sample.value))
    return samples


async def gather(http: HttpClient) -> PlatformStatus:
    """Ask the gateway; a part that does not answer is reported down, never raised."""
    components: dict[str, str] = {}
    try:
        health = await http.health()
        components["gateway"] = "ok"
    except PlatformError as exc:  # 503: the gateway answers but a dependency is down
        health = exc.details if isinstance(exc.details, dict) else {}
        components["gateway"] = f"degraded: {exc.message}"
    components["nats"] = str(health.get("nats", "unknown"))
    components["jetstream"] = str(health.get("jetstream", "unknown"))
    metrics = parse_metrics(await http.metrics_text())
    leaders = [s.labels["holder"] for s in metrics.get("gf_scheduler_leader", []) if s.value]
    components["scheduler"] = f"leader {leaders[0]}" if leaders else "no leader"
    try:
        workers = await http.workers()
        components["projections"] = "ok"
    except PlatformError as exc:
        workers = []
        components["projections"] = f"down: {exc.message}"
    lags = {s.labels["stream"]: int(s.value) for s in metrics.get("gf_stream_consumer_lag", [])}
    streams = {s.labels["stream"]: (int(s.value), lags.get(s.labels["stream"], 0)) for s in metrics.get("gf_stream_last_seq", [])}
    queue = {(s.labels["type"], s.labels["region"]): int(s.value) for s in metrics.get("gf_queue_depth", [])}
    unfinished: dict[tuple[str, str], int] = defaultdict(int)
    for s in metrics.get("gf_jobs_unfinished", []):
        unfinished[(s.labels["type"], s.labels["status"])] += int(s.value)
    return PlatformStatus(
        components=components, workers=workers, streams=streams, queue=queue, unfinished=dict(unfinished)
    )


def render(status: PlatformStatus, now: dt.datetime | None = None) -> Group:
    """The screen: components, streams, workers by region, the queue."""
    now = now or dt.datetime.now(dt.UTC)
    components = Table("component", "state", title="Components")
    for name, state in status.components.items():
        colour = "green" if state == "ok" or state.startswith("leader") else "red"
        components.add_row(name, f"[{colour}]{state}[/]")
    streams = Table("stream", "last seq", "slowest consumer behind by", title="Streams (projection lag)")
    for stream, (seq, lag) in sorted(status.streams.items()):
        streams.add_row(stream, str(seq), str(lag))
    workers = Table("region", "worker", "name", "status", "jobs", "models", "GPUs", "heartbeat", title="Workers")
    for w in sorted(status.workers, key=lambda w: (w.region, w.name)):
        gpus = ", ".join(
            f"{g.name} {_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)} GiB"
            + (f" {g.utilization_pct:.0f}%" if g.utilization_pct is not None else "")
            for g in w.gpus
        )
        beat = f"{(now - w.last_heartbeat).total_seconds():.0f}s ago" if w.last_heartbeat else "never"
        workers.add_row(
            w.region, w.id, w.name, w.status, f"{len(w.in_flight)}/{w.capacity}", ", ".join(w.loaded_models) or "-",
            gpus or "-", beat,
        )
    queue = Table("type", "region", "queued", title="Queue")
    for (job_type, region), count in sorted(status.queue.items()):
        queue.add_row(job_type, region, str(count))
    in_progress = ", ".join(f"{t} {s}: {n}" for (t, s), n in sorted(status.unfinished.items()) if s != "queued")
    return Group(components, streams, workers, queue, f"unfinished: {in_progress or 'none besides the queue'}")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}"

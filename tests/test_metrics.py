"""Prometheus metrics at `/metrics`, scraped from a running platform the way Prometheus would, and the
Grafana dashboard in `deploy/grafana/` checked against what the gateway really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sdk import subjects
from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.events import GpuInfo, Heartbeat, JobCancelled, JobSubmitted, encoder
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import append, ensure_streams
from tests.conftest import serving_gateway, wait_until

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "gpu-fabric.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


class Scrape:
    """One scrape: every sample by name, and every metric family exported (with or without samples)."""

    def __init__(self, text: str) -> None:
        self.families: set[str] = set()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when none do)."""
        return sum(v for got, v in self.samples.get(name, []) if labels.items() <= got.items())

    def labels(self, name: str) -> list[dict[str, str]]:
        return [got for got, _ in self.samples.get(name, [])]


async def scrape(base_url: str) -> Scrape:
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.get("/metrics")  # no token: a scrape target
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


async def test_a_job_shows_in_the_counters_histograms_and_http_requests(stack: LocalStack, http: HttpClient) -> None:
    before = await scrape(stack.http_url)
    job = await http.submit("echo", params={"metrics": True})
    done = await http.wait(job.id, timeout_s=30)
    assert done.status == "completed"

    async def counted() -> bool:
        return (await scrape(stack.http_url)).value("gf_jobs_total", type="echo", status="completed") > before.value(
            "gf_jobs_total", type="echo", status="completed"
        )

    await wait_until(counted, 10, "the completed job in gf_jobs_total")
    after = await scrape(stack.http_url)
    region = next(w.region for w in await http.workers() if w.id == done.worker_id)
    for status in ("queued", "assigned", "running", "completed"):
        assert after.value("gf_jobs_total", type="echo", status=status) > before.value(
            "gf_jobs_total", type="echo", status=status
        ), status
    assert after.value("gf_jobs_total", type="echo", status="completed", region=region) >= 1
    for histogram in ("gf_job_queued_seconds_count", "gf_job_running_seconds_count", "gf_job_end_to_end_seconds_count"):
        assert after.value(histogram, type="echo") > before.value(histogram, type="echo"), histogram
    # The submission itself, counted by its route template (never by the job's id).
    assert after.value("gf_http_requests_total", route="/api/v1/jobs", method="POST", status="201") >= 1
    assert not any(job.id in labels["route"] for labels in after.labels("gf_http_requests_total"))


async def test_queue_depth_by_type_and_region_counts_the_log_from_its_start(
    fresh_nats: EmbeddedNats, tmp_path: Path
) -> None:
    # No scheduler runs here: submitted jobs stay queued. One job is in the log before the gateway
    # starts (the metrics replay it), two arrive while it runs.
    nc = await connect(fresh_nats.url, name="test-metrics")
    js = nc.jetstream()
    await ensure_streams(js)
    try:
        await append(js, subjects.job_subject("mq-before"), JobSubmitted(job_id="mq-before", job_type="echo", region="eu"))
        async with serving_gateway(fresh_nats.url, tmp_path / "secrets") as url:
            for job_id, job_type in (("mq-llm", "llm"), ("mq-echo", "echo")):
                await append(js, subjects.job_subject(job_id), JobSubmitted(job_id=job_id, job_type=job_type, region="eu"))

            async def queued() -> bool:
                return (await scrape(url)).value("gf_queue_depth", type="echo", region="eu") == 2

            await wait_until(queued, 10, "both echo jobs in gf_queue_depth")
            metrics = await scrape(url)
            assert metrics.value("gf_queue_depth", type="llm", region="eu") == 1
            assert metrics.value("gf_jobs_total", type="echo", status="queued", region="eu") == 2

            await append(js, subjects.job_subject("mq-echo"), JobCancelled(job_id="mq-echo"))

            async def one_left() -> bool:
                return (await scrape(url)).value("gf_queue_depth", type="echo", region="eu") == 1

            await wait_until(one_left, 10, "the cancelled job to leave gf_queue_depth")
            metrics = await scrape(url)
            assert metrics.value("gf_jobs_total", type="echo", status="cancelled", region="eu") == 1
            assert metrics.value("gf_job_end_to_end_seconds_count", type="echo", status="cancelled") == 1
            assert metrics.value("gf_stream_last_seq", stream="JOBS") == 4
            assert metrics.labels("gf_worker_up") == []  # no worker ever beat here

            gpu = GpuInfo(index=0, name="H200", memory_total_bytes=141 << 30, memory_used_bytes=7 << 30,
                          utilization_pct=63.0, temperature_c=51.0, power_w=402.5)
            beat = Heartbeat(worker_id="mq-worker", region="eu", in_flight=("a", "b"), max_concurrency=4,
                             loaded_models=("gpt2",), gpus=(gpu,))
            await js.publish(subjects.heartbeat_subject("eu", "mq-worker"), encoder.encode(beat))

            async def beating() -> bool:
                return (await scrape(url)).value("gf_worker_up", worker="mq-worker", region="eu") == 1

            await wait_until(beating, 10, "the worker's heartbeat in gf_worker_up")
            metrics = await scrape(url)
            card = {"worker": "mq-worker", "region": "eu", "gpu": "0", "gpu_name": "H200"}
            assert metrics.value("gf_worker_gpu_memory_used_bytes", **card) == 7 << 30
            assert metrics.value("gf_worker_gpu_memory_total_bytes", **card) == 141 << 30
            assert metrics.value("gf_worker_gpu_utilization_percent", **card) == 63.0
            assert metrics.value("gf_worker_gpu_temperature_celsius", **card) == 51.0
            assert metrics.value("gf_worker_gpu_power_watts", **card) == 402.5
            assert metrics.value("gf_worker_jobs_in_flight", worker="mq-worker") == 2
            assert metrics.value("gf_worker_capacity", worker="mq-worker") == 4
            assert metrics.value("gf_worker_model_loaded", worker="mq-worker", model="gpt2") == 1
    finally:
        await nc.close()


async def test_workers_leader_and_streams(stack: LocalStack, http: HttpClient) -> None:
    # A job of this test's own, so the JOBS stream is not empty even on a platform that ran none yet.
    assert (await http.wait((await http.submit("echo", params={"streams": True})).id, timeout_s=30)).status == "completed"
    workers = {w.id: w for w in await http.workers() if w.status == "online"}
    metrics = await scrape(stack.http_url)
    up = {labels["worker"]: labels["region"] for labels in metrics.labels("gf_worker_up")}
    for worker_id, worker in workers.items():
        assert up.get(worker_id) == worker.region
        assert metrics.value("gf_worker_up", worker=worker_id) == 1
        assert metrics.value("gf_worker_capacity", worker=worker_id) == worker.capacity
    assert metrics.value("gf_nats_up") == 1
    assert len(metrics.labels("gf_scheduler_leader")) == 1
    assert metrics.value("gf_stream_last_seq", stream="JOBS") > 0
    assert {labels["stream"] for labels in metrics.labels("gf_stream_consumer_lag")} >= {"JOBS", "WORKERS"}
    assert metrics.value("process_resident_memory_bytes") > 0


async def test_metrics_is_not_in_the_api_document(stack: LocalStack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url) as http:
        document = (await http.get("/schema/openapi.json")).json()
    assert "/metrics" not in document["paths"]


async def test_every_metric_the_grafana_dashboard_queries_is_exported(stack: LocalStack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    queried = {name for expr in exprs for name in re.findall(r"\b(?:gf|process)_[a-z_]+\b", expr)}
    assert queried, "the dashboard queries no gpu-fabric metric"
    exported = (await scrape(stack.http_url)).families
    missing = sorted(name for name in queried if _family(name) not in exported)
    assert not missing, f"the dashboard queries metrics the gateway does not export: {missing}"


def _family(sample: str) -> str:
    for suffix in SUFFIXES:
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample

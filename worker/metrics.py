"""A worker process's own metrics (`--metrics-port`, `GPU_WORKER_METRICS_PORT`; `sdk.metrics`): its jobs,
its capacity, its link and its models, read from the running `Worker` at each scrape, beside the process's
CPU and memory. The fleet's view of every worker (from heartbeats, with GPU telemetry) is the gateway's
`/metrics`; this one answers even while the worker cannot reach the platform."""

from __future__ import annotations

from sdk.metrics import Reading, Readings
from worker.runtime import Worker


def readings(worker: Worker) -> Readings:
    return Readings(
        Reading("gpu_worker_jobs_done", "Jobs finished and reported since the worker started", lambda: worker.jobs_done,
                kind="counter"),
        Reading("gpu_worker_jobs_in_flight", "Jobs held: running, or waiting for a free slot",
                lambda: len(worker.in_flight)),
        Reading("gpu_worker_capacity", "Jobs it may run at once (max_concurrency)", lambda: worker.config.max_concurrency),
        Reading("gpu_worker_connected", "1 while its NATS connection is up", lambda: worker.connected),
        Reading("gpu_worker_model_memory_bytes", "Memory each loaded model takes", label="model",
                read=lambda: {m.model: m.memory_bytes for m in worker.loaded_models}),
    )

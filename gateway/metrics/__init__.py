"""Prometheus metrics at `/metrics`: one scrape target for the whole fleet.

- jobs (`gateway.metrics.jobs`): by type, status and region, the queue depth, latency histograms;
- the fleet (`gateway.metrics.fleet`): each worker from its heartbeats, the scheduler leader, streams;
- HTTP: requests by route template and status, and their duration (`http_metrics`);
- this process (CPU, memory, open files), from `prometheus_client`: also served alone on the gateway's
  `--metrics-port`, like every service's own metrics (`sdk.metrics`).

`Operability` plugs it all into the litestar app (routes, middleware, a lifespan that starts the
fleet's consumers after the gateway's own; the job metrics are one of the folds the gateway's own JOBS
follower feeds, `gateway.follow`, handed to the gateway as it is made). Each app has a registry of its own, so several gateways can run in
one process (the tests do). `/metrics` needs no token, like any scrape target: it is kept out of the
API's OpenAPI document, and a deployment exposes it to its Prometheus only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar, Response, get
from litestar.config.app import AppConfig
from litestar.datastructures import State
from litestar.plugins import InitPluginProtocol
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

from gateway import dashboard
from gateway.metrics.fleet import FleetMetrics
from gateway.metrics.jobs import LATENCY_BUCKETS_S, JobMetrics

logger = logging.getLogger(__name__)


class Metrics:
    """Every metric of one gateway app, in a registry of its own."""

    def __init__(self) -> None:
        #: This process alone (CPU, memory, open files; its HTTP requests): also what `--metrics-port` serves.
        self.process = CollectorRegistry()
        ProcessCollector(registry=self.process)
        self.http_requests = Counter(
            "gf_http_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.process,
        )
        self.http_duration = Histogram(
            "gf_http_request_duration_seconds", "HTTP request duration by route template (a stream's whole life)",
            ["route", "method"], buckets=LATENCY_BUCKETS_S, registry=self.process,
        )
        #: Everything `/metrics` answers: the fleet, and this process.
        self.registry = CollectorRegistry()
        self.registry.register(self.process)
        self.jobs = JobMetrics(self.registry)
        self.fleet = FleetMetrics(self.registry)

    async def scrape(self) -> bytes:
        await self.fleet.refresh()
        return generate_latest(self.registry)


@get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response[bytes]:
    return Response(await state.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)


def http_metrics(metrics_: Metrics) -> Callable[[ASGIApp], ASGIApp]:
    """Middleware counting each request by its route template (`/api/v1/jobs/{job_id:str}`), so a
    fuzzer's random paths cannot grow the label set (unrouted paths never reach route middleware)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500  # what the server answers when the handler dies before it starts a response
            started = time.perf_counter()

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                route, method = scope.get("path_template") or scope["path"], scope["method"]
                metrics_.http_requests.labels(route, method, str(status)).inc()
                metrics_.http_duration.labels(route, method).observe(time.perf_counter() - started)

        return wrapped

    return middleware


class Operability(InitPluginProtocol):
    """The litestar plugin: `/metrics`, the HTTP middleware, the consumers' lifespan, and the dashboard
    (`gateway.dashboard`: its static files and its live feed)."""

    def __init__(self) -> None:
        self.metrics = Metrics()

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.extend([metrics, *dashboard.ROUTES])
        app_config.middleware.append(http_metrics(self.metrics))
        app_config.lifespan.append(self._lifespan)
        return app_config

    @asynccontextmanager
    async def _lifespan(self, app: Litestar) -> AsyncIterator[None]:
        # Runs after the app's own lifespan entered, so the gateway (and its NATS connection) exists.
        app.state.metrics = self.metrics
        await self.metrics.fleet.start(app.state.gateway.js)
        logger.info("metrics at /metrics: following HEARTBEATS (and JOBS, through the gateway's follower)")
        try:
            yield
        finally:
            await self.metrics.fleet.stop()

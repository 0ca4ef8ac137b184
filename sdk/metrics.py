"""A service's own metrics, on an optional port of its own (`--metrics-port`, `GF_METRICS_PORT`).

The gateway's `/metrics` is the fleet's one scrape target (jobs, workers, streams, all folded from the log).
This is the other half: each process (gateway, scheduler, projections, gpu-worker) can also serve its
own process metrics (CPU, memory, open files, garbage collection, from `prometheus_client`) and what only
it knows (a scheduler's leadership and assignments, a projection's applied positions, a worker's jobs),
so an operator sees a process that is slow or leaking, not only the fleet it serves.

Off unless a port is given. The server is prometheus-client's own (a thread), bound to 127.0.0.1 unless
`--metrics-host` / `GF_METRICS_HOST` says otherwise (a container binds 0.0.0.0). Live values are read at
each scrape (`Readings`), so the services keep no second copy of their state for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

from cyclopts import Parameter, validators
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sdk.errors import BadRequest

logger = logging.getLogger(__name__)

DEFAULT_METRICS_HOST = "127.0.0.1"

#: The flags every service's command line takes.
MetricsPortFlag = Annotated[
    int | None,
    Parameter(
        env_var="GF_METRICS_PORT", validator=validators.Number(gte=1, lte=65535),
        help="Serve this process's own metrics (Prometheus text at /metrics) on this port (default: off).",
    ),
]
MetricsHostFlag = Annotated[
    str, Parameter(env_var="GF_METRICS_HOST", help="The address the metrics port binds (0.0.0.0 in a container).")
]


@dataclass(frozen=True)
class Reading:
    """One metric read from a live object at each scrape."""

    name: str
    help: str
    #: The value; with a `label`, the value per label value.
    read: Callable[[], float | Mapping[str, float]]
    label: str | None = None
    kind: Literal["gauge", "counter"] = "gauge"


class Readings(Collector):
    """Collects `Reading`s: a service's state as gauges and counters, without keeping a copy of it."""

    def __init__(self, *readings: Reading) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        for reading in self._readings:
            family_type = CounterMetricFamily if reading.kind == "counter" else GaugeMetricFamily
            value = reading.read()
            if reading.label is None:
                assert not isinstance(value, Mapping)
                yield family_type(reading.name, reading.help, value=value)
                continue
            assert isinstance(value, Mapping)
            family = family_type(reading.name, reading.help, labels=[reading.label])
            for label_value, sample in value.items():
                family.add_metric([label_value], sample)
            yield family


@contextmanager
def metrics_endpoint(
    port: int | None,
    *collectors: Collector,
    host: str = DEFAULT_METRICS_HOST,
    registry: CollectorRegistry = REGISTRY,
) -> Iterator[int | None]:
    """Serve `registry` (this process's metrics, by default) with `collectors` added, on `host:port` for the
    block; nothing when `port` is None. Yields the port. A port in use is a `BadRequest` naming it."""
    if port is None:
        yield None
        return
    for collector in collectors:
        registry.register(collector)
    try:
        try:
            server, thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise BadRequest(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        logger.info("this process's metrics at http://%s:%d/metrics", host, port)
        try:
            yield port
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
    finally:
        for collector in collectors:
            registry.unregister(collector)

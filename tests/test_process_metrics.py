"""A process's own metrics port (`sdk.metrics`): what it serves, that a port in use is one clear error,
and that it is gone after the block. Each service's port, end to end, is scraped in tests/test_compose.py."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sdk.broker import free_port
from sdk.connection import port_open
from sdk.errors import BadRequest
from sdk.metrics import Reading, Readings, metrics_endpoint


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class Live:
    """A service's state, as its readings see it."""

    def __init__(self) -> None:
        self.done = 1
        self.positions: dict[str, float] = {"JOBS": 3}


def test_a_process_serves_its_live_readings_beside_its_process_metrics() -> None:
    live = Live()
    readings = Readings(
        Reading("demo_jobs_done", "jobs done", lambda: live.done, kind="counter"),
        Reading("demo_applied_seq", "positions", label="stream", read=lambda: live.positions),
    )
    port = free_port()
    with metrics_endpoint(port, readings) as served:
        assert served == port
        live.done, live.positions = 5, {"JOBS": 7, "WORKERS": 2}  # read at the scrape, not before
        samples = scrape(port)
        assert samples["demo_jobs_done_total"] == 5
        assert (samples["demo_applied_seq{stream=JOBS}"], samples["demo_applied_seq{stream=WORKERS}"]) == (7, 2)
        assert samples["process_resident_memory_bytes"] > 0

        with pytest.raises(BadRequest, match=f"cannot serve metrics on 127.0.0.1:{port}: "):
            with metrics_endpoint(port):
                pass
    assert not port_open("127.0.0.1", port)
    # Its readings left the registry with it: the same names can be served again.
    with metrics_endpoint(free_port(), readings):
        pass


def test_no_port_serves_nothing() -> None:
    with metrics_endpoint(None, Readings()) as served:
        assert served is None

"""Fleet metrics: each worker from its latest heartbeat (worker, region and GPU labels), the scheduler
leader from its lease, and each stream's end and its slowest follower's backlog (the projections'
and schedulers' lag among them).

Heartbeats arrive on an ordered consumer that starts at the last one of each worker. The lease and the
streams are read when Prometheus scrapes (`refresh`), a few cheap JetStream requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import Error as JetStreamError
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sdk import subjects
from sdk.events import Heartbeat, heartbeat_decoder

logger = logging.getLogger(__name__)

STREAMS = (subjects.JOBS_STREAM, subjects.WORKERS_STREAM, subjects.HEARTBEATS_STREAM, subjects.DISPATCH_STREAM)
#: A worker silent for this many of its own intervals is reported down (the scheduler's rule is 3).
MISSED_BEATS = 3
#: A worker silent this long leaves the metrics (its series would only repeat stale values).
FORGET_AFTER_S = 600.0
#: How long a scrape waits for JetStream before it reports what it has.
SCRAPE_TIMEOUT_S = 2.0


class FleetMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._beats: dict[str, Heartbeat] = {}
        self._streams: dict[str, tuple[int, int]] = {}
        self._leader: str | None = None
        self._nats_up = False
        self._sub: Subscription | None = None
        self._js: JetStreamContext | None = None
        registry.register(self)

    async def start(self, js: JetStreamContext) -> None:
        self._js = js
        self._sub = await js.subscribe(
            subjects.HEARTBEATS_SUBJECTS, stream=subjects.HEARTBEATS_STREAM, ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, cb=self._on_beat,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = heartbeat_decoder.decode(msg.data)
        except Exception as exc:  # a malformed heartbeat must not stop the metrics
            logger.warning("metrics: undecodable heartbeat on %s: %s", msg.subject, exc)
            return
        known = self._beats.get(beat.worker_id)
        if known is None or known.at_ms <= beat.at_ms:
            self._beats[beat.worker_id] = beat

    async def refresh(self) -> None:
        """Read the lease and the streams for this scrape; NATS down is a metric, not an error."""
        assert self._js is not None
        try:
            await asyncio.wait_for(self._read(self._js), SCRAPE_TIMEOUT_S)
            self._nats_up = True
        except (NatsError, JetStreamError, TimeoutError) as exc:
            logger.warning("metrics: JetStream did not answer the scrape: %r", exc)
            self._nats_up = False

    async def _read(self, js: JetStreamContext) -> None:
        kv = await js.key_value(subjects.SCHEDULER_LEASE_BUCKET)
        try:
            entry = await kv.get(subjects.SCHEDULER_LEASE_KEY)
            self._leader = (entry.value or b"").decode() or None
        except JetStreamError:  # no key: no leader (the lease expired or was handed over)
            self._leader = None
        streams: dict[str, tuple[int, int]] = {}
        for stream in STREAMS:
            info = await js.stream_info(stream)
            pending = [c.num_pending or 0 for c in await js.consumers_info(stream)]
            streams[stream] = (info.state.last_seq, max(pending, default=0))
        self._streams = streams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now_ms = time.time() * 1000
        for worker_id in [w for w, b in self._beats.items() if now_ms - b.at_ms > FORGET_AFTER_S * 1000]:
            del self._beats[worker_id]
        yield from self._workers(now_ms)
        up = GaugeMetricFamily("gf_nats_up", "1 when JetStream answered the last scrape")
        up.add_metric([], 1 if self._nats_up else 0)
        yield up
        leader = GaugeMetricFamily("gf_scheduler_leader", "1 for the scheduler that holds the lease", labels=["holder"])
        if self._leader:
            leader.add_metric([self._leader], 1)
        yield leader
        last = GaugeMetricFamily("gf_stream_last_seq", "The sequence of a stream's newest message", labels=["stream"])
        lag = GaugeMetricFamily(
            "gf_stream_consumer_lag", "Messages the slowest consumer of a stream has yet to receive (projections, "
            "schedulers, gateways, a worker's dispatch)", labels=["stream"],
        )
        for stream, (seq, pending) in sorted(self._streams.items()):
            last.add_metric([stream], seq)
            lag.add_metric([stream], pending)
        yield last
        yield lag

    def _workers(self, now_ms: float) -> Iterator[GaugeMetricFamily]:
        worker = ["worker", "region"]
        gpu = [*worker, "gpu", "gpu_name"]
        families = {
            "up": GaugeMetricFamily("gf_worker_up", "1 while the worker's heartbeats arrive on time", labels=worker),
            "age": GaugeMetricFamily("gf_worker_heartbeat_age_seconds", "Since the last heartbeat", labels=worker),
            "in_flight": GaugeMetricFamily("gf_worker_jobs_in_flight", "Jobs the worker runs now", labels=worker),
            "capacity": GaugeMetricFamily("gf_worker_capacity", "Jobs the worker runs at once", labels=worker),
            "models": GaugeMetricFamily(
                "gf_worker_model_loaded", "1 for each model the worker has loaded", labels=[*worker, "model"]
            ),
            "util": GaugeMetricFamily("gf_worker_gpu_utilization_percent", "GPU utilisation", labels=gpu),
            "used": GaugeMetricFamily("gf_worker_gpu_memory_used_bytes", "GPU memory in use", labels=gpu),
            "total": GaugeMetricFamily("gf_worker_gpu_memory_total_bytes", "GPU memory in all", labels=gpu),
            "temp": GaugeMetricFamily("gf_worker_gpu_temperature_celsius", "GPU temperature", labels=gpu),
            "power": GaugeMetricFamily("gf_worker_gpu_power_watts", "GPU power draw", labels=gpu),
        }
        for worker_id, beat in sorted(self._beats.items()):
            labels = [worker_id, beat.region]
            age_s = max(now_ms - beat.at_ms, 0) / 1000
            families["up"].add_metric(labels, 1 if age_s <= MISSED_BEATS * beat.interval_s else 0)
            families["age"].add_metric(labels, age_s)
            families["in_flight"].add_metric(labels, len(beat.in_flight))
            families["capacity"].add_metric(labels, beat.max_concurrency)
            for model in beat.loaded_models:
                families["models"].add_metric([*labels, model], 1)
            for card in beat.gpus:
                card_labels = [*labels, str(card.index), card.name]
                families["used"].add_metric(card_labels, card.memory_used_bytes)
                families["total"].add_metric(card_labels, card.memory_total_bytes)
                for key, value in (("util", card.utilization_pct), ("temp", card.temperature_c), ("power", card.power_w)):
                    if value is not None:
                        families[key].add_metric(card_labels, value)
        yield from families.values()

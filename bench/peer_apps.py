"""The no-op task of `bench.peers`, as Celery and taskiq run it: imported by their worker processes.

Each app reads where its broker is from the environment, which `bench.peers` sets for the workers it
starts and for itself. Both are set up as their documentation's production examples are: Celery with
Redis as broker and result backend, late acks (a task is acked after it ran, as the platform acks a
dispatch after its outcome is reported); taskiq with a JetStream pull consumer (its default ack: after
the task ran) and results in Redis (taskiq-nats's object-store backend creates a consumer per poll and
runs into the server's consumer limit within a burst).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from taskiq_nats import PullBasedJetStreamBroker
from taskiq_redis import RedisAsyncResultBackend

#: Where the peers' brokers listen (set by `bench.peers` for its children).
REDIS_URL_ENV = "BENCH_REDIS_URL"
PEER_NATS_URL_ENV = "BENCH_PEER_NATS_URL"

_redis_url = os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0")
celery_app = Celery("bench", broker=_redis_url, backend=_redis_url)
celery_app.conf.update(
    task_acks_late=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@celery_app.task(name="echo")
def celery_echo(params: dict[str, Any]) -> dict[str, Any]:
    return params


_nats_url = os.environ.get(PEER_NATS_URL_ENV, "nats://127.0.0.1:4222")
taskiq_broker = PullBasedJetStreamBroker(servers=[_nats_url], queue="bench-echo").with_result_backend(
    RedisAsyncResultBackend(_redis_url)
)


def configure(redis_url: str, nats_url: str) -> None:
    """Point this process's clients at the brokers (the workers read the environment at import)."""
    celery_app.conf.broker_url = celery_app.conf.result_backend = redis_url
    taskiq_broker.servers[:] = [nats_url]
    taskiq_broker.with_result_backend(RedisAsyncResultBackend(redis_url))


@taskiq_broker.task(task_name="echo")
async def taskiq_echo(params: dict[str, Any]) -> dict[str, Any]:
    return params

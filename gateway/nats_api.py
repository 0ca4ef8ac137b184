"""The gateway's NATS endpoints (`api.>`), for the SDK and for workers.

Each request is decoded into its struct, handled in its own task (a subscription's callbacks run one
at a time, and one slow request must not hold up the others), and always answered: a reply struct or
a structured `ErrorReply`, never silence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.service import Gateway
from sdk import subjects
from sdk.api import (
    CancelJob,
    GetJob,
    GetResult,
    GetWorker,
    GetWorkerConfig,
    JobEventsRequest,
    ListJobs,
    ListWorkers,
    RegisterWorker,
    SetWorkerConfig,
    SubmitJob,
    WaitJob,
    WorkerReport,
    decode,
)
from sdk.connection import encode_error
from sdk.errors import PlatformError
from sdk.events import Heartbeat, encoder

logger = logging.getLogger(__name__)

Handler = Callable[[Msg], Awaitable[Any]]


class NatsApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        g = self.gateway
        routes: dict[str, Handler] = {
            subjects.API_JOBS_SUBMIT: lambda m: g.submit(decode(m.data, SubmitJob)),
            subjects.API_JOBS_GET: lambda m: g.get(decode(m.data, GetJob)),
            subjects.API_JOBS_LIST: lambda m: g.list(decode(m.data, ListJobs)),
            subjects.API_JOBS_CANCEL: lambda m: g.cancel(decode(m.data, CancelJob)),
            subjects.API_JOBS_EVENTS: lambda m: g.events(decode(m.data, JobEventsRequest).id),
            subjects.API_JOBS_WAIT: self._wait,
            subjects.API_JOBS_RESULT: self._result,
            subjects.API_WORKERS_LIST: lambda m: g.workers(decode(m.data, ListWorkers)),
            subjects.API_WORKERS_GET: lambda m: g.worker(decode(m.data, GetWorker).id),
            subjects.API_WORKERS_REGISTER: lambda m: g.register(decode(m.data, RegisterWorker)),
            subjects.API_WORKERS_CONFIG_GET: lambda m: g.get_config(decode(m.data, GetWorkerConfig).id),
            subjects.API_WORKERS_CONFIG_SET: self._set_config,
            f"{subjects.API_WORKERS_REPORT_PREFIX}.*": self._report,
            f"{subjects.API_WORKERS_HEARTBEAT_PREFIX}.*": self._heartbeat,
        }
        for subject, handler in routes.items():
            sub = await g.nc.subscribe(subject, queue=subjects.API_QUEUE, cb=self._spawn(handler))
            self._subs.append(sub)
        logger.info("gateway answering %d NATS endpoints", len(routes))

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def _spawn(self, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            task = asyncio.get_running_loop().create_task(self._answer(msg, handler))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_msg

    async def _answer(self, msg: Msg, handler: Handler) -> None:
        try:
            answer = await handler(msg)
            reply = answer if isinstance(answer, bytes) else encoder.encode(answer)
        except PlatformError as exc:
            reply = encode_error(exc.to_reply())
        except Exception as exc:
            logger.exception("%s failed", msg.subject)
            reply = encode_error(PlatformError(f"internal error: {type(exc).__name__}").to_reply())
        if msg.reply:
            await msg.respond(reply)

    async def _wait(self, msg: Msg) -> Any:
        req = decode(msg.data, WaitJob)
        return await self.gateway.wait(req.id, req.timeout_s)

    async def _result(self, msg: Msg) -> bytes:
        data, _ = await self.gateway.result(decode(msg.data, GetResult))
        return data

    async def _set_config(self, msg: Msg) -> Any:
        req = decode(msg.data, SetWorkerConfig)
        return await self.gateway.set_config(req.id, req.changes)

    async def _report(self, msg: Msg) -> Any:
        worker_id = msg.subject.rsplit(".", 1)[1]
        return await self.gateway.report(worker_id, decode(msg.data, WorkerReport))

    async def _heartbeat(self, msg: Msg) -> Any:
        worker_id = msg.subject.rsplit(".", 1)[1]
        return await self.gateway.heartbeat(worker_id, decode(msg.data, Heartbeat))

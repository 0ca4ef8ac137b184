"""The gateway's NATS endpoints (`api.>`), for the SDK and for workers.

Each request is decoded into its struct and handled by `sdk.endpoints.Endpoints`: in a task of its own,
always answered (a reply struct or a structured `ErrorReply`, never silence), at most `max_in_flight`
handlers of one endpoint at once, so a flood costs memory in proportion to the bound, not to the flood,
and long polls on one endpoint (`api.jobs.wait`) never take the slots of another (worker reports).

Every request is authenticated before its body is decoded, one way per endpoint:
- `api.auth.*`: none (the body carries the API key or refresh token);
- `api.jobs.*`, `api.direct.*`: the access token in the `Authorization` header; a client sees its own
  jobs and sessions only (`api.jobs.stream` answers several messages: the checked text chunks, then the job);
- `api.workers.list|get|config.set`: an operator's access token;
- `api.workers.report|heartbeat|rotate|result.<worker_id>`: the worker's signature (`sdk.signing`);
- `api.workers.register`: an enrollment token in the body (new worker) or the worker's signature;
- `api.workers.config.get`: an operator's token, or the signature of the worker it is about.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg

from gateway.access import job_scope, require_client, require_operator
from gateway.auth import Principal
from gateway.results import decode_upload
from gateway.service import Gateway
from sdk import subjects
from sdk.api import (
    MAX_UPLOAD_BODY_BYTES,
    CancelJob,
    GetJob,
    GetResult,
    GetWorker,
    GetWorkerConfig,
    IssueTokens,
    JobEventsRequest,
    ListJobs,
    ListWorkers,
    RefreshTokens,
    RegisterWorker,
    RotateCredentials,
    SetWorkerConfig,
    StreamChunk,
    SubmitJob,
    WaitJob,
    WorkerReport,
    decode,
)
from sdk.direct import OpenSession, SessionRef
from sdk.endpoints import MAX_IN_FLIGHT, STREAMED, Endpoints, Handler
from sdk.errors import BadRequest
from sdk.events import Heartbeat, encoder
from sdk.placement import ExplainPlacement
from sdk.signing import MAX_SIGNED_BODY_BYTES, SIGNATURE_HEADER, AuthReason, forbidden

logger = logging.getLogger(__name__)

class NatsApi:
    def __init__(self, gateway: Gateway, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.gateway = gateway
        self._endpoints = Endpoints(gateway.nc, queue=subjects.API_QUEUE, name="gateway", max_in_flight=max_in_flight)

    async def start(self) -> None:
        g = self.gateway
        routes: dict[str, Handler] = {
            subjects.API_AUTH_TOKEN: lambda m: g.issue_tokens(decode(m.data, IssueTokens)),
            subjects.API_AUTH_REFRESH: lambda m: g.refresh_tokens(decode(m.data, RefreshTokens)),
            subjects.API_JOBS_SUBMIT: self._as_client(lambda m, p: g.submit(decode(m.data, SubmitJob), p.subject)),
            subjects.API_JOBS_GET: self._as_client(lambda m, p: g.get(decode(m.data, GetJob), job_scope(p))),
            subjects.API_JOBS_LIST: self._as_client(lambda m, p: g.list(decode(m.data, ListJobs), job_scope(p))),
            subjects.API_JOBS_CANCEL: self._as_client(lambda m, p: g.cancel(decode(m.data, CancelJob), job_scope(p))),
            subjects.API_JOBS_EVENTS: self._as_client(
                lambda m, p: g.events(decode(m.data, JobEventsRequest).id, job_scope(p))
            ),
            subjects.API_JOBS_WAIT: self._as_client(self._wait),
            subjects.API_JOBS_RESULT: self._as_client(self._result),
            subjects.API_JOBS_PLACEMENT: self._as_client(
                lambda m, p: g.placement(decode(m.data, ExplainPlacement).id, job_scope(p))
            ),
            subjects.API_JOBS_STREAM: self._as_client(self._stream),
            subjects.API_DIRECT_OPEN: self._as_client(lambda m, p: g.open_session(decode(m.data, OpenSession), p.subject)),
            subjects.API_DIRECT_CLOSE: self._as_client(
                lambda m, p: g.close_session(decode(m.data, SessionRef).id, job_scope(p), p.subject)
            ),
            subjects.API_WORKERS_LIST: self._as_operator(lambda m: g.workers(decode(m.data, ListWorkers))),
            subjects.API_WORKERS_GET: self._as_operator(lambda m: g.worker(decode(m.data, GetWorker).id)),
            subjects.API_WORKERS_REGISTER: self._register,
            subjects.API_WORKERS_CONFIG_GET: self._get_config,
            subjects.API_WORKERS_CONFIG_SET: self._as_operator(self._set_config),
            subjects.WORKER_REPORTS.each: self._signed(
                lambda m, worker_id: g.report(worker_id, decode(m.data, WorkerReport))
            ),
            subjects.WORKER_HEARTBEATS.each: self._signed(
                lambda m, worker_id: g.heartbeat(worker_id, decode(m.data, Heartbeat))
            ),
            subjects.WORKER_ROTATIONS.each: self._signed(self._rotate),
            subjects.WORKER_RESULTS.each: self._signed(
                lambda m, worker_id: g.store_result(worker_id, decode_upload(m.data)), MAX_UPLOAD_BODY_BYTES
            ),
        }
        await self._endpoints.serve(routes)

    async def stop(self) -> None:
        """Take no more requests; those in flight get 5 s (a wait is answered at once on shutdown)."""
        await self._endpoints.stop(grace_s=5)

    # --- Authentication, once per request, before the body is decoded -----------------------------

    def _principal(self, msg: Msg) -> Principal:
        return self.gateway.authenticate((msg.headers or {}).get(subjects.AUTH_HEADER))

    def _as_client(self, handle: Callable[[Msg, Principal], Awaitable[Any]]) -> Handler:
        async def handler(msg: Msg) -> Any:
            return await handle(msg, require_client(self._principal(msg)))

        return handler

    def _as_operator(self, handle: Handler) -> Handler:
        async def handler(msg: Msg) -> Any:
            require_operator(self._principal(msg))
            return await handle(msg)

        return handler

    def _signed(self, handle: Callable[[Msg, str], Awaitable[Any]], max_body_bytes: int = MAX_SIGNED_BODY_BYTES) -> Handler:
        async def handler(msg: Msg) -> Any:
            worker_id = await self.gateway.credentials.verify_report(
                msg.subject, msg.data, msg.headers, reply=msg.reply, max_body_bytes=max_body_bytes
            )
            return await handle(msg, worker_id)

        return handler

    async def _signed_by(self, msg: Msg) -> str | None:
        """The worker that signed `msg`, or None when it carries no signature."""
        if not (msg.headers or {}).get(SIGNATURE_HEADER):
            return None
        return await self.gateway.credentials.verify_signed(msg.subject, msg.data, msg.headers, reply=msg.reply)

    # --- Handlers --------------------------------------------------------------------------------

    async def _wait(self, msg: Msg, principal: Principal) -> Any:
        req = decode(msg.data, WaitJob)
        return await self.gateway.wait(req.id, req.timeout_s, job_scope(principal))

    async def _result(self, msg: Msg, principal: Principal) -> bytes:
        data, _ = await self.gateway.result(decode(msg.data, GetResult), job_scope(principal))
        return data

    async def _stream(self, msg: Msg, principal: Principal) -> Any:
        """The job's checked text chunks to the requester's inbox, then the job (`STREAM_END_HEADER`)."""
        req = decode(msg.data, WaitJob)
        if not msg.reply:
            raise BadRequest(f"{subjects.API_JOBS_STREAM} needs a reply subject to stream to")
        pieces = await self.gateway.stream(req.id, job_scope(principal), req.timeout_s)
        offset = 0
        async for item in pieces:
            if isinstance(item, str):
                await self.gateway.nc.publish(msg.reply, encoder.encode(StreamChunk(offset=offset, text=item)))
                offset += len(item)
            else:
                end = {subjects.STREAM_END_HEADER: "1"}
                await self.gateway.nc.publish(msg.reply, encoder.encode(item), headers=end)
        return STREAMED

    async def _register(self, msg: Msg) -> Any:
        returning = await self._signed_by(msg)
        return await self.gateway.register(decode(msg.data, RegisterWorker), returning)

    async def _get_config(self, msg: Msg) -> Any:
        worker_id = await self._signed_by(msg)
        if worker_id is None:
            require_operator(self._principal(msg))
        req = decode(msg.data, GetWorkerConfig)
        if worker_id not in (None, req.id):
            raise forbidden(AuthReason.WORKER_MISMATCH, f"worker {worker_id} cannot read the config of {req.id}")
        return await self.gateway.get_config(req.id)

    async def _set_config(self, msg: Msg) -> Any:
        req = decode(msg.data, SetWorkerConfig)
        return await self.gateway.set_config(req.id, req.changes.changes())

    async def _rotate(self, msg: Msg, worker_id: str) -> Any:
        decode(msg.data, RotateCredentials)
        return await self.gateway.rotate(worker_id)

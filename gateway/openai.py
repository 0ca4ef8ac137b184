"""The OpenAI-compatible API under `/v1`, the part beside its routes (`gateway.http.openai`): the official
`openai` client works unchanged against the platform.

Every request is a job like any other (`llm`, `embedding`, `image`), owned by the caller's API key, so
history, cancel, placement and replay apply. A non-streamed request waits for its job and answers OpenAI's
shape; a streamed one relays the job's token stream as OpenAI chunks and ends with `data: [DONE]`. A
client that goes away before its job ends cancels the job. docs/openai.md shows the client side.

Auth: `Authorization: Bearer` takes an access token, as everywhere, or an API key itself (what the `openai`
client sends). A key is exchanged for an access token once and the token is reused until it lapses, so a
request costs a signature check, not a bucket read; a revoked key fails at once (the revocation covers
its tokens). Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.response import ServerSentEvent

from gateway import openai_wire as wire
from gateway.access import job_scope, require_client
from gateway.auth import Principal
from gateway.auth.tokens import API_KEY_PREFIX
from gateway.jobs import MAX_WAIT_S
from gateway.service import Gateway
from sdk import subjects
from sdk.api import CancelJob, JobView, ListWorkers
from sdk.errors import HTTP_STATUS, PlatformError, Timeout, Unauthorized

logger = logging.getLogger(__name__)
_json = msgspec.json.Encoder()
T = TypeVar("T")

#: API keys whose access token the gateway keeps; the least recently used goes first.
MAX_CACHED_KEYS = 1024
#: How long `/v1/models` and the model check reuse one look at the fleet.
CATALOG_TTL_S = 2.0
#: Job failures that are the request's fault, as OpenAI's status and code.
JOB_ERRORS = {"model_load_failed": (404, "model_not_found"), "bad_params": (400, "invalid_request_error")}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist or no worker serves it", "model_not_found", "model")


# --- Auth ----------------------------------------------------------------------------------------


class ApiKeySessions:
    """An access token per API key, issued on first use and again once it lapses."""

    def __init__(self) -> None:
        # Keyed by the key's hash: the plaintext key is never kept.
        self._tokens: OrderedDict[str, str] = OrderedDict()

    async def principal(self, gateway: Gateway, api_key: str) -> Principal:
        slot = hashlib.sha256(api_key.encode()).hexdigest()
        if (token := self._tokens.get(slot)) is not None:
            try:
                principal = gateway.credentials.verify_access(token)
                self._tokens.move_to_end(slot)
                return principal
            except Unauthorized:
                del self._tokens[slot]  # expired or revoked: exchange the key again, which checks it
        pair = await gateway.credentials.issue_tokens(api_key)
        self._tokens[slot] = pair.access_token
        while len(self._tokens) > MAX_CACHED_KEYS:
            self._tokens.popitem(last=False)
        return gateway.credentials.verify_access(pair.access_token)


async def provide_openai_principal(request: Request[Any, Any, Any], state: State) -> Principal:
    gateway: Gateway = state.gateway
    header = request.headers.get(subjects.AUTH_HEADER) or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip().startswith(API_KEY_PREFIX):
        sessions: ApiKeySessions = state.setdefault("openai_sessions", ApiKeySessions())
        return require_client(await sessions.principal(gateway, token.strip()))
    return require_client(gateway.authenticate(header or None))


# --- The fleet's models --------------------------------------------------------------------------


class Served(msgspec.Struct, kw_only=True):
    #: Each model loaded on, or allowed by, a live worker, with the job types those workers run.
    models: dict[str, set[str]]
    #: Job types some live worker runs for any model (it has no allow-list).
    any_model: set[str]
    at_s: float

    def require(self, model: str, job_type: str) -> None:
        if job_type not in self.models.get(model, set()) and job_type not in self.any_model:
            raise model_not_found(model)


async def served_models(state: State) -> Served:
    """What the live workers serve, from the workers' read model and their runtime config."""
    cached: Served | None = state.get("openai_served")
    if cached is not None and time.monotonic() - cached.at_s < CATALOG_TTL_S:
        return cached
    gateway: Gateway = state.gateway
    models: dict[str, set[str]] = {}
    any_model: set[str] = set()
    for worker in (await gateway.workers(ListWorkers(status="online"))).items:
        allowed = (await gateway.get_config(worker.id)).effective.models
        if not allowed:
            any_model.update(worker.capabilities)
        for name in [*worker.loaded_models, *allowed]:
            models.setdefault(name, set()).update(worker.capabilities)
    served = Served(models=models, any_model=any_model, at_s=time.monotonic())
    state["openai_served"] = served
    return served


# --- Running a request as a job ------------------------------------------------------------------


class Call:
    """One request's job: submitted for the caller, awaited, and cancelled if the caller leaves."""

    def __init__(self, gateway: Gateway, principal: Principal, request: Request[Any, Any, Any]) -> None:
        self.gateway, self.request = gateway, request
        self.owner = require_client(principal).subject
        self.scope = job_scope(principal)
        self.job_id: str | None = None

    async def submit(
        self, served: Served, job_type: str, req: wire.PlatformFields, model: str, params: Callable[[], dict[str, Any]]
    ) -> str:
        """Submit the job; `params` are built once the model is known to be served (an unknown model is a
        404 whatever else is wrong)."""
        served.require(model, job_type)
        submitted = await self.gateway.submit(wire.submit_job(job_type, req, model, params()), self.owner)
        self.job_id = submitted.id
        logger.info("openai %s request is job %s (%s)", job_type, submitted.id, model)
        return submitted.id

    async def finished(self) -> JobView:
        """The completed job; a failed one raises its error, a client that leaves cancels it."""
        assert self.job_id is not None
        try:
            job = await self.until_disconnect(self.gateway.wait(self.job_id, MAX_WAIT_S, self.scope))
        except Timeout:
            await self.cancel(f"not finished within {MAX_WAIT_S:.0f}s; nobody waits for it any more")
            raise
        return completed(job)

    async def until_disconnect(self, work: Awaitable[T]) -> T:
        """`work`'s result; if the client disconnects first, the job is cancelled and `work` dropped."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self._disconnected())
        try:
            await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            await self.cancel("the client disconnected")
            raise OpenAIError(499, "the client disconnected; the job was cancelled", "client_disconnected")
        return task.result()

    async def cancel(self, reason: str) -> None:
        assert self.job_id is not None
        try:
            await self.gateway.cancel(CancelJob(id=self.job_id, reason=reason), self.scope)
            logger.info("job %s cancelled: %s", self.job_id, reason)
        except PlatformError as exc:  # it finished meanwhile: nothing left to cancel
            logger.info("job %s not cancelled (%s)", self.job_id, exc.code)

    async def _disconnected(self) -> None:
        # The body has been read: the next ASGI message is the disconnect, whenever it comes.
        while (await self.request.receive())["type"] != "http.disconnect":
            pass


_background: set[asyncio.Task[None]] = set()


def _in_background(work: Awaitable[None]) -> None:
    task = asyncio.ensure_future(work)
    _background.add(task)  # a reference, so the task is not collected before it ends
    task.add_done_callback(_background.discard)


def completed(job: JobView) -> JobView:
    if job.status == "completed":
        return job
    code = job.error.code if job.error else job.status
    message = job.error.message if job.error else f"the job ended {job.status}"
    status, openai_code = JOB_ERRORS.get(code, (502, code))
    raise OpenAIError(status, f"job {job.id}: {message}", openai_code)


async def stream_text(call: Call, model: str, chat: bool, include_usage: bool) -> ServerSentEvent:
    """The job's token stream as OpenAI chunks, then `[DONE]`; leaving early cancels the job."""
    assert call.job_id is not None
    job_id, created = call.job_id, int(time.time())
    # Subscribed now, right after the submission, before any token can be sent: the response only starts
    # once this returns, and tokens published before the subscription would arrive as one final piece.
    pieces = await call.gateway.stream(job_id, call.scope)

    async def chunks() -> AsyncIterator[str]:
        ended = False
        try:
            if chat:
                opening = wire.text_chunk(job_id, model, created, chat, "")
                opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _json.encode(opening).decode()
            async for item in pieces:
                if isinstance(item, str):
                    yield _json.encode(wire.text_chunk(job_id, model, created, chat, item)).decode()
                    continue
                ended = True
                job = completed(item)
                closing = wire.text_chunk(job_id, model, created, chat, None, job.result.get("finish_reason", "stop"))
                yield _json.encode(closing).decode()
                if include_usage:
                    yield _json.encode(wire.usage_chunk(job, created, chat)).decode()
            yield "[DONE]"
        except OpenAIError as exc:
            yield _json.encode(error_body(exc)).decode()
        except PlatformError as exc:
            ended = True
            yield _json.encode(error_body(from_platform(exc))).decode()
        finally:
            if not ended:
                # The client left and the response is being torn down (awaiting here would be cancelled
                # too): stop the work it no longer wants from a task of its own.
                _in_background(call.cancel("the client disconnected from the stream"))

    return ServerSentEvent(chunks())


# --- Errors --------------------------------------------------------------------------------------


class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(msgspec.Struct, kw_only=True):
    """Every error of the `/v1` routes, in OpenAI's shape."""

    error: OpenAIErrorDetail


def error_body(exc: OpenAIError) -> OpenAIErrorBody:
    kind = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}.get(exc.status)
    kind = kind or ("invalid_request_error" if exc.status < 500 else "server_error")
    return OpenAIErrorBody(error=OpenAIErrorDetail(message=exc.message, type=kind, param=exc.param, code=exc.code))


def from_platform(exc: PlatformError) -> OpenAIError:
    status = HTTP_STATUS.get(exc.code, 500)
    code = {401: "invalid_api_key", 404: "not_found"}.get(status, exc.code)
    param = exc.details.get("param") if isinstance(exc.details, dict) else None
    return OpenAIError(status, exc.message, code, param or wire.param_of(exc.message))

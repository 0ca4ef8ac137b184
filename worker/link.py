"""The worker's one link to the platform: its NATS connection, signed requests, token streams, result objects.

Everything the worker says to the platform goes through `PlatformLink`, so each mechanism has one place:
- `connect` opens the NATS connection (the only one the worker holds), as the worker's own NATS identity
  (`sdk.bus`: a fresh proof signed with its secret at every connect), or, before its enrollment, as a
  machine holding an enrollment token (which may only register). When the server refuses the worker's
  identity at every reconnect for `connect_wait_s` (it was revoked), the link gives up for good and
  says so (`on_identity_refused`): nats-py alone would try four times a second forever;
- `send` asks the gateway something: signed with the worker's HMAC secret once it has credentials (a new
  signature and nonce per attempt), and retried with backoff (stamina) while the gateway does not answer;
  a refusal (any other error reply) is raised at once as its typed error;
- `publish_chunk` streams a running job's output to `stream.<worker_id>.<job_id>`;
- `store_object` uploads a large result to the gateway, which stores it (`gateway.results`).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import stamina
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from sdk import bus, subjects
from sdk.api import Accepted, ResultStored, StreamChunk, UploadResult, WorkerCredentials, WorkerReport
from sdk.connection import connect, nats_url_from_env, request
from sdk.errors import Timeout, Unavailable
from sdk.events import encoder
from sdk.signing import sign

logger = logging.getLogger(__name__)

#: How long one request to the gateway may take before it counts as unanswered.
REQUEST_TIMEOUT_S = 5.0
#: Backoff between the attempts of an unanswered request: 0.1s, doubling, at most RETRY_MAX_DELAY_S.
RETRY_INITIAL_DELAY_S = 0.1
RETRY_MAX_DELAY_S = 5.0
#: The answers that mean "nobody answered" (the gateway may be restarting): the only ones retried.
UNANSWERED = (Timeout, Unavailable)

R = TypeVar("R")


@dataclass(eq=False, kw_only=True)
class PlatformLink:
    """The connection of one worker to the platform; `connect()` first, `close()` last."""

    nats_url: str | None
    #: The worker's name, in its NATS connection name (`gpu-worker-<name>`) as the server lists it.
    name: str
    tls: ssl.SSLContext | None
    connect_wait_s: float
    #: How long one request may take before it counts as unanswered.
    request_timeout_s: float = REQUEST_TIMEOUT_S
    #: Called after each reconnect (the server may have restarted and lost what lived in its memory).
    on_reconnect: Callable[[], Awaitable[None]] | None = None
    #: Called once when the server has refused this worker's identity at every reconnect for
    #: `connect_wait_s`, the same bound a first connect gets (revoked; a gateway restart is shorter).
    on_identity_refused: Callable[[], None] | None = None
    #: Called once when the NATS client closed the connection for good without being asked to (it gave up
    #: after an error during a reconnect): nothing would ever reconnect it, so only a restart helps.
    on_connection_lost: Callable[[], None] | None = None
    #: The id reports are sent as (set by the registration).
    worker_id: str | None = field(default=None, init=False)
    #: What requests are signed with; None before the first enrollment (requests go unsigned).
    credentials: WorkerCredentials | None = field(default=None, init=False)
    _nc: NatsClient | None = field(default=None, init=False)
    _js: JetStreamContext | None = field(default=None, init=False)
    #: Whether the connection is an enrolling machine's (it may only register).
    enrolling: bool = field(default=False, init=False)
    #: Since when reconnects have been refused (monotonic seconds); None while none is.
    _refused_since: float | None = field(default=None, init=False)
    #: Set once the refusal lasted `connect_wait_s`: the link no longer expects to get back.
    identity_refused: bool = field(default=False, init=False)
    #: Set while `close` runs: a close asked for is not a lost connection.
    _closing: bool = field(default=False, init=False)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def refused(self) -> bool:
        """Whether the server refuses this worker's identity now: what it would report cannot arrive."""
        return self._refused_since is not None

    @property
    def nc(self) -> NatsClient:
        assert self._nc is not None, "connect() first"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "connect() first"
        return self._js

    async def connect(self, enrollment_token: str | None = None) -> None:
        """Open the worker's NATS connection (waiting up to `connect_wait_s` for the server): as this worker
        when it has credentials, else as a machine enrolling with `enrollment_token`, or as the user the
        URL names (a test's platform user). `Unauthorized` when NATS refuses the identity."""
        identity: dict[str, object] = {}
        url = nats_url_from_env(self.nats_url)
        if bus.identity_needed(url) and self.credentials is not None:
            # Read at each (re)connect: after a rotation the proof is signed with the new secret.
            identity = bus.worker_options(self.credentials.worker_id, self._current_secret)
        elif bus.identity_needed(url) and enrollment_token is not None:
            identity = bus.enrolling_options(enrollment_token)
        self.enrolling = "token" in identity and self.credentials is None
        self._nc = await connect(
            url, name=f"gpu-worker-{self.name}", tls=self.tls, wait_s=self.connect_wait_s,
            on_reconnect=self._reconnected,
            on_refused=self._refused if "token" in identity and not self.enrolling else None,
            closed_cb=self._closed,
            **identity,
        )
        self._js = self._nc.jetstream()

    async def _reconnected(self) -> None:
        self._refused_since = None
        if self.on_reconnect is not None:
            await self.on_reconnect()

    def _refused(self) -> None:
        """A reconnect was refused for the worker's credentials (the auth callout checked its proof)."""
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
            logger.warning(
                "NATS refuses this worker's identity (revoked?); giving up if it still does in %.0fs", self.connect_wait_s
            )
        elif now - self._refused_since >= self.connect_wait_s and not self.identity_refused:
            self.identity_refused = True
            if self.on_identity_refused is not None:
                self.on_identity_refused()

    async def _closed(self) -> None:
        if self._closing:
            return
        logger.error("%s: the NATS client closed the connection for good; nothing will reconnect it", self.name)
        if self.on_connection_lost is not None:
            self.on_connection_lost()

    async def reconnect_as_worker(self) -> None:
        """After the enrollment: the enrolling identity may only register; connect as the worker now."""
        await self.close()
        await self.connect()

    def _current_secret(self) -> bytes:
        assert self.credentials is not None
        return bytes.fromhex(self.credentials.hmac_secret_hex)

    async def close(self) -> None:
        """Close the connection, flushing what is still buffered (the last acks) first; idempotent."""
        if self._nc is None or self._nc.is_closed:
            return
        self._closing = True
        try:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(ConnectionError):  # a socket the server already closed (a refused reconnect)
                await self._nc.close()
        finally:
            self._closing = False

    # --- Requests -----------------------------------------------------------------------------------------

    async def send(
        self, subject: str, payload: msgspec.Struct, reply_type: type[R], *, retry_for_s: float = 0.0
    ) -> R:
        """The one way this worker asks the platform anything. Retries an unanswered request with
        exponential backoff for up to `retry_for_s` (logging each unanswered attempt); a refusal is
        raised at once as its typed error."""
        body = encoder.encode(payload)
        if retry_for_s <= 0:
            return await self._request(subject, body, reply_type)
        retries = stamina.retry_context(
            on=UNANSWERED,
            attempts=None,
            timeout=retry_for_s,
            wait_initial=RETRY_INITIAL_DELAY_S,
            wait_max=RETRY_MAX_DELAY_S,
            wait_jitter=0.0,
        )
        async for attempt in retries:
            with attempt:
                try:
                    return await self._request(subject, body, reply_type)
                except UNANSWERED as exc:
                    logger.warning("%s: %s (attempt %d; retrying for up to %.0fs)", subject, exc.message, attempt.num, retry_for_s)
                    raise
        raise AssertionError("stamina ended its retries without an answer or an error")

    async def report(self, report: WorkerReport, *, retry_for_s: float = 0.0) -> Accepted:
        """A report about a job or this worker, to `api.workers.report.<worker_id>`."""
        assert self.worker_id is not None, "register first"
        return await self.send(subjects.report_subject(self.worker_id), report, Accepted, retry_for_s=retry_for_s)

    async def _request(self, subject: str, body: bytes, reply_type: type[R]) -> R:
        assert self._nc is not None, "connect() first"
        sign_reply = None
        if self.credentials is not None:
            secret, worker_id = bytes.fromhex(self.credentials.hmac_secret_hex), self.credentials.worker_id

            def sign_reply(inbox: str) -> dict[str, str]:
                # Covers the inbox too where the answer carries credentials (`issues_credentials`).
                return sign(secret, subject, body, reply=inbox, worker_id=worker_id)

        reply: R = await request(
            self._nc, subject, body, reply_type, timeout_s=self.request_timeout_s, sign_reply=sign_reply
        )
        return reply

    # --- What running jobs send -------------------------------------------------------------------------

    async def publish_chunk(self, job_id: str, chunk: StreamChunk) -> None:
        """Stream a piece of a job's output to `stream.<worker_id>.<job_id>` (core NATS: not in the log)."""
        assert self._nc is not None and self.worker_id is not None, "connect() and register first"
        await self._nc.publish(subjects.stream_subject(self.worker_id, job_id), encoder.encode(chunk))

    async def store_object(self, job_id: str, attempt: int, name: str, data: bytes, content_type: str) -> str:
        """Upload a large result of the attempt this worker holds; the gateway stores it and answers its
        object name (`<job_id>/<attempt>.<n>`; `name` is the engine's, for the log)."""
        assert self.worker_id is not None, "register first"
        upload = UploadResult(job_id=job_id, attempt=attempt, content_type=content_type, data=data)  # type: ignore[arg-type]
        stored = await self.send(subjects.result_upload_subject(self.worker_id), upload, ResultStored)
        logger.info("uploaded %s as %s (%d bytes)", name, stored.object, len(data))
        return stored.object

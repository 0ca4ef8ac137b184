"""Connecting to NATS, and request-reply with typed replies and errors.

A refused first connect in nats-py prints a traceback and waits seconds, so we poll the server's port
first and pass our own callbacks; after that nats-py reconnects by itself, forever.

A URL may carry the NATS user and password (`nats://worker:secret@host:4222`); it is never logged
with them (`redact`). Processes receive such URLs through the environment (`NATS_URL`), never on a
command line, where `ps` would show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from sdk import subjects
from sdk.errors import HTTP_STATUS, ErrorReply, PlatformError, Timeout, Unauthorized, Unavailable, from_reply
from sdk.tls import context_from_env

logger = logging.getLogger(__name__)

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
#: How nats-server says it refused a connection's credentials.
AUTHORIZATION_VIOLATION = "Authorization Violation"

_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def nats_url_from_env(url: str | None = None) -> str:
    return url or os.environ.get("NATS_URL") or DEFAULT_NATS_URL


def redact(url: str) -> str:
    """`url` without user and password, for logs and screens (each server of a comma-separated list)."""
    shown = []
    for server in url.split(","):
        parsed = urlparse(server.strip() if "://" in server else f"nats://{server.strip()}")
        host = parsed.hostname or ""
        shown.append(f"{parsed.scheme}://{host}{f':{parsed.port}' if parsed.port else ''}")
    return ",".join(shown)


def with_user(url: str, user: str, password: str) -> str:
    """`nats://host:port` -> `nats://user:password@host:port` (each server of a comma-separated list)."""
    servers = []
    for server in url.split(","):
        scheme, _, rest = server.strip().rpartition("://")
        servers.append(f"{scheme or 'nats'}://{user}:{password}@{rest.rpartition('@')[2]}")
    return ",".join(servers)


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


async def wait_for_port(servers: list[str], timeout_s: float) -> None:
    """Return once one of `servers` (URLs) accepts TCP connections: in a cluster, any live node will do."""
    addresses = []
    for url in servers:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        addresses.append((parsed.hostname or "127.0.0.1", parsed.port or 4222))
    deadline = time.monotonic() + timeout_s
    while not any([await asyncio.to_thread(port_open, host, port) for host, port in addresses]):
        if time.monotonic() > deadline:
            shown = ", ".join(f"{host}:{port}" for host, port in addresses)
            raise Unavailable(f"NATS at {shown} is not reachable after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def connect(
    url: str | None = None,
    *,
    name: str,
    wait_s: float = 30.0,
    user: str | None = None,
    password: str | None = None,
    tls: Any = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_refused: Callable[[], None] | None = None,
    **options: Any,
) -> NatsClient:
    """Connect, waiting up to `wait_s` for the server to come up; reconnects forever afterwards.
    Without `tls`, the context `GF_TLS_CA` / `GF_TLS_VERIFY` ask for (see `sdk.tls`) is used.
    `on_reconnect` runs after each reconnect (the server may have restarted and lost what lived in its
    memory); it must return quickly, starting a task for anything slow. `on_refused` runs at each reconnect
    the server refuses for the connection's credentials (revoked, or the auth callout not answering):
    nats-py keeps trying every quarter second, and only the caller can tell when to give up. A repeated
    error is logged once until the connection is back, not at every try. Inboxes are the platform's
    (`_INBOX_platform`) unless `inbox_prefix` names the identity's own (`sdk.bus`)."""
    options.setdefault("inbox_prefix", subjects.PLATFORM_INBOX_PREFIX)
    url = nats_url_from_env(url)
    if tls is None:
        tls = context_from_env()
    servers = [u.strip() for u in url.split(",")]
    deadline = time.monotonic() + wait_s
    await wait_for_port(servers, wait_s)
    nc = NatsClient()
    failures: list[BaseException] = []
    #: Errors logged since the connection was last up (a refused reconnect repeats four times a second).
    logged: set[str] = set()

    async def error_cb(exc: Exception) -> None:
        if str(exc) not in logged:
            logger.warning("%s: NATS error: %s", name, exc)
        if nc.is_connected:
            return
        logged.add(str(exc))
        if not connecting.done():
            failures.append(exc)
        elif on_refused is not None and _refusal(exc):
            on_refused()

    async def disconnected_cb() -> None:
        if not (nc.is_closed or nc.is_draining):
            logger.warning("%s: disconnected from NATS", name)

    async def reconnected_cb() -> None:
        logged.clear()
        logger.info("%s: reconnected to NATS", name)
        if on_reconnect is not None:
            await on_reconnect()

    connecting = asyncio.ensure_future(nc.connect(
        servers,
        name=name,
        user=user,
        password=password,
        tls=tls,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        **options,
    ))
    # nats-py retries a failed first connect forever. Past `wait_s` (the platform's auth callout may still
    # be starting), a refusal is the caller's error (bad or revoked credentials), anything else an outage.
    while not connecting.done():
        await asyncio.wait({connecting}, timeout=0.1)
        if failures and not connecting.done() and time.monotonic() > deadline:
            connecting.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)
            if any(_refusal(failure) for failure in failures):
                raise Unauthorized(f"NATS refused the credentials of {name}")
            raise Unavailable(f"{name} could not connect to NATS within {wait_s:.0f}s: {failures[-1]!r}")
    connecting.result()
    logger.info("%s: connected to NATS at %s", name, redact(nc.connected_url.geturl() if nc.connected_url else url))
    return nc


def _refusal(exc: BaseException) -> bool:
    """Whether the server refused the connection's credentials."""
    return AUTHORIZATION_VIOLATION.lower() in str(exc).lower()


async def request(
    nc: NatsClient,
    subject: str,
    payload: Any,
    reply_type: type[T],
    *,
    timeout_s: float = 5.0,
    headers: dict[str, str] | None = None,
    sign_reply: Callable[[str], dict[str, str]] | None = None,
) -> T:
    """Send a request; return the reply as `reply_type` (`bytes`: as it came), or raise the typed error
    the other side answered. `sign_reply` makes the headers from the reply subject (a signature that
    covers where the answer goes): the request then gets an inbox of its own, known before it is sent."""
    data = payload if isinstance(payload, bytes) else _encoder.encode(payload)
    try:
        if sign_reply is None:
            msg = await nc.request(subject, data, timeout=timeout_s, headers=headers)
        else:
            msg = await _request_on_own_inbox(nc, subject, data, timeout_s, sign_reply)
    except NoRespondersError:
        raise Unavailable(f"nobody answers {subject}") from None
    except NatsTimeoutError:
        if not nc.is_connected:
            raise Unavailable(f"NATS is unreachable; {subject} got no reply") from None
        raise Timeout(f"no reply on {subject} within {timeout_s}s") from None
    return decode_reply(msg, reply_type)


async def _request_on_own_inbox(
    nc: NatsClient, subject: str, data: bytes, timeout_s: float, sign_reply: Callable[[str], dict[str, str]]
) -> Msg:
    replies = _replies.get(nc)
    if replies is None:
        replies = _replies[nc] = _Replies(nc)
    msg = await replies.request(subject, data, timeout_s, sign_reply)
    if (msg.headers or {}).get("Status") == "503":
        raise NoRespondersError
    return msg


class _Replies:
    """The replies to one connection's requests whose reply subject is known before they are sent (signed
    into them): one subscription to `<inbox>.*` for all of them, each request its own token below it. A
    subscription per request cost a SUB and an UNSUB, on the client and on the server, per signed report."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._sub: asyncio.Task[Subscription] | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._next = itertools.count()

    async def request(
        self, subject: str, data: bytes, timeout_s: float, sign_reply: Callable[[str], dict[str, str]]
    ) -> Msg:
        if self._sub is None:  # one subscription, also when the first requests come together
            self._sub = asyncio.ensure_future(self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply))
        await self._sub
        token = str(next(self._next))
        inbox = f"{self._prefix}.{token}"
        answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = answer
        try:
            await self._nc.publish(subject, data, reply=inbox, headers=sign_reply(inbox))
            return await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            del self._waiting[token]

    async def _on_reply(self, msg: Msg) -> None:
        answer = self._waiting.get(msg.subject.rpartition(".")[2])
        if answer is not None and not answer.done():  # else a late answer to a request that gave up
            answer.set_result(msg)


#: Each live connection's `_Replies` (gone with the connection).
_replies: weakref.WeakKeyDictionary[NatsClient, _Replies] = weakref.WeakKeyDictionary()


# A reply is `T | ErrorReply`. msgspec decodes a union of structs only when every member is tagged, which
# would put a tag into every reply (and every HTTP response, the same structs); so an error reply says
# what it is in its headers (the `nats.micro` convention), and the body goes to the one decoder of its type.
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_error_decoder = msgspec.json.Decoder(ErrorReply)


def reply_decoder(reply_type: type[T]) -> msgspec.json.Decoder[T]:
    """The decoder of `reply_type`, built once."""
    decoder = _decoders.get(reply_type)
    if decoder is None:
        decoder = _decoders[reply_type] = msgspec.json.Decoder(reply_type)
    return decoder


def decode_reply(msg: Msg, reply_type: type[T]) -> T:
    """`msg` as `reply_type`; the typed error (`sdk.errors`) when it is an error reply."""
    if msg.headers and subjects.ERROR_CODE_HEADER in msg.headers:
        raise from_reply(_error_decoder.decode(msg.data))
    if reply_type is bytes:
        return msg.data  # type: ignore[return-value]
    return reply_decoder(reply_type).decode(msg.data)


def error_reply(exc: PlatformError) -> tuple[bytes, dict[str, str]]:
    """The body and headers that answer a request with `exc`: an `ErrorReply`, marked as an error by its
    code and the HTTP status the gateway would give it."""
    headers = {subjects.ERROR_HEADER: exc.code, subjects.ERROR_CODE_HEADER: str(HTTP_STATUS.get(exc.code, 500))}
    return _encoder.encode(exc.to_reply()), headers

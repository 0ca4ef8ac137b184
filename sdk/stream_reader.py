"""Reading a stream from a sequence to its end, fast: batches pulled on a connection of our own.

nats-py spends about 13 µs of CPU on every message it delivers (a regex protocol parser, header parsing,
a `Msg` object, a queue and a callback per message), which was the ceiling of `gpuctl replay`
(docs/benchmarks.md, "Replaying the log"). This reader opens one more connection to the server the
nats-py client is connected to (same credentials, same TLS), creates an ephemeral pull consumer (no
acks, kept in memory), and parses the wire protocol itself: per message, one split of the control line
and one of the `$JS.ACK` reply subject, which carries the stream sequence and the messages left; headers
are never parsed. Two batch requests are outstanding at any time, so the server is sending the next
batch while this one is parsed, and memory stays bounded by them.

`read_stream` is for whole-stream reads (the rebuild of the read models); live following stays on
nats-py's ordered consumers (`projections.feed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api
from nats.nuid import NUID

from sdk.errors import Unavailable

logger = logging.getLogger(__name__)

#: Messages asked for in one pull request; two are outstanding at a time.
REQUEST_BATCH = 10_000
#: Bytes read from the socket at once: a few thousand messages parsed per call.
READ_CHUNK_BYTES = 1 << 20
#: A server that sends nothing for this long while messages are owed is not answering.
READ_IDLE_S = 10.0
#: The reader's consumer is removed by the server this long after the reader went away (a crash).
CONSUMER_INACTIVE_S = 60.0

_CRLF = b"\r\n"


class Delivered(NamedTuple):
    """One stream message, as readers of the log see it."""

    stream: str
    seq: int
    data: bytes
    #: Messages left in the stream (after this one, within the reader's filter) when it was delivered.
    pending: int


async def read_stream(
    nc: NatsClient,
    stream: str,
    last_seq: int,
    *,
    first_seq: int = 1,
    filter_subject: str | None = None,
    batch: int = REQUEST_BATCH,
    idle_s: float = READ_IDLE_S,
) -> AsyncIterator[list[Delivered]]:
    """Yield the messages of `stream` from `first_seq` up to and including `last_seq`, in order, in
    batches of about `batch`. Ends early when the stream has nothing more (messages removed by limits);
    raises `Unavailable` when the server sends nothing for `idle_s` while messages are owed."""
    if last_seq < first_seq:
        return
    js = nc.jetstream()
    consumer = f"read-{NUID().next().decode()}"
    await js.add_consumer(
        stream,
        js_api.ConsumerConfig(
            name=consumer, deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first_seq,
            ack_policy=js_api.AckPolicy.NONE, filter_subject=filter_subject, mem_storage=True,
            inactive_threshold=CONSUMER_INACTIVE_S,
        ),
    )

    async def delivered_count() -> int | None:
        info = await js.consumer_info(stream, consumer)
        return info.delivered.consumer_seq if not info.num_pending else None

    try:
        wire = await _Wire.open(nc)
        try:
            async for delivered in wire.pull(
                stream, consumer, nc.new_inbox(), last_seq, batch, idle_s, delivered_count
            ):
                yield delivered
        finally:
            await wire.close()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await js.delete_consumer(stream, consumer)


class _Wire:
    """A bare NATS connection: CONNECT as the nats-py client did, one subscription, our own parser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, nc: NatsClient) -> _Wire:
        url = nc.connected_url
        if url is None or url.hostname is None:
            raise Unavailable("not connected to NATS")
        # TLS as nats-py does it: its context (a default one unless given), the same host name to verify.
        handshake_first = nc.options["tls_handshake_first"]
        host_name = nc.options.get("tls_hostname") or url.hostname
        # The limit is StreamReader's buffer before it pauses the socket: room for a few chunks.
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 4222, limit=4 * READ_CHUNK_BYTES)
        wire = cls(reader, writer)
        try:
            if handshake_first:
                await writer.start_tls(nc.ssl_context, server_hostname=host_name)
            line = await asyncio.wait_for(reader.readline(), READ_IDLE_S)
            if not line.startswith(b"INFO "):
                raise Unavailable(f"NATS at {url.hostname} did not greet with INFO: {line[:80]!r}")
            info = json.loads(line[5:])
            if info.get("tls_required") and not handshake_first:
                await writer.start_tls(nc.ssl_context, server_hostname=host_name)
            writer.write(b"CONNECT " + json.dumps(_connect_options(nc, info)).encode() + b"\r\nPING\r\n")
            while (line := await asyncio.wait_for(reader.readline(), READ_IDLE_S)) != b"PONG\r\n":
                if line.startswith(b"-ERR") or not line:
                    raise Unavailable(f"NATS refused the stream reader's connection: {line.decode().strip()}")
        except BaseException:
            await wire.close()
            raise
        return wire

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()

    async def pull(
        self, stream: str, consumer: str, inbox_subject: str, last_seq: int, batch: int,
        idle_s: float, delivered_count: Callable[[], Awaitable[int | None]],
    ) -> AsyncIterator[list[Delivered]]:
        """Pull `consumer`'s messages up to `last_seq`. `delivered_count` asks the server
        how many messages the consumer has sent, None while it has more to send: asked when a request
        comes back empty."""
        inbox = inbox_subject.encode()
        request = (
            f"PUB $JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer} ".encode() + inbox
            + f" {len(body := json.dumps({'batch': batch, 'no_wait': True}))}\r\n{body}\r\n".encode()
        )
        self._writer.write(b"SUB " + inbox + b" 1\r\n" + request + request)
        owed = batch  # messages left to come for the oldest outstanding request
        received = 0
        buffer = b""
        while True:
            try:
                chunk = await asyncio.wait_for(self._reader.read(READ_CHUNK_BYTES), idle_s)
            except TimeoutError:
                raise Unavailable(f"{stream} sent nothing for {idle_s:g}s while reading up to #{last_seq}") from None
            if not chunk:
                raise Unavailable(f"NATS closed the connection while {stream} was read")
            buffer = buffer + chunk if buffer else chunk
            out: list[Delivered] = []
            used, statuses, pings = _parse(buffer, stream, out)
            buffer = buffer[used:]
            if pings:
                self._writer.write(b"PONG\r\n" * pings)
            # Every full batch ends a request: ask for the next one, so two stay outstanding.
            owed -= len(out)
            received += len(out)
            while owed <= 0:
                self._writer.write(request)
                owed += batch
            ended = False
            if out:
                # At the target, or nothing more in the stream (messages removed by its limits).
                ended = out[-1].seq >= last_seq or out[-1].pending == 0
                if out[-1].seq > last_seq:
                    out = [d for d in out if d.seq <= last_seq]
                if out:
                    yield out
            if ended:
                return
            for status in statuses:
                if not status.startswith((b"404", b"408")):
                    raise Unavailable(f"reading {stream}: the server answered {status.decode(errors='replace')}")
                # A request came back empty: at the stream's end, or too early (a consumer just created
                # may answer before it has counted its messages); only the server can tell which.
                delivered = await delivered_count()
                if delivered is None:
                    self._writer.write(request)
                    owed = batch
                elif received >= delivered:
                    return
                # Otherwise the rest is on its way, and its last message says so (pending 0).


def _connect_options(nc: NatsClient, info: dict[str, Any]) -> dict[str, Any]:
    """The CONNECT that nats-py sent for `nc` (its credentials, whatever the kind), for this connection."""
    options = json.loads(nc._connect_command()[len(b"CONNECT ") :])
    if "sig" in options:  # an nkey signs this connection's own nonce
        options["sig"] = nc._signature_cb(info["nonce"]).decode()
    options.update(verbose=False, pedantic=False, echo=False, headers=True, no_responders=True)
    options["name"] = f"{options.get('name') or 'nats-py'} (stream reader)"
    return options


def _parse(buffer: bytes, stream: str, out: list[Delivered]) -> tuple[int, list[bytes], int]:
    """Append the complete messages in `buffer` to `out`; return how many bytes were used, the status
    lines of status messages (`404 No Messages`), and how many PINGs to answer. The hot loop."""
    statuses: list[bytes] = []
    pings = 0
    at = 0
    size = len(buffer)
    find = buffer.find
    append = out.append
    while (eol := find(_CRLF, at)) >= 0:
        line = buffer[at:eol]
        if line.startswith(b"HMSG ") or line.startswith(b"MSG "):
            # HMSG <subject> <sid> [reply] <header bytes> <total bytes> / MSG <subject> <sid> [reply] <bytes>
            args = line.split(b" ")
            headers = line[0] == 72  # "H"
            start = eol + 2
            end = start + int(args[-1])
            if end + 2 > size:
                break  # the rest of this message is in the next chunk
            payload_at = start + int(args[-2]) if headers else start
            if len(args) == (6 if headers else 5):
                # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2 form
                # with a domain and an account hash after ACK (and maybe a random token at the end).
                tokens = args[3].split(b".")
                seq_at = 5 if len(tokens) == 9 else 7
                append(Delivered(stream, int(tokens[seq_at]), buffer[payload_at:end], int(tokens[seq_at + 3])))
            else:
                # A status message: "NATS/1.0 404 No Messages" as its header's first line.
                statuses.append(buffer[start : buffer.find(_CRLF, start)][len(b"NATS/1.0 ") :])
            at = end + 2
        elif line == b"PING":
            pings += 1
            at = eol + 2
        elif line.startswith(b"-ERR"):
            raise Unavailable(f"NATS error while reading {stream}: {line[5:].decode(errors='replace')}")
        else:  # PONG, +OK, INFO (cluster updates)
            at = eol + 2
    return at, statuses, pings

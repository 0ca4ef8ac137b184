"""Export and import of the whole log: every stream and bucket as gzip-compressed JSON lines.

`gpuctl export` and `gpuctl import` (`sdk/archive_cli.py`) run these; so does retention (the archive of
finished jobs uses the same lines). The file, one JSON object per line:

1. `{"kind": "export", "format": 1, "created_at_ms": ..., "streams": [{"name", "config", "messages",
   "first_seq", "last_seq"}, ...]}`: each stream's configuration and what it held when the export began;
2. each stream's messages in sequence order: `{"kind": "msg", "stream", "seq", "subject", "time_ns",
   "headers", "data"}` (`data` in base64, `headers` as stored, `Nats-Msg-Id` included);
3. `{"kind": "end", "messages": N}`: a file without it was cut short, and import refuses it before
   writing anything.

Reading and writing stream through bounded buffers, so memory does not grow with the log. Each stream is
exported up to its last sequence when the export began; a platform that keeps running meanwhile has
later messages, which the next export takes.

Import writes each stream's messages in their order, the streams interleaved by their original times
(one reader of the file per stream, merged), and keeps their sequence numbers: a gap (messages
that were deleted, or retention's archived jobs) is filled with empty messages on a subject of its own,
purged at the end. Equal sequences keep the read models equal (their rows carry sequences) and keep
`Nats-Expected-Last-Subject-Sequence` meaning the same. Headers are kept except `Nats-Expected-*`, which
were checks at the original write, not data. Stream timestamps are the import's (JetStream sets them);
each event's own `at_ms` is in its body.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import heapq
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from sdk import subjects
from sdk.errors import BadRequest, Conflict, Unavailable
from sdk.jobs import Job
from sdk.log import ack_fields, ensure_streams

logger = logging.getLogger(__name__)

FORMAT = 1
#: Not exported: the scheduler leader's lease (a live lock, meaningless elsewhere) and the pending
#: dispatches (derived from `JobAssigned`; the scheduler dispatches again what a worker never got).
SKIPPED_STREAMS = frozenset({f"KV_{subjects.SCHEDULER_LEASE_BUCKET}", subjects.DISPATCH_STREAM})
#: Messages held between the stream reader and the file writer.
READ_BUFFER = 5_000
#: Publishes in flight during an import before their acknowledgements are checked.
IMPORT_WINDOW = 2_000
#: How long an import waits for a message to be stored.
ACK_TIMEOUT_S = 30.0
#: A stream that delivers nothing for this long during an export is not being read.
READ_IDLE_S = 10.0
#: Gap fillers go to this token under each stream's first subject (`jobs.-gap`), then are purged.
GAP_TOKEN = "-gap"
#: The event log's streams, whose order relative to each other is kept exactly (the rest, heartbeats and
#: buckets, only approximately: interleaved by time but written pipelined).
ORDERED_ACROSS = frozenset({subjects.JOBS_STREAM, subjects.WORKERS_STREAM})
#: Headers that were controls of the original write (its expectations; the atomic batch it was part of,
#: `sdk/group_commit.py`): kept in the file, not sent again on import.
WRITE_CONTROL_PREFIXES = ("Nats-Expected-", "Nats-Batch-")


class StreamHeader(msgspec.Struct, kw_only=True):
    name: str
    config: dict[str, Any]
    messages: int
    first_seq: int
    last_seq: int


class ExportHeader(msgspec.Struct, kw_only=True, tag_field="kind", tag="export"):
    format: int
    created_at_ms: int
    streams: list[StreamHeader]


class Message(msgspec.Struct, kw_only=True, tag_field="kind", tag="msg"):
    stream: str
    seq: int
    subject: str
    time_ns: int
    headers: dict[str, str] | None = None
    data: bytes = b""


class ExportEnd(msgspec.Struct, kw_only=True, tag_field="kind", tag="end"):
    messages: int


Line = ExportHeader | Message | ExportEnd
_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(Line)

#: Told how many messages of which stream were just written or read (a progress bar).
Progress = Callable[[str, int], None]
#: Messages between two calls of a `Progress`.
PROGRESS_EVERY = 1_000


def is_bucket(stream: str) -> bool:
    """KV buckets and object stores live in streams named `KV_<bucket>` and `OBJ_<bucket>`."""
    return stream.startswith(("KV_", "OBJ_"))


# --- Export ----------------------------------------------------------------------------------------


async def export_header(js: JetStreamContext) -> ExportHeader:
    """Every stream to export, with its configuration and extent now."""
    streams = []
    for info in sorted(await js.streams_info(), key=lambda i: i.config.name or ""):
        name = info.config.name or ""
        if name in SKIPPED_STREAMS:
            continue
        state = info.state
        streams.append(
            StreamHeader(
                name=name, config=info.config.as_dict(), messages=state.messages,
                first_seq=state.first_seq, last_seq=state.last_seq if state.messages else 0,
            )
        )
    return ExportHeader(format=FORMAT, created_at_ms=time.time_ns() // 1_000_000, streams=streams)


async def read_stream(js: JetStreamContext, stream: str, last_seq: int, subject: str = ">") -> AsyncIterator[Message]:
    """The messages of `stream` (on `subject`) up to `last_seq`, in order, through an ordered consumer
    whose flow control bounds what is buffered."""
    if last_seq == 0:
        return
    queue: asyncio.Queue[Message | None] = asyncio.Queue(READ_BUFFER)

    ended = False

    async def deliver(msg: Msg) -> None:
        nonlocal ended
        if ended:
            return
        seq, time_ns, pending = ack_fields(msg.reply)
        if seq <= last_seq:
            await queue.put(Message(stream=stream, seq=seq, subject=msg.subject, time_ns=time_ns,
                                    headers=msg.headers, data=msg.data))
        if seq >= last_seq or pending == 0:
            ended = True
            await queue.put(None)

    sub = await js.subscribe(
        subject, stream=stream, cb=deliver, ordered_consumer=True,
        config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL),
    )
    try:
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), READ_IDLE_S)
            except TimeoutError:
                raise Unavailable(f"{stream} delivered nothing for {READ_IDLE_S:g}s before #{last_seq}") from None
            if message is None:
                return
            yield message
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def export_log(
    js: JetStreamContext, out: Path, progress: Progress | None = None, header: ExportHeader | None = None
) -> ExportHeader:
    """Write every stream and bucket (as `header` lists them, by default as they are now) to `out`."""
    header = header or await export_header(js)

    async def messages() -> AsyncIterator[Message]:
        for stream in header.streams:
            async for message in read_stream(js, stream.name, stream.last_seq):
                yield message

    written = await write_export(out, header, messages(), progress)
    logger.info("exported %d messages of %d streams to %s", written, len(header.streams), out)
    return header


async def write_export(
    out: Path, header: ExportHeader, messages: AsyncIterator[Message], progress: Progress | None = None
) -> int:
    """Write `header`, `messages` and the end line to `out`, beside it first and then renamed: never
    half a file. Returns the number of messages."""
    partial = out.with_name(f".{out.name}.partial")
    written = 0
    unreported: dict[str, int] = {}
    try:
        with gzip.open(partial, "wb", compresslevel=6) as file:
            file.write(_encoder.encode(header) + b"\n")
            async for message in messages:
                file.write(_encoder.encode(message) + b"\n")
                written += 1
                unreported[message.stream] = unreported.get(message.stream, 0) + 1
                if progress and unreported[message.stream] == PROGRESS_EVERY:
                    progress(message.stream, unreported.pop(message.stream))
            file.write(_encoder.encode(ExportEnd(messages=written)) + b"\n")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    for stream, count in unreported.items():
        if progress:
            progress(stream, count)
    return written


# --- Import ----------------------------------------------------------------------------------------


def read_lines(path: Path) -> Iterator[Line]:
    """The lines of an export file, decoded one at a time; a damaged file is a `BadRequest`."""
    try:
        with gzip.open(path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                try:
                    yield _line_decoder.decode(raw)
                except msgspec.DecodeError as exc:
                    raise BadRequest(f"{path}, line {number}: not an export line ({exc})") from None
    except (OSError, EOFError) as exc:
        raise BadRequest(f"{path} is not a readable export (gzip): {exc}") from None


#: How every message line starts (the tag, then the stream: msgspec writes fields in their order).
_MESSAGE_PREFIX = b'{"kind":"msg","stream":"'


def _line_stream(raw: bytes) -> str | None:
    """The stream of a message line, read without decoding the line (None for other lines)."""
    if not raw.startswith(_MESSAGE_PREFIX):
        return None
    end = raw.find(b'"', len(_MESSAGE_PREFIX))
    return raw[len(_MESSAGE_PREFIX) : end].decode()


def _streams_in(path: Path) -> set[str]:
    with gzip.open(path, "rb") as file:
        return {name for name in map(_line_stream, file) if name is not None}


def _messages(path: Path, stream: str) -> Iterator[Message]:
    """The messages of one stream in an export, in file order; each call reads the file anew, decoding
    only that stream's lines."""
    with gzip.open(path, "rb") as file:
        for raw in file:
            if _line_stream(raw) == stream:
                yield msgspec.json.decode(raw, type=Message)


def read_header(path: Path) -> ExportHeader:
    for line in read_lines(path):
        if isinstance(line, ExportHeader) and line.format == FORMAT:
            return line
        break
    raise BadRequest(f"{path} does not start with a gpu-fabric export header (format {FORMAT})")


def check_complete(path: Path) -> None:
    """Refuse, before anything is written, a file that was cut short: its last line must be the end
    line, counting every message line (one pass over the compressed file, decoding only that line)."""
    lines = 0
    last = b""
    try:
        with gzip.open(path, "rb") as file:
            for last in file:
                lines += 1
    except (OSError, EOFError) as exc:
        raise BadRequest(f"{path} is not a readable export (gzip): {exc}") from None
    try:
        end = _line_decoder.decode(last)
    except msgspec.DecodeError:
        end = None
    if not isinstance(end, ExportEnd) or end.messages != lines - 2:
        raise BadRequest(f"{path} was cut short: its last line is not the end line that counts its {max(lines - 2, 0)} messages")


async def refuse_unless_empty(js: JetStreamContext, header: ExportHeader) -> None:
    """An import goes into an empty platform: no stream it writes, buckets aside, may hold messages.
    Buckets are exempt because a fresh platform's gateway writes its first credentials at start."""
    busy = {}
    for stream in header.streams:
        if is_bucket(stream.name):
            continue
        with contextlib.suppress(NotFoundError):
            if messages := (await js.stream_info(stream.name)).state.messages:
                busy[stream.name] = messages
    if busy:
        held = ", ".join(f"{name} holds {count:,} messages" for name, count in busy.items())
        raise Conflict(f"the platform is not empty ({held}): import into a new data dir or cluster", busy)


async def import_log(js: JetStreamContext, path: Path, progress: Progress | None = None) -> dict[str, int]:
    """Load an export into an empty platform; returns the messages written per stream."""
    header = read_header(path)
    check_complete(path)
    await refuse_unless_empty(js, header)
    await ensure_streams(js)
    for stream in header.streams:
        try:
            await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(js_api.StreamConfig.from_response(dict(stream.config)))
    writers = {stream.name: _StreamWriter(js, stream) for stream in header.streams}
    if unknown := _streams_in(path) - writers.keys():
        raise BadRequest(f"{path}: messages of {', '.join(sorted(unknown))}, which the header does not list")
    written = 0
    # Streams interleaved as they were written (by their original times): tools that order events across
    # streams by their stream time (`gpuctl verify`: a job assigned to a registered worker) see the same order.
    in_time_order = heapq.merge(*(_messages(path, stream.name) for stream in header.streams), key=lambda m: m.time_ns)
    previous_log: str | None = None
    for message in in_time_order:
        writer = writers[message.stream]
        if message.stream in ORDERED_ACROSS:
            # JetStream stamps each stream's messages on its own: the other's in-flight messages must be
            # stored first, or a worker's registration could be stamped after its first assignment.
            if previous_log not in (None, message.stream):
                await writers[previous_log].settle()
            previous_log = message.stream
        await writer.write(message)
        written += 1
        if progress and writer.count % PROGRESS_EVERY == 0:
            progress(message.stream, PROGRESS_EVERY)
    for name, writer in writers.items():
        await writer.finish()
        if progress:
            progress(name, writer.count % PROGRESS_EVERY)
    counts = {name: writer.count for name, writer in writers.items()}
    logger.info("imported %d messages from %s: %s", written, path, counts)
    return counts


class _StreamWriter:
    """Publishes one stream's messages in order, pipelined, keeping their sequence numbers where the
    stream starts empty (the event log always does: `refuse_unless_empty`)."""

    def __init__(self, js: JetStreamContext, stream: StreamHeader) -> None:
        self._js = js
        self._name = stream.name
        self._gap_subject = gap_subject(stream.config.get("subjects") or [])
        self._in_flight: list[tuple[asyncio.Future[js_api.PubAck], int | None]] = []
        self._next_seq: int | None = None  # None: not started
        self._keep_seqs = False
        self._filled = 0
        self.count = 0

    async def write(self, message: Message) -> None:
        if self._next_seq is None:
            await self._start(message.seq)
        if self._keep_seqs and self._next_seq is not None and message.seq > self._next_seq:
            for _ in range(message.seq - self._next_seq):
                await self._publish(self._gap_subject or "", b"", None, None)
                self._filled += 1
        headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith(WRITE_CONTROL_PREFIXES)}
        await self._publish(message.subject, message.data, headers or None, message.seq if self._keep_seqs else None)
        self._next_seq = message.seq + 1
        self.count += 1

    async def _start(self, first_seq: int) -> None:
        state = (await self._js.stream_info(self._name)).state
        self._keep_seqs = self._gap_subject is not None and state.messages == 0 and state.last_seq < first_seq
        if self._keep_seqs and first_seq > state.last_seq + 1:
            # An empty stream purged up to `first_seq` starts there (the messages before were deleted).
            await self._js.purge_stream(self._name, seq=first_seq)
        elif not self._keep_seqs:
            logger.warning("%s already holds messages: imported messages get new sequence numbers", self._name)
        self._next_seq = first_seq

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None, seq: int | None) -> None:
        future = await self._js.publish_async(subject, data, headers=headers)
        self._in_flight.append((future, seq))
        if len(self._in_flight) >= IMPORT_WINDOW:
            await self.settle()

    async def settle(self) -> None:
        """Check the acknowledgements in flight: each message stored, at its own sequence."""
        in_flight, self._in_flight = self._in_flight, []
        for future, seq in in_flight:
            try:
                ack = await asyncio.wait_for(future, ACK_TIMEOUT_S)
            except TimeoutError:
                raise Unavailable(f"{self._name}: no acknowledgement for message #{seq} within {ACK_TIMEOUT_S:g}s") from None
            if ack.duplicate or (seq is not None and ack.seq != seq):
                raise Conflict(
                    f"{self._name}: message #{seq} was stored as #{ack.seq}"
                    f"{' (a duplicate message id)' if ack.duplicate else ''}; is something else writing to it?",
                    {"stream": self._name, "seq": seq, "stored_seq": ack.seq},
                )

    async def finish(self) -> None:
        await self.settle()
        if self._filled and self._gap_subject:
            await self._js.purge_stream(self._name, subject=self._gap_subject)


def gap_subject(stream_subjects: list[str]) -> str | None:
    """A subject of the stream for gap fillers, only they use: its first subject with each wildcard as
    `GAP_TOKEN`; None when that subject has no wildcard (then sequences cannot be kept)."""
    tokens = (stream_subjects or [""])[0].split(".")
    if not any(token in ("*", ">") for token in tokens):
        return None
    return ".".join(GAP_TOKEN if token in ("*", ">") else token for token in tokens)


# --- Retention's snapshots ---------------------------------------------------------------------------

#: In the `archive` object store, beside the archived messages: the final rows of the jobs retention took
#: out of JOBS (`projections/retention.py`), which every fold of the log starts from.
SNAPSHOT_SUFFIX = ".snapshot.jsonl.gz"
_job_decoder = msgspec.json.Decoder(Job)


def encode_snapshot(jobs: list[Job]) -> bytes:
    return gzip.compress(b"".join(_encoder.encode(job) + b"\n" for job in jobs))


async def archived_jobs(js: JetStreamContext, until_jobs_seq: int | None = None) -> list[Job]:
    """The rows of every retention snapshot; with `until_jobs_seq`, only jobs that had ended by then
    (the others' past is in the archive only)."""
    try:
        archive = await js.object_store(subjects.ARCHIVE_BUCKET)
        infos = await archive.list()
    except NotFoundError:
        return []  # no bucket yet, or nothing archived
    jobs: list[Job] = []
    for info in sorted(infos, key=lambda i: i.name):
        if info.name.endswith(SNAPSHOT_SUFFIX) and not info.deleted:
            data = gzip.decompress((await archive.get(info.name)).data or b"")
            jobs += (_job_decoder.decode(line) for line in data.splitlines() if line)
    return [job for job in jobs if until_jobs_seq is None or job.seq <= until_jobs_seq]

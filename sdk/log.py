"""The event log on JetStream: stream definitions, appends with optimistic concurrency, and reads.

Every component that writes events goes through `append`, so the headers (event type, message id,
expected sequence) are set the same way everywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError

from sdk import subjects
from sdk.errors import Conflict, PlatformError
from sdk.events import Event, JobEvent, encoder, event_type, job_event_decoder
from sdk.jobs import Job, apply, fold

logger = logging.getLogger(__name__)

#: How long an idempotency key is remembered by JetStream's de-duplication.
IDEMPOTENCY_WINDOW_S = 3600.0
HEARTBEAT_MAX_AGE_S = 600.0
LEASE_TTL_S = 5.0
#: Ordered consumers that follow a stream (the scheduler's view, the read models, the gateway's job feed)
#: ask the server for an idle heartbeat this often. Such a consumer dies with a restarted server (or the
#: cluster node that held it), and nats-py makes it again only after two missed heartbeats: at its
#: default (5 s) the scheduler saw nothing for 10 to 20 s after a broker restart (docs/reliability.md).
FEED_IDLE_HEARTBEAT_S = 0.5
#: How many copies of every stream and bucket a cluster keeps (`gpuctl up --replicas` sets it for the
#: services it starts; a deployment sets it on each service). Unset: 1, what a single server holds.
REPLICAS_ENV = "GF_STREAM_REPLICAS"


class WrongLastSequence(Exception):
    """Another writer appended to the subject first; re-read and decide again."""


def stream_configs(replicas: int = 1) -> list[js_api.StreamConfig]:
    return [
        _log_stream(
            subjects.JOBS_STREAM, subjects.JOBS_SUBJECTS, replicas,
            duplicate_window=IDEMPOTENCY_WINDOW_S,
            # Group commit (`sdk.group_commit`): a burst of appends is stored, and fsynced, as one batch.
            allow_atomic=True,
        ),
        _log_stream(subjects.WORKERS_STREAM, subjects.WORKERS_SUBJECTS, replicas),
        _log_stream(subjects.SESSIONS_STREAM, subjects.SESSIONS_SUBJECTS, replicas),
        _log_stream(
            subjects.HEARTBEATS_STREAM, subjects.HEARTBEATS_SUBJECTS, replicas,
            max_age=HEARTBEAT_MAX_AGE_S, max_msgs_per_subject=2,
        ),
        js_api.StreamConfig(
            name=subjects.DISPATCH_STREAM,
            num_replicas=replicas,
            subjects=[subjects.DISPATCH_SUBJECTS],
            retention=js_api.RetentionPolicy.WORK_QUEUE,
            # Derived from `JobAssigned` in JOBS: a dispatch lost with a server restart is requeued by the
            # scheduler (the job is not in its worker's heartbeats), so it need not pay an fsync per job.
            storage=js_api.StorageType.MEMORY,
        ),
    ]


def _log_stream(name: str, subject: str, replicas: int, **options: Any) -> js_api.StreamConfig:
    """A stream kept as a log: limits retention, on file, readable by direct gets."""
    return js_api.StreamConfig(
        name=name, num_replicas=replicas, subjects=[subject], retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE, allow_direct=True, **options,
    )


def configured_replicas() -> int:
    """The replicas this deployment asks for (`GF_STREAM_REPLICAS`), 1 when unset."""
    value = os.environ.get(REPLICAS_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{REPLICAS_ENV}={value!r}: expected a whole number of copies, 1 or more")
    return int(value)


async def ensure_streams(js: JetStreamContext, replicas: int | None = None) -> None:
    """Create (or bring up to date) every stream and bucket; safe to run from every service at start.

    Each gets `replicas` copies (default `configured_replicas()`). One that exists with fewer, made by an
    older version or before the cluster grew, is raised to that many (JetStream copies it to the new
    peers); one with more keeps them: lowering is an operator's decision, never a side effect of a
    service started without the setting."""
    replicas = replicas or configured_replicas()
    for config in stream_configs(replicas):
        existing = await _replicas_of(js, config.name)
        config.num_replicas = max(replicas, existing)
        try:
            await js.add_stream(config)  # nothing changes when it exists with this config
        except BadRequestError:
            if not existing:
                raise  # e.g. a cluster that cannot place that many copies (yet)
            try:
                await js.update_stream(config)
            except BadRequestError as exc:
                # e.g. a storage type changed since this data dir was made: keep what is there.
                logger.warning("stream %s keeps its existing config: %s", config.name, exc.description)
    await _ensure_kv(js, subjects.WORKER_CONFIG_BUCKET, replicas, history=10)
    await _ensure_kv(js, subjects.SCHEDULER_LEASE_BUCKET, replicas, ttl=LEASE_TTL_S)
    await _ensure_kv(js, subjects.AUTH_BUCKET, replicas, history=1)
    await _ensure_kv(js, subjects.PLATFORM_CONFIG_BUCKET, replicas, history=10)
    await _ensure_kv(js, subjects.WEBHOOKS_BUCKET, replicas, history=1)
    for bucket in (subjects.RESULTS_BUCKET, subjects.ARCHIVE_BUCKET):
        try:
            await js.object_store(bucket)
        except BucketNotFoundError:
            await js.create_object_store(
                bucket, js_api.ObjectStoreConfig(storage=js_api.StorageType.FILE, replicas=replicas)
            )
        else:
            await _raise_replicas(js, f"OBJ_{bucket}", replicas)


async def _ensure_kv(js: JetStreamContext, bucket: str, replicas: int, **options: Any) -> None:
    try:
        await js.key_value(bucket)
    except BucketNotFoundError:
        await js.create_key_value(js_api.KeyValueConfig(bucket=bucket, replicas=replicas, **options))
    else:
        await _raise_replicas(js, f"KV_{bucket}", replicas)


async def _replicas_of(js: JetStreamContext, stream: str) -> int:
    """How many copies `stream` has now; 0 when it does not exist."""
    try:
        return (await js.stream_info(stream)).config.num_replicas or 1
    except NotFoundError:
        return 0


async def _raise_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Give the stream behind a bucket `replicas` copies when it has fewer (its config otherwise as it is)."""
    config = (await js.stream_info(stream)).config
    if (config.num_replicas or 1) >= replicas:
        return
    config.num_replicas = replicas
    await js.update_stream(config)
    logger.info("stream %s now has %d replicas", stream, replicas)


async def append(
    js: JetStreamContext,
    subject: str,
    event: Event | Sequence[Event],
    *,
    expected_seq: int | None = None,
    msg_id: str | None = None,
) -> js_api.PubAck:
    """Append one event. `expected_seq` = the subject's last sequence (0: the subject must be empty).
    Several events are appended in order, each at the sequence of the one before; the ack is the last's
    (a refusal part way leaves the first ones in: the caller decides again from the log)."""
    if not isinstance(event, Event):
        assert event and msg_id is None, "a chain of events is one or more, without a message id"
        for one in event:
            ack = await append(js, subject, one, expected_seq=expected_seq)
            expected_seq = ack.seq
        return ack
    try:
        return await js.publish(subject, encoder.encode(event), headers=append_headers(event, expected_seq, msg_id))
    except APIError as exc:
        raise refusal(exc, subject, expected_seq) from None


def append_headers(event: Event, expected_seq: int | None = None, msg_id: str | None = None) -> dict[str, str]:
    """An append's headers: the event type, and the expected sequence and message id when given."""
    headers = {subjects.EVENT_TYPE_HEADER: event_type(event)}
    if expected_seq is not None:
        headers[subjects.EXPECTED_LAST_SUBJECT_SEQ_HEADER] = str(expected_seq)
    if msg_id is not None:
        headers[subjects.MSG_ID_HEADER] = msg_id
    return headers


def refusal(exc: APIError, subject: str, expected_seq: int | None) -> Exception:
    """The error an append refused by the server raises: `WrongLastSequence` for a stale expected sequence."""
    if exc.err_code in subjects.WRONG_LAST_SEQUENCE_ERR_CODES:
        return WrongLastSequence(f"{subject} moved past {expected_seq}")
    return exc


def ack_fields(reply: str) -> tuple[int, int, int]:
    """`(stream sequence, timestamp ns, pending)` from a JetStream delivery's reply subject, without
    nats-py's `msg.metadata` objects (the replay's hot path): the v1 form
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` or the v2 form, which adds a
    domain and an account hash after `ACK` (and may end with a random token)."""
    tokens = reply.split(".")
    at = 5 if len(tokens) == 9 else 7
    return int(tokens[at]), int(tokens[at + 2]), int(tokens[at + 3])


async def read_subject(js: JetStreamContext, stream: str, subject: str) -> list[tuple[bytes, int]]:
    """Every message on `subject`, oldest first, as `(data, seq)`, through direct gets."""
    out: list[tuple[bytes, int]] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
        except NotFoundError:
            return out
        out.append((msg.data or b"", msg.seq))
        seq = msg.seq + 1


async def first_job_event(js: JetStreamContext, job_id: str) -> JobEvent | None:
    """A job's first event (its submission), through one direct get; None for an unknown job."""
    try:
        msg = await js.get_msg(subjects.JOBS_STREAM, seq=1, subject=subjects.job_subject(job_id), next=True, direct=True)
    except NotFoundError:
        return None
    return job_event_decoder.decode(msg.data or b"")


async def read_job_events(js: JetStreamContext, job_id: str) -> list[tuple[JobEvent, int]]:
    raw = await read_subject(js, subjects.JOBS_STREAM, subjects.job_subject(job_id))
    return [(job_event_decoder.decode(data), seq) for data, seq in raw]


async def load_job(js: JetStreamContext, job_id: str) -> Job | None:
    """A job's current state, folded from its subject."""
    return fold(await read_job_events(js, job_id))


#: The event a request stands for, several to append together in order, or None: nothing to do.
Decide = Callable[[Job | None], JobEvent | Sequence[JobEvent] | None]
#: How `decide_and_append` appends: `append` on a JetStream context, or a group commit (`sdk.group_commit`).
AppendEvent = Callable[..., Awaitable[js_api.PubAck]]


async def decide_and_append(
    js: JetStreamContext,
    job_id: str,
    decide: Decide,
    *,
    known: Job | None = None,
    attempts: int = 5,
    append_event: AppendEvent | None = None,
) -> tuple[Job | None, JobEvent | None]:
    """Load, decide, save: fold the job (or start from `known`, a recent copy), let `decide(job)` return
    the event (or None: nothing to do), append it at the job's sequence, and decide again from a fresh
    read when another writer got there first. Returns the job after the event, and the event (the last
    one when `decide` returned several: they are appended together, the first at the job's sequence)."""
    append_event = append_event or partial(append, js)
    job = known
    for attempt in range(attempts):
        if job is None or attempt > 0:
            job = await load_job(js, job_id)
        try:
            decision = decide(job)
            if decision is None:
                return job, None
            events = (decision,) if isinstance(decision, Event) else tuple(decision)
            new = job
            for event in events:
                new = apply(new, event)  # refuse an impossible transition before anything is written
        except PlatformError:
            if job is known and known is not None:
                # The recent copy may lag the log (the event that makes this valid is in flight): re-read.
                job = None
                continue
            raise
        try:
            chain = events[0] if len(events) == 1 else events
            ack = await append_event(subjects.job_subject(job_id), chain, expected_seq=job.seq if job else 0)
        except WrongLastSequence:
            logger.info("job %s changed under us; deciding again", job_id)
            continue
        assert new is not None
        new.seq = ack.seq
        return new, event
    raise Conflict(f"job {job_id} kept changing; gave up after {attempts} tries")

"""Webhooks: when a job that carries `webhook_url` ends, the platform POSTs its view there, signed.

The story of one delivery:
1. The gateways share a durable JetStream consumer (`webhooks`) of the `JOBS` stream. An event that ends
   a job (completed, failed, cancelled, expired), or a `JobWebhookRedeliveryRequested`, is a trigger;
   every other event is acknowledged at once.
2. For a trigger whose job has a `webhook_url`, a gateway folds the job, signs its view with the owner's
   secret (`sdk.webhooks.signature`) and POSTs it. Each try is an event on the job's subject
   (`JobWebhookDelivered` with status and duration, or `JobWebhookFailed` with the reason), so the job's
   history shows it.
3. A 2xx acknowledges the trigger. Anything else naks it with a delay, exponential with jitter
   (`backoff_s`); JetStream redelivers it then, to whichever gateway is up, so a restart of any component
   loses no delivery. After `retry_for_s` (24 h by default) from the trigger the platform gives up.

A webhook is a request the platform makes on a user's behalf, so targets are checked: at submission by
name alone (`check_url`: IP literals, `localhost`), and with the name resolved at each try (`check_target`): private, loopback, link-local and other non-public addresses are refused
unless `GF_ENV` is `dev` or `test`. Redirects are not followed (they could lead anywhere).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import time
from urllib.parse import urlsplit

import httpx
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from gateway.auth.master_key import derive_key
from gateway.feed import JobFeed
from gateway.kv import Bucket
from sdk import subjects
from sdk.api import Accepted, job_view
from sdk.errors import BadRequest, InvalidTransition, JobNotFound
from sdk.events import (
    JobSubmitted,
    JobWebhookDelivered,
    JobWebhookFailed,
    JobWebhookRedeliveryRequested,
    job_event_decoder,
    now_ms,
)
from sdk.jobs import fold, visible_to
from sdk.log import append, first_job_event, read_job_events
from sdk.tls import ENV_NAME_ENV, INSECURE_ENVIRONMENTS
from sdk.webhooks import SECRET_PREFIX, WebhookSecret, signature

logger = logging.getLogger(__name__)

#: A delivery asked for again by hand (only jobs with a webhook have one).
REDELIVERY = "job.webhook_redelivery_requested"
#: Event types that start a delivery: the four ends of a job, and a redelivery.
TRIGGERS = frozenset({"job.completed", "job.failed", "job.cancelled", "job.expired", REDELIVERY})
#: Deliveries in flight per gateway; a slow receiver holds one slot, not the whole consumer.
MAX_IN_FLIGHT = 32


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True):
    #: How long after the job ended the platform keeps trying.
    retry_for_s: float = 86400.0
    #: The delay before the second try; each later one doubles, up to `max_delay_s`, times 0.5-1.5 (jitter).
    first_delay_s: float = 5.0
    max_delay_s: float = 3600.0
    #: How long one try may take.
    timeout_s: float = 10.0
    #: Private, loopback and link-local targets are allowed (dev and test environments only).
    allow_private: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WebhookSettings:
        """`GF_WEBHOOK_RETRY_FOR_S`, `GF_WEBHOOK_FIRST_DELAY_S`, `GF_WEBHOOK_MAX_DELAY_S`,
        `GF_WEBHOOK_TIMEOUT_S`; private targets follow `GF_ENV`."""
        env = dict(os.environ if env is None else env)
        numbers = {
            name: float(env[f"GF_WEBHOOK_{name.upper()}"])
            for name in ("retry_for_s", "first_delay_s", "max_delay_s", "timeout_s")
            if f"GF_WEBHOOK_{name.upper()}" in env
        }
        return cls(**numbers, allow_private=env.get(ENV_NAME_ENV) in INSECURE_ENVIRONMENTS)


def backoff_s(attempt: int, settings: WebhookSettings, draw: float) -> float:
    """The delay after failed try `attempt` (1-based); `draw` in [0, 1) spreads retries of many jobs."""
    base = min(settings.first_delay_s * 2 ** (attempt - 1), settings.max_delay_s)
    return base * (0.5 + draw)


def check_url(url: str, allow_private: bool) -> str:
    """The URL's host; `BadRequest` unless it is http(s) with a host that is not a private address by its
    very name (an IP literal, `localhost`). Needs no DNS, so a submission never waits on a resolver."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # reading the port is its check: out of range raises
    except ValueError as exc:  # e.g. an unclosed `[` or a port out of range
        raise BadRequest(f"webhook_url is not a valid URL: {exc}", {"param": "webhook_url"}) from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest(f"webhook_url must be an http(s) URL with a host, not {url!r}", {"param": "webhook_url"})
    if not allow_private:
        if host == "localhost" or host.endswith(".localhost"):
            raise _private(host, "loopback")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host  # a name: checked when it is resolved, at each try
        if not address.is_global:
            raise _private(host, address)
    return host


async def check_target(url: str, allow_private: bool) -> None:
    """`check_url`, then every address the host resolves to must be public (or `allow_private`)."""
    host = check_url(url, allow_private)
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    except (OSError, ValueError) as exc:
        raise BadRequest(f"webhook_url host {host!r} does not resolve: {exc}", {"param": "webhook_url"}) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise _private(host, address)


def _private(host: str, address: object) -> BadRequest:
    return BadRequest(
        f"webhook_url {host!r} resolves to {address}, which is not a public address",
        {"param": "webhook_url", "reason": "private_target"},
    )


class SecretRecord(msgspec.Struct, kw_only=True):
    generation: int


_decode_record = msgspec.json.Decoder(SecretRecord).decode


class WebhookSecrets:
    """Each API key's secret: derived from the master key and a generation, so only the number is stored."""

    def __init__(self, js: JetStreamContext, master_key: bytes) -> None:
        self.js = js
        self.master_key = master_key

    async def get(self, owner: str, *, rotate: bool = False) -> WebhookSecret:
        """The owner's secret, created on first use; `rotate` moves to the next generation."""
        bucket = await Bucket.open(self.js, subjects.WEBHOOKS_BUCKET)

        def next_generation(current: SecretRecord | None) -> SecretRecord | None:
            if current is not None and not rotate:
                return None  # nothing to write: the current generation stands
            return SecretRecord(generation=(current.generation if current else 0) + 1)

        changed = await bucket.update(owner, _decode_record, next_generation, what=f"the webhook secret of {owner}")
        if changed is not None:
            logger.info("webhook secret of %s is at generation %d", owner, changed.after.generation)
            return self._secret(owner, changed.after.generation)
        loaded = await bucket.load(owner, _decode_record)
        assert loaded is not None  # `update` wrote nothing because it exists
        return self._secret(owner, loaded.value.generation)

    def _secret(self, owner: str, generation: int) -> WebhookSecret:
        key = derive_key(self.master_key, f"webhook:{owner}:{generation}")
        return WebhookSecret(secret=SECRET_PREFIX + key.hex(), generation=generation)


class WebhookDeliverer:
    """The gateway's part of the shared `webhooks` consumer: takes the triggers pushed to it and delivers them."""

    def __init__(self, js: JetStreamContext, secrets: WebhookSecrets, settings: WebhookSettings, feed: JobFeed) -> None:
        """`feed`: the gateway's recent jobs, which tell most endings apart as jobs without a webhook."""
        self.js = js
        self.secrets = secrets
        self.settings = settings
        self.feed = feed
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: JetStreamContext.PushSubscription | None = None
        self._http = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False)

    async def start(self) -> None:
        await _replace_pull_consumer(self.js, self.settings)
        # Pushed to the gateways' queue group: a pull consumer cost a pull request and a status reply
        # per event besides its delivery and ack, and every event of every job passes through here.
        self._sub = await self.js.subscribe(
            subjects.JOBS_SUBJECTS, queue=subjects.WEBHOOK_CONSUMER, stream=subjects.JOBS_STREAM,
            config=_consumer_config(self.settings), cb=self._on_msg, manual_ack=True,
        )

    async def stop(self) -> None:
        # Take no more triggers, let tries in flight end (their triggers are acked or naked), then leave
        # the consumer (the durable consumer itself stays, with its place).
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()

    async def _on_msg(self, msg: Msg) -> None:
        kind = (msg.headers or {}).get(subjects.EVENT_TYPE_HEADER)
        if kind not in TRIGGERS or (kind != REDELIVERY and not self._may_have_webhook(msg.subject)):
            await msg.ack()
            return
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _may_have_webhook(self, subject: str) -> bool:
        """False for a job the feed knows was submitted without a webhook (most jobs): no read needed."""
        job_id = subjects.JOBS.token(subject)
        job = self.feed.recent(job_id) if job_id is not None else None
        return job is None or job.webhook_url is not None

    async def _handle(self, msg: Msg) -> None:
        async with self._slots:  # a slow receiver holds one slot, not the whole consumer
            try:
                await self._deliver(msg)
            except Exception:
                # Left unacked: JetStream gives it to a gateway again after `ack_wait`.
                logger.exception("webhook delivery of %s failed unexpectedly", msg.subject)

    async def _deliver(self, msg: Msg) -> None:
        trigger = job_event_decoder.decode(msg.data)
        # Most jobs have no webhook: their submission (one read) says so, without folding the subject.
        submitted = await first_job_event(self.js, trigger.job_id)
        if not isinstance(submitted, JobSubmitted) or submitted.webhook_url is None:
            await msg.ack()
            return
        job = fold(await read_job_events(self.js, trigger.job_id))
        assert job is not None  # it has a submission
        url, attempt = submitted.webhook_url, msg.metadata.num_delivered
        if submitted.owner is None:
            tried = Try(reason="the job has no owner whose secret could sign it", final=True)
        else:
            tried = await self._post(url, submitted.owner, msgspec.json.encode(job_view(job)))
        subject = subjects.job_subject(trigger.job_id)
        if tried.status_code is not None and 200 <= tried.status_code < 300:
            delivered = JobWebhookDelivered(
                job_id=job.id, url=url, attempt=attempt, status_code=tried.status_code,
                duration_ms=tried.duration_ms or 0.0,
            )
            await append(self.js, subject, delivered)
            await msg.ack()
            logger.info("webhook of job %s delivered to %s (try %d)", job.id, url, attempt)
            return
        delay_s = backoff_s(attempt, self.settings, random.random())
        gives_up = tried.final or (now_ms() - trigger.at_ms) / 1000 + delay_s > self.settings.retry_for_s
        failed = JobWebhookFailed(
            job_id=job.id, url=url, attempt=attempt, reason=tried.reason[:500], status_code=tried.status_code,
            duration_ms=tried.duration_ms, retry_in_s=None if gives_up else delay_s,
        )
        await append(self.js, subject, failed)
        if gives_up:
            await msg.ack()
            logger.warning("webhook of job %s: gave up after try %d (%s)", job.id, attempt, tried.reason)
        else:
            await msg.nak(delay=delay_s)
            logger.info("webhook of job %s: try %d failed (%s), next in %.1fs", job.id, attempt, tried.reason, delay_s)

    async def _post(self, url: str, owner: str, body: bytes) -> Try:
        """One try: the target checked again (its addresses may have changed), then a signed POST."""
        try:
            await check_target(url, self.settings.allow_private)
        except BadRequest as exc:
            # A private target stays private; a name that does not resolve may yet.
            return Try(reason=exc.message, final=(exc.details or {}).get("reason") == "private_target")
        secret = (await self.secrets.get(owner)).secret
        headers = {
            "Content-Type": "application/json",
            subjects.WEBHOOK_SIGNATURE_HEADER: signature(secret, body, int(time.time())),
            "User-Agent": "gpu-fabric-webhooks",
        }
        started = time.perf_counter()
        try:
            response = await self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Try(reason=f"{type(exc).__name__}: {exc}", duration_ms=(time.perf_counter() - started) * 1000)
        return Try(
            status_code=response.status_code,
            duration_ms=(time.perf_counter() - started) * 1000,
            reason=f"answered {response.status_code}",
        )


class Try(msgspec.Struct, frozen=True, kw_only=True):
    """What one try of a delivery came to."""

    status_code: int | None = None
    duration_ms: float | None = None
    reason: str = ""
    #: Trying again cannot help.
    final: bool = False


async def request_redelivery(js: JetStreamContext, job_id: str, owner: str | None) -> Accepted:
    """Deliver a finished job's webhook again: a trigger like the job's end, so tries start afresh."""
    records = await read_job_events(js, job_id)
    job = fold(records)
    if job is None or not visible_to(job, owner):
        raise JobNotFound(f"job {job_id} not found")
    submitted = records[0][0]
    if not isinstance(submitted, JobSubmitted) or submitted.webhook_url is None:
        raise InvalidTransition(f"job {job_id} has no webhook_url: there is nothing to deliver")
    if not job.status.terminal:
        raise InvalidTransition(f"job {job_id} is {job.status.value}; its webhook is sent when it ends")
    # A fact on a finished job, which nothing else changes: no expected sequence needed.
    ack = await append(js, subjects.job_subject(job_id), JobWebhookRedeliveryRequested(job_id=job_id))
    logger.info("webhook of job %s: redelivery requested", job_id)
    return Accepted(seq=ack.seq)


def _consumer_config(settings: WebhookSettings, start_seq: int | None = None) -> ConsumerConfig:
    """The same on every gateway, so whichever makes it first, the others find it as they would make it."""
    return ConsumerConfig(
        durable_name=subjects.WEBHOOK_CONSUMER,
        deliver_group=subjects.WEBHOOK_CONSUMER,
        deliver_subject=subjects.WEBHOOK_DELIVER_SUBJECT,
        filter_subject=subjects.JOBS_SUBJECTS,
        # Made once; from then on the consumer remembers its place across restarts.
        deliver_policy=DeliverPolicy.NEW if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.EXPLICIT,
        # A gateway that dies mid-try gives the trigger back after this long.
        ack_wait=settings.timeout_s + 30,
        max_deliver=-1,
        max_ack_pending=4 * MAX_IN_FLIGHT,
    )


async def _replace_pull_consumer(js: JetStreamContext, settings: WebhookSettings) -> None:
    """A store made before the consumer was pushed holds it as a pull consumer, which a queue subscription
    cannot bind: make it again from where the old one's acknowledgements end (a trigger delivered but not
    acknowledged yet is delivered again: deliveries are at least once)."""
    try:
        info = await js.consumer_info(subjects.JOBS_STREAM, subjects.WEBHOOK_CONSUMER)
    except NotFoundError:
        return
    if info.config.deliver_subject is not None:
        return
    start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
    try:
        await js.delete_consumer(subjects.JOBS_STREAM, subjects.WEBHOOK_CONSUMER)
    except NotFoundError:
        pass  # another gateway replaces it
    await js.add_consumer(subjects.JOBS_STREAM, _consumer_config(settings, start))
    logger.info("webhook consumer: now pushed to the gateways, from JOBS sequence %d", start)

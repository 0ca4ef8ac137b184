"""Every stream, subject, bucket and header name of the platform, in one place.

Components share only this contract and NATS; a name that appears anywhere else is a bug.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    """The subjects (or KV keys) one token below a prefix: `Names("jobs").of(job_id)` is `jobs.<job_id>`.

    A builder below is a family's bound `of` (`job_subject = Names("jobs").of`), so call sites read
    `job_subject(job_id)` and are typed `(str) -> str`; the family also gives its wildcards and reads
    the token back, so a layout is written once for building, subscribing and parsing."""

    prefix: str

    def of(self, token: str) -> str:
        return f"{self.prefix}.{token}"

    def token(self, name: str) -> str | None:
        """The token of one of this family's names (`jobs.j1` -> `j1`); None for any other name."""
        head, _, token = name.rpartition(".")
        return token if head == self.prefix and token else None

    @property
    def each(self) -> str:
        """The wildcard of every name one token below the prefix (`jobs.*`)."""
        return f"{self.prefix}.*"

    @property
    def below(self) -> str:
        """The wildcard of every name under the prefix, at any depth (`revoked.>`)."""
        return f"{self.prefix}.>"


# --- Streams -------------------------------------------------------------------------------------

#: Every job event, one subject per job: the subject is the aggregate, so
#: `Nats-Expected-Last-Subject-Sequence` gives one writer per decision about a job.
JOBS_STREAM = "JOBS"
JOBS = Names("jobs")
JOBS_SUBJECTS = JOBS.each

#: Worker lifecycle events (registered, model loaded, lost, ...), one subject per worker.
WORKERS_STREAM = "WORKERS"
WORKERS = Names("workers")
WORKERS_SUBJECTS = WORKERS.each

#: The latest telemetry of each worker; short-lived, a few messages per subject.
HEARTBEATS_STREAM = "HEARTBEATS"
HEARTBEATS_SUBJECTS = "heartbeats.*.*"

#: Assignments and cancel orders waiting for a worker; work-queue retention, so an acked message is gone.
DISPATCH_STREAM = "DISPATCH"
DISPATCH_SUBJECTS = "dispatch.*.*"

#: Direct sessions' openings and closings, one subject per session (the aggregate): who leased which
#: worker, when, and on close the usage. Single requests are not in the log.
SESSIONS_STREAM = "SESSIONS"
SESSIONS = Names("sessions")
SESSIONS_SUBJECTS = SESSIONS.each

#: Each stream with the subjects it holds (what a reader of the whole stream filters on).
STREAM_SUBJECTS = {
    JOBS_STREAM: JOBS_SUBJECTS,
    WORKERS_STREAM: WORKERS_SUBJECTS,
    HEARTBEATS_STREAM: HEARTBEATS_SUBJECTS,
    DISPATCH_STREAM: DISPATCH_SUBJECTS,
    SESSIONS_STREAM: SESSIONS_SUBJECTS,
}

#: The JetStream domain of servers that take far regions' leaf servers: a leaf server's clients reach the
#: platform's JetStream API as `$JS.<domain>.API.>` (a server does not share its plain `$JS.API.>` over a
#: leaf connection); the leaf server maps their `$JS.API.>` there (`sdk.broker.LeafNats`).
JETSTREAM_DOMAIN = "gpu-fabric"
JS_API_PREFIX = "$JS.API."


def in_jetstream_domain(subject: str) -> str:
    """`$JS.API.X` as a leaf server's client sends it after the leaf's mapping: `$JS.<domain>.API.X`."""
    return subject.replace(JS_API_PREFIX, f"$JS.{JETSTREAM_DOMAIN}.API.", 1)


# --- Buckets -------------------------------------------------------------------------------------

#: Runtime configuration pushed to workers: key `_defaults` plus one key per worker id.
WORKER_CONFIG_BUCKET = "worker-config"
WORKER_CONFIG_DEFAULTS_KEY = "_defaults"

#: The scheduler leader lease; the bucket's TTL is the lease timeout, so a dead leader's key vanishes.
SCHEDULER_LEASE_BUCKET = "scheduler-lease"
SCHEDULER_LEASE_KEY = "leader"

#: Platform-wide runtime settings, changed live by operators: key `regions` (the latency table between
#: regions, read by the scheduler) and key `limits` (queue limits, read by the gateway).
PLATFORM_CONFIG_BUCKET = "platform-config"
REGIONS_KEY = "regions"
LIMITS_KEY = "limits"

#: Large results (images); events carry an object name, never the bytes.
RESULTS_BUCKET = "results"

#: Retention's output: the messages of archived jobs (export format) and their final read-model rows
#: (the snapshot a replay starts from), `projections/retention.py`.
ARCHIVE_BUCKET = "archive"

#: Credentials (API keys, token families, worker secrets), stored hashed or encrypted.
AUTH_BUCKET = "auth"

#: Each API key's webhook secret generation (the secret itself is derived from the master key, never stored).
WEBHOOKS_BUCKET = "webhooks"
#: The gateways' durable consumer of job events that delivers webhooks (shared: any gateway may deliver),
#: and its queue group.
WEBHOOK_CONSUMER = "webhooks"

# --- Request-reply endpoints ---------------------------------------------------------------------

#: The gateway's endpoints, answered by a queue group so any number of gateways can serve them.
API_QUEUE = "gateway"
API_JOBS_SUBMIT = "api.jobs.submit"
API_JOBS_GET = "api.jobs.get"
API_JOBS_LIST = "api.jobs.list"
API_JOBS_CANCEL = "api.jobs.cancel"
API_JOBS_EVENTS = "api.jobs.events"
API_JOBS_WAIT = "api.jobs.wait"
API_JOBS_RESULT = "api.jobs.result"
API_JOBS_PLACEMENT = "api.jobs.placement"
API_WORKERS_LIST = "api.workers.list"
API_WORKERS_GET = "api.workers.get"
API_WORKERS_REGISTER = "api.workers.register"
API_WORKERS_CONFIG_GET = "api.workers.config.get"
API_WORKERS_CONFIG_SET = "api.workers.config.set"
API_WORKERS_REPORT_PREFIX = "api.workers.report"
API_WORKERS_HEARTBEAT_PREFIX = "api.workers.heartbeat"
#: A worker asks for its next credential generation here (signed, like reports).
API_WORKERS_ROTATE_PREFIX = "api.workers.rotate"
#: Every job and auth endpoint, for the permissions of client identities.
API_JOBS_ALL = "api.jobs.>"
API_AUTH_ALL = "api.auth.>"
API_AUTH_TOKEN = "api.auth.token"
API_AUTH_REFRESH = "api.auth.refresh"

#: The projections' query endpoints (read models), answered by a queue group.
PROJ_QUEUE = "projections"
PROJ_JOBS_GET = "proj.jobs.get"
PROJ_JOBS_LIST = "proj.jobs.list"
PROJ_WORKERS_GET = "proj.workers.get"
PROJ_WORKERS_LIST = "proj.workers.list"
#: Versions, positions, lags and a read-model upgrade's progress (`gpuctl projections status`).
PROJ_STATUS = "proj.status"

#: The schedulers' query endpoints (every instance folds the same view, so any may answer).
SCHED_QUEUE = "scheduler"
SCHED_PLACEMENT = "sched.placement"
#: The gateway's direct-session endpoints (open, close) for SDK clients over NATS.
API_DIRECT_ALL = "api.direct.>"
API_DIRECT_OPEN = "api.direct.open"
API_DIRECT_CLOSE = "api.direct.close"
#: The leader scheduler places a new direct session (no queue group: every instance hears it, only the
#: leader answers, so the session's slot is counted by the one that places jobs).
SCHED_DIRECT_OPEN = "sched.direct.open"
#: Direct requests to any worker (clients' permission): `direct.<worker_id>`, core request-reply.
DIRECT_ALL = "direct.*"
#: Streams an owned job's text to the requester's inbox: checked chunks, then the job (`STREAM_END_HEADER`).
API_JOBS_STREAM = "api.jobs.stream"
#: A worker uploads a large result (an image) of a job it holds; the gateway stores it (signed, capped).
API_WORKERS_RESULT_PREFIX = "api.workers.result"

# --- Per-principal NATS identities (docs/security.md, "NATS identities") ----------------------------

#: nats-server asks the platform here who a connecting worker or client is (NATS auth callout).
AUTH_CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
#: A pseudo-subject, never published: a worker's connect proof is a signature of it (`sdk.signing`),
#: so a proof cannot be replayed as a report and a report cannot be used to connect.
NATS_CONNECT_SUBJECT = "nats.connect"
#: The platform services' inboxes (replies, push and ordered consumers). No identity issued by the
#: callout may subscribe under it; only the static `platform` user can.
PLATFORM_INBOX_PREFIX = "_INBOX_platform"
WORKER_INBOX_ROOT = "_INBOX_worker"
CLIENT_INBOX_ROOT = "_INBOX_client"
ENROLL_INBOX_ROOT = "_INBOX_enroll"
#: Where the webhook consumer pushes (one name: every gateway makes the consumer with the same config).
WEBHOOK_DELIVER_SUBJECT = f"{PLATFORM_INBOX_PREFIX}.webhooks"


#: A worker's inboxes (and its dispatch consumer's deliver subject): its own, by id.
worker_inbox_prefix = Names(WORKER_INBOX_ROOT).of


def credential_inbox_prefix(root: str, credential: str) -> str:
    """The inboxes of a connection that proves itself with a secret (an API key, an enrollment token):
    named by a hash of the secret, so only its holder can compute them, and the same on reconnects."""
    return f"{root}.{hashlib.sha256(credential.encode()).hexdigest()[:32]}"


#: nats-server's advisories of the global account's connections, in the system account (`$G`: the
#: account of the platform user and of every identity the auth callout names).
CONNECT_ADVISORY = "$SYS.ACCOUNT.$G.CONNECT"
DISCONNECT_ADVISORY = "$SYS.ACCOUNT.$G.DISCONNECT"
#: Where the gateway forwards a worker's connection advisories (`sdk.events.WorkerConnection`) to the
#: schedulers: a platform subject no worker or client may publish to.
WORKER_CONNECTION = "sched.workers.connection"


def kick_subject(server_id: str) -> str:
    """The system account's request that closes a client connection of server `server_id`."""
    return f"$SYS.REQ.SERVER.{server_id}.KICK"


#: The signed requests of a worker whose subject's last token is the worker id, so NATS permissions
#: let a worker send only its own (`gateway.auth.signed` reads the id back with `token`).
WORKER_REPORTS = Names(API_WORKERS_REPORT_PREFIX)
WORKER_HEARTBEATS = Names(API_WORKERS_HEARTBEAT_PREFIX)
WORKER_ROTATIONS = Names(API_WORKERS_ROTATE_PREFIX)
WORKER_RESULTS = Names(API_WORKERS_RESULT_PREFIX)
SIGNED_BY_SUBJECT = (WORKER_REPORTS, WORKER_HEARTBEATS, WORKER_ROTATIONS, WORKER_RESULTS)
report_subject = WORKER_REPORTS.of
heartbeat_request_subject = WORKER_HEARTBEATS.of
rotate_subject = WORKER_ROTATIONS.of
result_upload_subject = WORKER_RESULTS.of


# --- Headers -------------------------------------------------------------------------------------

#: The event's type tag, so tools can filter a stream without decoding bodies.
EVENT_TYPE_HEADER = "Event-Type"
#: JetStream de-duplication; an idempotency key becomes the submit's message id.
MSG_ID_HEADER = "Nats-Msg-Id"
#: Optimistic concurrency on a job's subject.
EXPECTED_LAST_SUBJECT_SEQ_HEADER = "Nats-Expected-Last-Subject-Sequence"
#: Access token on requests from the SDK (and the worker's token on its reports).
AUTH_HEADER = "Authorization"
#: An error reply on `api.>` / `proj.>` carries these (the `nats.micro` convention): our error code and
#: the HTTP status it maps to. The body is the `ErrorReply`.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
#: On a webhook the platform sends: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
WEBHOOK_SIGNATURE_HEADER = "Gf-Signature"

#: Marks the last message of an `api.jobs.stream` answer: the finished job, after the text chunks.
STREAM_END_HEADER = "Gf-Stream-End"

#: JetStream's error code for a failed `Nats-Expected-Last-Subject-Sequence` (10164 on some clusters).
WRONG_LAST_SEQUENCE_ERR_CODES = frozenset({10071, 10164})


#: `jobs.<job_id>`, `workers.<worker_id>`, `sessions.<session_id>`: each aggregate's subject in its stream.
job_subject = JOBS.of
worker_subject = WORKERS.of
session_subject = SESSIONS.of
#: Where a worker serves its direct sessions' requests (each carries a session token).
direct_subject = Names("direct").of


def heartbeat_subject(region: str, worker_id: str) -> str:
    return f"heartbeats.{region}.{worker_id}"


def dispatch_subject(region: str, worker_id: str) -> str:
    return f"dispatch.{region}.{worker_id}"


def dispatch_consumer(worker_id: str) -> str:
    """The durable consumer name a worker reads its own dispatch subject through."""
    return f"worker-{worker_id}"


def stream_subject(worker_id: str, job_id: str) -> str:
    """Core pub/sub subject of a running job's token stream (not in the log). The worker id is in the
    subject so that NATS itself lets a worker publish only its own chunks; the gateway reads those of
    the worker that holds the job and drops the rest."""
    return f"stream.{worker_id}.{job_id}"


def stream_subjects_of_job(job_id: str) -> str:
    """Every worker's chunks for `job_id` (the gateway filters them by sender)."""
    return f"stream.*.{job_id}"


def direct_end_subject(worker_id: str) -> str:
    """The platform ends a session on its worker here and gets its usage: one token deeper than
    `DIRECT_ALL`, so clients (who may publish `direct.*`) cannot reach it."""
    return f"direct.{worker_id}.end"

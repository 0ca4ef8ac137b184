"""Who may use which subjects: the permissions of each identity the auth callout issues. Pure; the
table in docs/security.md ("NATS identities") lists the same subjects, with the reason for each.

Every list names the principal's own subjects only. A worker's id, a client's credential hash or an
enrollment token's hash is part of each subject, so one worker cannot read, answer or consume another
worker's traffic, and no identity can subscribe to the platform's inboxes (`_INBOX_platform.>`), the
event log, `dispatch.>` or `stream.>`.
"""

from __future__ import annotations

import msgspec

from gateway.bus.jwt import Permissions
from sdk import subjects

#: Where the worker-config bucket lives in JetStream (a KV bucket is stream `KV_<bucket>`).
_CONFIG_STREAM = f"KV_{subjects.WORKER_CONFIG_BUCKET}"
_CONFIG_KEYS = f"$KV.{subjects.WORKER_CONFIG_BUCKET}"

#: Operators may also list and configure workers over NATS (clients may not).
OPERATOR_ENDPOINTS = (
    subjects.API_WORKERS_LIST,
    subjects.API_WORKERS_GET,
    subjects.API_WORKERS_CONFIG_GET,
    subjects.API_WORKERS_CONFIG_SET,
)


def _own_permissions(worker_id: str) -> Permissions:
    """A worker: its own gateway endpoints, its token stream, its dispatch consumer, its config keys."""
    consumer = subjects.dispatch_consumer(worker_id)
    own_config = [f"{_CONFIG_KEYS}.{key}" for key in (subjects.WORKER_CONFIG_DEFAULTS_KEY, worker_id)]
    return Permissions(
        publish=(
            subjects.API_WORKERS_REGISTER,
            subjects.API_WORKERS_CONFIG_GET,  # the body names the worker; the gateway checks the signature
            subjects.report_subject(worker_id),
            subjects.heartbeat_request_subject(worker_id),
            subjects.rotate_subject(worker_id),
            subjects.result_upload_subject(worker_id),
            subjects.stream_subject(worker_id, "*"),
            # Its dispatch consumer, by name, and only with a filter on its own subject (the server
            # refuses a create whose body's filter differs from the subject's): it cannot create,
            # squat or re-point another worker's consumer, or read another region's dispatches.
            f"$JS.API.CONSUMER.INFO.{subjects.DISPATCH_STREAM}.{consumer}",
            f"$JS.API.CONSUMER.CREATE.{subjects.DISPATCH_STREAM}.{consumer}.{subjects.dispatch_subject('*', worker_id)}",
            f"$JS.ACK.{subjects.DISPATCH_STREAM}.{consumer}.>",
            f"$JS.FC.{subjects.DISPATCH_STREAM}.{consumer}.>",
            # Watch `_defaults` and its own key. nats-py's KV watch creates unnamed ordered consumers,
            # whose filter travels in the body, not the subject: a worker could watch other workers'
            # runtime config too (no credentials live there; docs/security.md, residual risks).
            f"$JS.API.STREAM.INFO.{_CONFIG_STREAM}",
            f"$JS.API.CONSUMER.CREATE.{_CONFIG_STREAM}",
            # Ephemeral consumers' names are random and cannot be listed: these reach only its own.
            f"$JS.API.CONSUMER.INFO.{_CONFIG_STREAM}.*",
            f"$JS.API.CONSUMER.DELETE.{_CONFIG_STREAM}.*",
            *(f"$JS.API.DIRECT.GET.{_CONFIG_STREAM}.{key}" for key in own_config),
            f"$JS.FC.{_CONFIG_STREAM}.>",
        ),
        # Its own direct subject (clients' requests) and the platform's end orders beneath it; answers go
        # to the requester's inbox through the response permission, and nowhere else.
        subscribe=(
            f"{subjects.worker_inbox_prefix(worker_id)}.>",
            subjects.direct_subject(worker_id),
            subjects.direct_end_subject(worker_id),
        ),
        allow_responses=True,
    )


def worker_permissions(worker_id: str) -> Permissions:
    """`_own_permissions`, each JetStream API subject also as it reads through a far region's leaf server
    (in the platform's JetStream domain, docs/deployment.md)."""
    own = _own_permissions(worker_id)
    via_leaf = tuple(subjects.in_jetstream_domain(s) for s in own.publish if s.startswith(subjects.JS_API_PREFIX))
    return msgspec.structs.replace(own, publish=own.publish + via_leaf)


def enrolling_permissions(inbox_prefix: str) -> Permissions:
    """A machine holding an enrollment token: it may register (once; the gateway spends the token)."""
    return Permissions(publish=(subjects.API_WORKERS_REGISTER,), subscribe=(f"{inbox_prefix}.>",))


def client_permissions(inbox_prefix: str, *, operator: bool) -> Permissions:
    """A client: the gateway's job, direct-session and auth endpoints (every request carries its access
    token, and the gateway scopes it to the client's jobs and sessions), any worker's direct subject
    (each request carries a session token the worker checks), its own inboxes."""
    publish = (subjects.API_JOBS_ALL, subjects.API_DIRECT_ALL, subjects.API_AUTH_ALL, subjects.DIRECT_ALL)
    return Permissions(
        publish=publish + (OPERATOR_ENDPOINTS if operator else ()), subscribe=(f"{inbox_prefix}.>",)
    )

"""Errors are types. Each has a stable code; the gateway maps codes to HTTP statuses in one place
(`HTTP_STATUS`) and to NATS error replies (`ErrorReply`); the SDK maps them back to these types.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ErrorBody(msgspec.Struct, kw_only=True):
    """The body of every HTTP error response: a stable `code`, a reason for people, and details (the
    field that failed validation, the log's last sequence, ...)."""

    code: str
    message: str
    details: Any = None


class ErrorReply(ErrorBody, tag_field="kind", tag="error"):
    """A structured error reply on NATS: never silence."""


class PlatformError(Exception):
    code = "internal"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, message=self.message, details=self.details)


class BadRequest(PlatformError):
    code = "bad_request"


class JobNotFound(PlatformError):
    code = "job_not_found"


class WorkerNotFound(PlatformError):
    code = "worker_not_found"


class ApiKeyNotFound(PlatformError):
    code = "api_key_not_found"


class InvalidTransition(PlatformError):
    """The event does not apply to the job's current state (cancel a finished job, start it twice)."""

    code = "invalid_transition"


class StaleAttempt(PlatformError):
    """A worker reported about an attempt that is no longer the job's current one."""

    code = "stale_attempt"


class Conflict(PlatformError):
    """Another writer won the race on a job's subject, too many times to retry."""

    code = "conflict"


class Unauthorized(PlatformError):
    code = "unauthorized"


class Forbidden(PlatformError):
    code = "forbidden"


class Timeout(PlatformError):
    code = "timeout"


class Unavailable(PlatformError):
    """A dependency (NATS, the read model) could not answer in time."""

    code = "unavailable"


class QueueFull(PlatformError):
    """A queue limit is reached (`details`: which `limit`, its `value`, the `queued` count and
    `retry_after_s`); nothing was appended. Retry after `retry_after_s`."""

    code = "queue_full"

    @property
    def retry_after_s(self) -> float:
        return float((self.details or {}).get("retry_after_s", 1))


class JobError(PlatformError):
    """The job ended without a result (failed, cancelled or expired) where one was expected."""

    code = "job_unsuccessful"


class InsufficientGpuMemory(PlatformError):
    code = "insufficient_gpu_memory"


class SessionNotFound(PlatformError):
    """No direct session of that id (or one of another client's)."""

    code = "session_not_found"


class SessionEnded(PlatformError):
    """The direct session is over (closed, expired, its worker lost or draining): open another one."""

    code = "session_ended"


class TokenRefused(PlatformError):
    """A worker refused a direct request's session token (`details.reason`: `malformed`, `signature`,
    `wrong_worker`, `expired`, `no_key`)."""

    code = "token_refused"


class NoWorkerAvailable(PlatformError):
    """No worker can take a direct session now; `details.reasons` groups the refusals like a queued
    job's placement explanation."""

    code = "no_worker_available"


_BY_CODE: dict[str, type[PlatformError]] = {
    cls.code: cls
    for cls in (
        PlatformError,
        BadRequest,
        JobNotFound,
        WorkerNotFound,
        ApiKeyNotFound,
        InvalidTransition,
        StaleAttempt,
        Conflict,
        Unauthorized,
        Forbidden,
        Timeout,
        Unavailable,
        InsufficientGpuMemory,
        QueueFull,
        JobError,
        SessionNotFound,
        SessionEnded,
        TokenRefused,
        NoWorkerAvailable,
    )
}

HTTP_STATUS: dict[str, int] = {
    BadRequest.code: 400,
    Unauthorized.code: 401,
    Forbidden.code: 403,
    JobNotFound.code: 404,
    WorkerNotFound.code: 404,
    ApiKeyNotFound.code: 404,
    InvalidTransition.code: 409,
    StaleAttempt.code: 409,
    Conflict.code: 409,
    Timeout.code: 504,
    Unavailable.code: 503,
    InsufficientGpuMemory.code: 507,
    QueueFull.code: 429,
    JobError.code: 409,
    SessionNotFound.code: 404,
    SessionEnded.code: 410,
    TokenRefused.code: 403,
    NoWorkerAvailable.code: 409,
    PlatformError.code: 500,
}


def from_reply(reply: ErrorReply) -> PlatformError:
    """The typed exception for an error reply (or an HTTP error body)."""
    cls = _BY_CODE.get(reply.code, PlatformError)
    error = cls(reply.message, reply.details)
    if cls is PlatformError:
        error.code = reply.code
    return error

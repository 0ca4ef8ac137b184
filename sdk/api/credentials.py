"""Credentials: API keys and the tokens they buy (`api.auth.*`, `/api/v1/auth/*`), and the operator's
admin actions on keys and worker enrollment (`/api/v1/admin/*`)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from sdk.api.decoding import Strict, Token

#: What an API key may do: `operator` manages keys and workers and sees every job; `client` submits
#: jobs and sees its own.
ApiKeyRole = Literal["client", "operator"]
#: The shapes of the platform's credentials (`gfk_<id>.<secret>`, `gfr_<family>.<counter>.<mac>`), so
#: a client learns from the document what a key looks like; whether one is valid only the gateway knows.
#: Anything longer is not ours: refusing it early bounds the work it causes.
ApiKey = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^gfk_[0-9a-f]{1,64}\.[A-Za-z0-9_-]+$")]
RefreshToken = Annotated[
    str, msgspec.Meta(max_length=2048, pattern=r"^gfr_[0-9a-f]{1,64}\.[0-9]{1,12}\.[A-Za-z0-9_-]+$")
]
#: An API key's id (the part of the key before the dot, after `gfk_`).
KEY_ID_PATTERN = r"^[0-9a-f]{1,64}$"


class IssueTokens(Strict):
    api_key: ApiKey


class RefreshTokens(Strict):
    refresh_token: RefreshToken


class TokenPair(msgspec.Struct, frozen=True, kw_only=True):
    access_token: str
    refresh_token: str
    expires_in_s: float
    refresh_expires_in_s: float
    token_type: str = "Bearer"


class CreateApiKey(Strict):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    role: ApiKeyRole = "client"


class ApiKeyCreated(msgspec.Struct, kw_only=True):
    key_id: str
    name: str
    role: str
    #: The key itself: shown this once, stored only as a digest.
    api_key: str


class ApiKeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    name: str
    role: str
    created_at_ms: int
    revoked_at_ms: int | None = None


class ApiKeyList(msgspec.Struct, kw_only=True):
    items: list[ApiKeyInfo]


class CreateEnrollment(Strict):
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)] = 3600.0
    #: Only this worker id may use the token (needed to enroll a known worker again).
    worker_id: Token | None = None


class EnrollmentCreated(msgspec.Struct, kw_only=True):
    #: One use, until `expires_at_ms`; shown this once.
    enrollment_token: str
    expires_at_ms: int
    worker_id: str | None = None


class WorkerAction(msgspec.Struct, kw_only=True):
    """The outcome of an operator's action on a worker's credentials."""

    worker_id: str
    #: `rotation_requested` (the worker rotates at its next heartbeat) or `revoked`.
    status: str

"""The HTTP API (litestar): `jobs` (tokens and jobs), `operators` (workers, config, keys), `geo`
(regions, queue limits, placement explanations), `webhooks` and `openai` (the OpenAI-compatible `/v1`)
hold the routes, `params` what they share, `openapi` what the document says beyond litestar's defaults.
Handlers are thin: validate (msgspec), call the gateway service, return its struct. Errors map to statuses in one place (`sdk.errors.HTTP_STATUS`).

Authentication: every route but `/health`, `/schema` and `/api/v1/auth/*` needs
`Authorization: Bearer <access token>`. Job routes take the caller as the `principal` dependency (a
client sees its own jobs, an operator every job); worker, config and admin routes are guarded by
`operator_only` (401 without a valid token, 403 for a client's).

OpenAPI: `/schema/openapi.json`, interactive docs at `/schema`. The document carries what the server
really accepts (enums, ranges, lengths, patterns, no unknown fields, a model for the job types that need
one) and every error status a route answers, with its `ErrorBody`, so generated clients and fuzzers
send what passes and expect what comes back (`tests/test_openapi_fuzz.py` holds it to that).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import Scope
from nats.errors import ConnectionClosedError, NoServersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from gateway.auth import AuthSettings, Credentials, load_or_create_master_key
from gateway.auth.master_key import MASTER_KEY_FILE
from gateway.bus import bus_authority
from gateway.http import direct, geo, jobs, openai, operators, webhooks
from gateway.http.openapi import StrictStructSchema
from gateway.http.params import NO_AUTH, provide_gateway, provide_principal
from gateway.metrics import Operability
from gateway.nats_api import NatsApi
from gateway.service import Gateway
from gateway.webhooks import WebhookDeliverer, WebhookSecrets, WebhookSettings
from sdk.api import MAX_BODY_BYTES
from sdk.connection import connect
from sdk.errors import HTTP_STATUS, ErrorBody, PlatformError
from sdk.log import ensure_streams

logger = logging.getLogger(__name__)

#: NATS, or the stream a request needs, cannot answer now: 503, and the caller tries again. A stream
#: whose node just died answers nobody until its replicas elect a leader (`NoStreamResponseError`), and
#: JetStream says `ServiceUnavailableError` while its cluster has no meta leader.
NATS_DOWN = (
    ConnectionClosedError, NoServersError, OutboundBufferLimitError, NatsTimeoutError, NoStreamResponseError,
    ServiceUnavailableError,
)


# --- Health ----------------------------------------------------------------------------------------


@get(
    "/health", summary="Each dependency's state; 503 while NATS is unreachable", security=NO_AUTH,
    responses={HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(dict[str, str], description="A dependency is down")},
)
async def health(gateway: NamedDependency[Gateway]) -> Response[dict[str, str]]:
    state = await gateway.health()
    if all(value == "ok" for value in state.values()):
        return Response({"status": "ok", **state}, status_code=HTTP_200_OK)
    down = ", ".join(name for name, value in state.items() if value != "ok")
    body = {"status": "unavailable", **state, "code": "unavailable", "message": f"unreachable: {down}"}
    return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)


# --- Errors ----------------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, details: Any = None) -> Response[ErrorBody]:
    return Response(ErrorBody(code=code, message=message, details=details), status_code=status)


def platform_error(_: Request, exc: PlatformError) -> Response[ErrorBody]:
    response = _error(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message, exc.details)
    if exc.details and "retry_after_s" in exc.details:  # e.g. a long poll cut short by a shutdown
        response.headers["Retry-After"] = str(exc.details["retry_after_s"])
    return response


def validation_error(_: Request, exc: ValidationException) -> Response[ErrorBody]:
    return _error(400, "bad_request", str(exc.detail), exc.extra)


def http_error(_: Request, exc: HTTPException) -> Response[ErrorBody]:
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "bad_request")
    return Response(
        ErrorBody(code=code, message=str(exc.detail), details=exc.extra or None),
        status_code=exc.status_code,
        headers=exc.headers,  # `Allow` on a 405
    )


def nats_down(_: Request, exc: Exception) -> Response[ErrorBody]:
    return _error(503, "unavailable", f"NATS is unreachable: {type(exc).__name__}")


def _answered_status(exc: BaseException | None) -> int | None:
    """The status a handled error is answered with; None for an unexpected one (a 500)."""
    if isinstance(exc, PlatformError):
        status = HTTP_STATUS.get(exc.code, 500)
        return status if status != 500 else None
    if isinstance(exc, HTTPException):
        return exc.status_code if exc.status_code != 500 else None
    return 503 if isinstance(exc, NATS_DOWN) else None


def log_error(log: logging.Logger, scope: Scope, tb: list[str]) -> None:
    """Litestar's exception log: an error the API answers on purpose (a 404, a refused token, NATS down)
    is one line, at info for 4xx and warning for 5xx; only an unexpected one (a 500) gets its traceback."""
    exc = sys.exc_info()[1]  # litestar calls this inside its `except`
    status = _answered_status(exc)
    if status is None:
        log.error("%s %s: unexpected error\n%s", scope.get("method", ""), scope["path"], "".join(tb))
        return
    reason = exc.message if isinstance(exc, PlatformError) else getattr(exc, "detail", "") or type(exc).__name__
    level = logging.INFO if status < 500 else logging.WARNING
    log.log(level, "%s %s: %d %s", scope.get("method", ""), scope["path"], status, reason)


# --- App -------------------------------------------------------------------------------------------


def create_app(
    nats_url: str | None = None,
    *,
    secrets_dir: Path = Path(".data/secrets"),
    settings: AuthSettings = AuthSettings(),
    serve_nats_api: bool = True,
) -> Litestar:
    """The HTTP app; its lifespan connects to NATS, opens the credentials (master key in `secrets_dir`,
    created there on first run) and, by default, also serves the `api.>` endpoints."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        master_key = load_or_create_master_key(secrets_dir / MASTER_KEY_FILE)
        nc = await connect(nats_url, name="gateway")
        await ensure_streams(nc.jetstream())
        credentials = await Credentials.open(nc.jetstream(), master_key, settings=settings)
        # The metrics' fold of JOBS rides the gateway's one follower, from the log's first event.
        gateway = Gateway(nc, credentials, job_folds=[app.plugins.get(Operability).metrics.jobs])
        await gateway.start()
        api = NatsApi(gateway)
        if serve_nats_api:
            await api.start()
        app.state.gateway = gateway
        app.state.webhook_secrets = WebhookSecrets(gateway.js, master_key)
        deliverer = WebhookDeliverer(gateway.js, app.state.webhook_secrets, WebhookSettings.from_env(), gateway.feed)
        await deliverer.start()
        try:
            async with bus_authority(nc, credentials, secrets_dir, nats_url):
                yield
        finally:
            await deliverer.stop()
            await api.stop()
            await gateway.stop()
            await credentials.close()
            await nc.drain()

    return Litestar(
        route_handlers=[*jobs.ROUTES, *operators.ROUTES, *geo.ROUTES, *direct.ROUTES, health, openai.router, *webhooks.ROUTES],
        dependencies={"gateway": Provide(provide_gateway), "principal": Provide(provide_principal)},
        lifespan=[lifespan],
        exception_handlers={
            PlatformError: platform_error,
            ValidationException: validation_error,
            HTTPException: http_error,
            **{cls: nats_down for cls in NATS_DOWN},
        },
        openapi_config=OpenAPIConfig(
            title="gpu-fabric",
            version="0.1.0",
            path="/schema",
            components=Components(
                security_schemes={"AccessToken": SecurityScheme(type="http", scheme="bearer")}
            ),
            security=[{"AccessToken": []}],
        ),
        plugins=[StrictStructSchema(), Operability()],
        request_max_body_size=MAX_BODY_BYTES,
        # Log through the process's own setup (gpuctl's, or a test's capture) instead of replacing the
        # root logger's handlers, as litestar does by default; every error is logged (`log_error`).
        logging_config=LoggingConfig(
            configure_root_logger=False,
            loggers={"litestar": {"level": "INFO", "propagate": True}},
            log_exceptions="always",
            exception_logging_handler=log_error,
        ),
    )

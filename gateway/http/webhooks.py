"""HTTP routes of webhooks (docs/webhooks.md): the caller's signing secret, and a delivery again by hand."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from gateway.access import job_scope, require_client
from gateway.auth import Principal
from gateway.http.openapi import errors
from gateway.http.params import JobId, exact
from gateway.service import Gateway
from gateway.webhooks import WebhookSecrets, request_redelivery
from sdk.api import Accepted
from sdk.webhooks import WebhookSecret, WebhookSecretRequest


@post(
    "/api/v1/webhooks/secret", status_code=HTTP_200_OK, responses=errors(400, 401, 403, 409, 413, 503),
    summary="The caller's webhook signing secret (created on the first call; `rotate` makes a new one)",
)
async def webhook_secret(
    request: Request[Any, Any, Any], data: JSONBody[WebhookSecretRequest], state: State,
    principal: NamedDependency[Principal],
) -> WebhookSecret:
    req = await exact(request, WebhookSecretRequest)
    secrets: WebhookSecrets = state.webhook_secrets
    return await secrets.get(require_client(principal).subject, rotate=req.rotate)


@post(
    "/api/v1/jobs/{job_id:str}/webhook/redeliver", status_code=HTTP_202_ACCEPTED,
    responses=errors(400, 401, 403, 404, 409, 503), summary="Deliver a finished job's webhook again",
)
async def redeliver_webhook(
    job_id: JobId, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
) -> Accepted:
    return await request_redelivery(gateway.js, job_id, job_scope(principal))


ROUTES = [webhook_secret, redeliver_webhook]

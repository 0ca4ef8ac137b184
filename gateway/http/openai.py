"""The `/v1` routes of the OpenAI-compatible API (`gateway.openai` runs them; docs/openai.md shows the client).

Bodies are read exactly as documented (`exact`), like every route of the API; errors of these routes keep
OpenAI's shape, whatever raised them, through the router's own exception handlers.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from litestar import Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK

from gateway import openai_wire as wire
from gateway.auth import Principal
from gateway.http.params import exact
from gateway.openai import (
    Call,
    OpenAIError,
    OpenAIErrorBody,
    error_body,
    from_platform,
    provide_openai_principal,
    served_models,
    stream_text,
)
from sdk.api import GetResult
from sdk.errors import PlatformError

#: What each error status means here (`error.code` says which case).
ERROR_STATUSES = {
    400: "Bad input (`invalid_request_error`; `param` names the field)",
    401: "No valid API key or access token (`invalid_api_key`)",
    403: "A worker's token (`forbidden`)",
    404: "No online worker serves the model (`model_not_found`)",
    413: "The body is larger than the limit",
    502: "The job failed on its worker (`code` is the job's error code)",
    503: "NATS or the read model cannot answer now (`unavailable`)",
    504: "The job did not finish within 300 s (`timeout`); it is cancelled",
}
ERRORS = {
    status: ResponseSpec(OpenAIErrorBody, description=description, generate_examples=False)
    for status, description in ERROR_STATUSES.items()
}


@get("/models", summary="The models live workers serve (OpenAI's list)", responses=ERRORS)
async def list_models(state: State, principal: NamedDependency[Principal]) -> dict[str, Any]:
    return wire.models_response((await served_models(state)).models, int(time.time()))


@post(
    "/chat/completions", status_code=HTTP_200_OK, responses=ERRORS,
    summary="A chat completion; `stream: true` answers server-sent events in OpenAI's chunk format",
)
async def chat_completions(
    data: JSONBody[wire.ChatCompletionRequest],
    request: Request[Any, Any, Any],
    state: State,
    principal: NamedDependency[Principal],
) -> Any:
    return await _text(await exact(request, wire.ChatCompletionRequest), request, state, principal, chat=True)


@post(
    "/completions", status_code=HTTP_200_OK, responses=ERRORS,
    summary="A text completion of a prompt; `stream: true` answers server-sent events",
)
async def completions(
    data: JSONBody[wire.CompletionRequest],
    request: Request[Any, Any, Any],
    state: State,
    principal: NamedDependency[Principal],
) -> Any:
    return await _text(await exact(request, wire.CompletionRequest), request, state, principal, chat=False)


async def _text(
    req: wire.ChatCompletionRequest | wire.CompletionRequest,
    request: Request[Any, Any, Any],
    state: State,
    principal: Principal,
    *,
    chat: bool,
) -> Any:
    call = Call(state.gateway, principal, request)
    await call.submit(await served_models(state), "llm", req, req.model, lambda: wire.llm_params(req))
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return await stream_text(call, req.model, chat, include_usage)
    return wire.text_response(await call.finished(), chat)


@post("/embeddings", status_code=HTTP_200_OK, responses=ERRORS, summary="Embeddings of a text or texts")
async def embeddings(
    data: JSONBody[wire.EmbeddingRequest],
    request: Request[Any, Any, Any],
    state: State,
    principal: NamedDependency[Principal],
) -> dict[str, Any]:
    req = await exact(request, wire.EmbeddingRequest)
    call = Call(state.gateway, principal, request)
    await call.submit(await served_models(state), "embedding", req, req.model, lambda: wire.embedding_params(req))
    return wire.embedding_response(await call.finished(), req.encoding_format)


@post("/images/generations", status_code=HTTP_200_OK, responses=ERRORS, summary="Images from a prompt")
async def image_generations(
    data: JSONBody[wire.ImageRequest],
    request: Request[Any, Any, Any],
    state: State,
    principal: NamedDependency[Principal],
) -> dict[str, Any]:
    req = await exact(request, wire.ImageRequest)
    call = Call(state.gateway, principal, request)
    job_id = await call.submit(await served_models(state), "image", req, req.model, lambda: wire.image_params(req))
    job = await call.finished()
    images = []
    for index in range(len(job.result["images"])):
        if req.response_format == "url":
            # The platform's own result route: it takes an access token, as every /api/v1 route does.
            images.append({"url": f"{str(request.base_url).rstrip('/')}/api/v1/jobs/{job_id}/result/{index}"})
        else:
            png, _ = await call.gateway.result(GetResult(id=job_id, index=index), call.scope)
            images.append({"b64_json": base64.b64encode(png).decode()})
    return {"created": wire.created_at(job), "data": images}


# --- Errors, in OpenAI's shape -------------------------------------------------------------------


def _answer(exc: OpenAIError) -> Response[OpenAIErrorBody]:
    return Response(error_body(exc), status_code=exc.status)


def openai_error(_: Request, exc: OpenAIError) -> Response[OpenAIErrorBody]:
    return _answer(exc)


def platform_error(_: Request, exc: PlatformError) -> Response[OpenAIErrorBody]:
    return _answer(from_platform(exc))


def validation_error(_: Request, exc: ValidationException) -> Response[OpenAIErrorBody]:
    message, param = str(exc.detail), None
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict) and item.get("message"):
            # litestar names the field when msgspec checked its value, else the whole body (`data`).
            message = str(item["message"])
            param = item.get("key") if item.get("key") not in (None, "data") else wire.param_of(message)
    return _answer(OpenAIError(400, f"`{param}`: {message}" if param else message, "invalid_request_error", param))


def http_error(_: Request, exc: HTTPException) -> Response[OpenAIErrorBody]:
    return _answer(OpenAIError(exc.status_code, str(exc.detail), None))


router = Router(
    "/v1",
    route_handlers=[list_models, chat_completions, completions, embeddings, image_generations],
    dependencies={"principal": Provide(provide_openai_principal)},
    exception_handlers={
        OpenAIError: openai_error,
        PlatformError: platform_error,
        ValidationException: validation_error,
        HTTPException: http_error,
    },
    tags=["openai"],
)

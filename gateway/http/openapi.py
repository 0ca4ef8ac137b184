"""What the OpenAPI document says beyond litestar's defaults, so that it describes the server exactly.

- Request structs (`sdk.api.Strict`) refuse unknown fields: their schemas say `additionalProperties: false`,
  and a submission of a job type that runs a model requires `model` (`sdk.api.NEEDS_MODEL`).
- A bound of 0 on an optional number (`int | None` with `ge=0`) is kept: litestar drops falsy bounds
  of union fields.
- Every error a route answers is listed with its status and the one error body (`sdk.errors.ErrorBody`),
  instead of litestar's own validation-error shape, which the server never sends.
"""

from __future__ import annotations

import msgspec
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.typing import FieldDefinition

from sdk.api import NEEDS_MODEL, Strict, SubmitJob
from sdk.direct import OpenSession
from sdk.errors import ErrorBody

#: What each error status means on this API (the `code` in the body says which case it is).
ERROR_STATUSES: dict[int, str] = {
    400: "Bad input: the message names the field or the rule (`bad_request`); nothing was changed",
    401: "No valid access token, or a wrong credential (`unauthorized`, `details.reason` says why)",
    403: "The token's role may not do this (`forbidden`)",
    404: "No such job, worker, key or direct session for this caller (`job_not_found`, `worker_not_found`, "
    "`not_found`, `session_not_found`)",
    409: "The request conflicts with the current state (`invalid_transition`, `conflict`), or no worker can take "
    "a direct session now (`no_worker_available`, `details.reasons` as a placement explanation)",
    410: "The direct session is over: closed, expired, or its worker lost or draining (`session_ended`); open another",
    413: "The body is larger than the limit (`body_too_large`)",
    429: "A queue limit is reached (`queue_full`, `details.limit`); nothing was appended; retry after `Retry-After`",
    503: "NATS or the read model cannot answer now (`unavailable`); retry later",
    504: "Nothing finished within the requested time (`timeout`)",
}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """The `responses` entries for the error statuses a route answers."""
    return {
        status: ResponseSpec(ErrorBody, description=ERROR_STATUSES[status], generate_examples=False)
        for status in statuses
    }


class StrictStructSchema(StructSchemaPlugin):
    """Litestar's struct schemas (a private class of litestar: its public plugin protocol would mean
    rewriting the whole struct walk), plus what `Strict` structs enforce when they are decoded."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return super().is_plugin_supported_field(field_definition) and field_definition.is_subclass_of(Strict)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: object) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)  # type: ignore[arg-type]
        schema.additional_properties = False
        _keep_zero_bounds(field_definition.type_, schema)
        if field_definition.type_ in (SubmitJob, OpenSession):
            schema.schema_if = Schema(
                properties={"type": Schema(enum=list(NEEDS_MODEL))}, required=["type"]
            )
            schema.then = Schema(required=["model"], properties={"model": Schema(type=OpenAPIType.STRING)})
            schema.all_of = list(_REGION_RULES)
        return schema


#: What `sdk.api.jobs.check_placement` refuses besides a missing model: a policy that needs a region
#: without one, and `max_latency_ms` without a region or with a policy other than `nearest`.
_REGION_RULES = (
    Schema(
        schema_if=Schema(properties={"region_policy": Schema(enum=["nearest", "strict"])}, required=["region_policy"]),
        then=Schema(required=["region"], properties={"region": Schema(type=OpenAPIType.STRING)}),
    ),
    Schema(
        schema_if=Schema(properties={"max_latency_ms": Schema(type=OpenAPIType.NUMBER)}, required=["max_latency_ms"]),
        then=Schema(
            required=["region"],
            properties={"region": Schema(type=OpenAPIType.STRING), "region_policy": Schema(enum=["nearest", None])},
        ),
    ),
)


def _keep_zero_bounds(struct: type[Strict], schema: Schema) -> None:
    """Put back the `minimum: 0` / `exclusiveMinimum: 0` that litestar leaves out of optional fields."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        prop = (schema.properties or {}).get(field.encode_name)
        kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
        for kind in kinds:
            if isinstance(prop, Schema) and isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType):
                if kind.ge == 0 and prop.minimum is None:
                    prop.minimum = 0
                if kind.gt == 0 and prop.exclusive_minimum is None:
                    prop.exclusive_minimum = 0

"""Decoding input from outside: the `Strict` base of every request struct, the field types they share,
and `decode` / `convert`, which turn a mismatch into a `BadRequest` naming the field."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from sdk.errors import BadRequest

#: Regions, names and ids become NATS subject tokens and KV keys: no dots, spaces or wildcards.
TOKEN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]

MAX_BODY_BYTES = 1_048_576


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of inputs from outside: an unknown field is an error, not silently dropped."""


_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(data: bytes, kind: Any, *, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """Decode untrusted JSON into `kind`; any mismatch becomes a `BadRequest` naming the field."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    if len(data) > max_bytes:
        raise BadRequest(f"body is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequest(str(exc)) from None


def convert(obj: Any, kind: Any) -> Any:
    """Validate an already-parsed object (query parameters, a merged config) into `kind`."""
    try:
        return msgspec.convert(obj, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None

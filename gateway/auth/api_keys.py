"""API keys: created by an operator, shown once, exchanged for token families, revoked for good.

A key is stored as a keyed digest (`records.ApiKeyRecord`); revoking it writes the record and a marker
(`revoked.client.<key_id>`) that stops every access token issued for it. The record is written first:
a revoke whose marker write failed is repaired by revoking again, which writes the marker again.
"""

from __future__ import annotations

import logging
from typing import get_args

from gateway.auth import records
from gateway.auth.families import TokenFamilies
from gateway.auth.records import ApiKeyRecord, Revocation, apikey_key, subject_revocation_key
from gateway.auth.tokens import API_KEY_PREFIX, Principal, new_family_id, split_secret_token
from sdk.api import ApiKeyInfo, ApiKeyRole, TokenPair
from sdk.errors import ApiKeyNotFound, BadRequest
from sdk.signing import AuthReason, refused

logger = logging.getLogger(__name__)

API_KEY_ROLES: tuple[str, ...] = get_args(ApiKeyRole)


class ApiKeys(TokenFamilies):
    async def create_api_key(self, name: str, role: ApiKeyRole = "client") -> tuple[str, str]:
        """A new API key as `(key_id, plaintext)`; the plaintext is shown once and never stored."""
        if role not in API_KEY_ROLES:
            raise BadRequest(f"role must be one of {', '.join(API_KEY_ROLES)}, not {role!r}")
        if not 0 < len(name) <= 200:
            raise BadRequest("an API key's name must be 1 to 200 characters")
        key_id, key, key_digest = self._new_secret(API_KEY_PREFIX)
        record = ApiKeyRecord(key_id=key_id, name=name, role=role, digest=key_digest, created_at_ms=self._clock())
        await self._bucket.create(apikey_key(key_id), record)
        logger.info("created API key %s (%r, role %s)", key_id, name, role)
        return key_id, key

    async def list_api_keys(self) -> list[ApiKeyInfo]:
        keys: list[ApiKeyRecord] = []
        watcher = await self._bucket.kv.watch(records.API_KEYS.below, ignore_deletes=True)
        while (entry := await watcher.updates()) is not None:
            keys.append(records.apikey_decoder.decode(entry.value or b""))
        await watcher.stop()
        return [
            ApiKeyInfo(
                key_id=k.key_id, name=k.name, role=k.role, created_at_ms=k.created_at_ms, revoked_at_ms=k.revoked_at_ms
            )
            for k in sorted(keys, key=lambda k: (k.created_at_ms, k.key_id))
        ]

    async def revoke_api_key(self, key_id: str) -> None:
        """Refuse the key from now on, and every access token issued for it so far. Idempotent: revoking
        a revoked key writes its marker again (the repair for a marker write that failed)."""
        missing = ApiKeyNotFound(f"no API key {key_id}", {"reason": AuthReason.UNKNOWN.value})
        record = await self._revoke_record(apikey_key(key_id), records.apikey_decoder.decode, missing)
        assert record.revoked_at_ms is not None
        marker = Revocation(at_ms=record.revoked_at_ms, reason="API key revoked")
        await self._mark(subject_revocation_key("client", key_id), marker)
        logger.info("revoked API key %s (%r)", key_id, record.name)

    async def verify_api_key(self, api_key: str) -> Principal:
        """The principal of a valid, unrevoked API key, issuing nothing (the NATS auth callout checks the
        key a client connects with); `Unauthorized` with the reason otherwise."""
        key_id, loaded = await self._load_secret(
            api_key, API_KEY_PREFIX, "API key", apikey_key, records.apikey_decoder.decode
        )
        if loaded.value.revoked_at_ms is not None:
            raise refused(AuthReason.REVOKED, "API key revoked")
        return Principal(subject=key_id, kind="client", role=loaded.value.role, family="")

    async def issue_tokens(self, api_key: str) -> TokenPair:
        """Exchange an API key for a new token family's first pair."""
        # The clock first: a token is never stamped later than the check that allowed it.
        now = self._clock()
        key_id = split_secret_token(api_key, API_KEY_PREFIX, "API key")
        loaded = await self._bucket.load(apikey_key(key_id), records.apikey_decoder.decode)
        if loaded is None:
            raise refused(AuthReason.UNKNOWN, "unknown API key")
        record = loaded.value
        if not self._secret_matches(api_key, record.digest):
            raise refused(AuthReason.BAD_SIGNATURE, "invalid API key")
        if record.revoked_at_ms is not None:
            raise refused(AuthReason.REVOKED, "API key revoked")
        family = await self._family(new_family_id(), key_id, "client", record.role, now)
        logger.info("issued tokens to API key %s (family %s)", key_id, family.family)
        return self._pair(family, now)

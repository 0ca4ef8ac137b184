"""The SDK's side of authentication: an API key's access and refresh tokens, obtained and renewed by
themselves. `Client` (NATS) and `HttpClient` (HTTP) share this one `TokenSession`; only how they ask
the gateway differs.

A request goes out with the current access token. When the gateway answers `Unauthorized` with reason
`expired`, the session refreshes the pair (or, if the refresh is refused, exchanges the API key again)
and the request is sent once more, so a caller never sees an expiry a refresh could have fixed. Any
other refusal (a revoked key, a reused refresh token) reaches the caller as it is.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sdk.api import TokenPair
from sdk.errors import Unauthorized
from sdk.signing import AuthReason
from sdk.subjects import AUTH_HEADER

logger = logging.getLogger(__name__)

#: Where the SDK and the command-line tools find an API key when none is passed.
API_KEY_ENV = "GF_API_KEY"

T = TypeVar("T")
Headers = dict[str, str] | None


def reason(exc: Unauthorized) -> str | None:
    return (exc.details or {}).get("reason")


class TokenSession:
    """The tokens of one API key. `issue(api_key)` and `refresh(refresh_token)` ask the gateway."""

    def __init__(
        self,
        api_key: str | None,
        *,
        issue: Callable[[str], Awaitable[TokenPair]],
        refresh: Callable[[str], Awaitable[TokenPair]],
    ) -> None:
        self._api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self._issue = issue
        self._refresh = refresh
        self._pair: TokenPair | None = None
        # One renewal at a time: two refreshes of one token would look like a stolen token (reuse).
        self._lock = asyncio.Lock()
        #: How many times an expired access token was renewed (refreshed or issued again).
        self.renewals = 0

    @property
    def access_token(self) -> str | None:
        return self._pair.access_token if self._pair is not None else None

    async def headers(self) -> Headers:
        """The `Authorization` header for the next request (tokens are obtained on first use); None
        without an API key, so the gateway answers 401 `missing_header`."""
        if self._api_key is None:
            return None
        if self._pair is None:
            async with self._lock:
                if self._pair is None:
                    self._pair = await self._issue(self._api_key)
                    logger.debug("exchanged the API key for tokens")
        return {AUTH_HEADER: f"Bearer {self._pair.access_token}"}

    async def call(self, send: Callable[[Headers], Awaitable[T]]) -> T:
        """`send(headers)`, and once more with renewed tokens if the access token had expired."""
        headers = await self.headers()
        try:
            return await send(headers)
        except Unauthorized as exc:
            if headers is None or reason(exc) != AuthReason.EXPIRED:
                raise
        await self._renew(headers[AUTH_HEADER])
        return await send(await self.headers())

    async def _renew(self, expired: str) -> None:
        async with self._lock:
            assert self._pair is not None and self._api_key is not None
            if expired != f"Bearer {self._pair.access_token}":
                return  # another request renewed the pair meanwhile
            try:
                self._pair = await self._refresh(self._pair.refresh_token)
            except Unauthorized as exc:
                logger.info("token refresh refused (%s); signing in again with the API key", reason(exc))
                self._pair = await self._issue(self._api_key)
            self.renewals += 1

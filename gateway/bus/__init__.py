"""Per-principal NATS identities: the auth callout (`callout`), the permissions of each identity
(`permissions`) and the JWTs that carry them (`jwt`). docs/security.md, "NATS identities"."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nats.aio.client import Client as NatsClient

from gateway.auth import Credentials
from gateway.bus.advisories import ConnectionAdvisories
from gateway.bus.callout import BusAuthority
from sdk.broker import NATS_ENV_FILE, load_or_create_issuer, password_variable, read_nats_env
from sdk.connection import connect, nats_url_from_env, with_user

logger = logging.getLogger(__name__)

__all__ = ["BusAuthority", "bus_authority"]


@asynccontextmanager
async def bus_authority(
    nc: NatsClient, credentials: Credentials, secrets_dir: Path, nats_url: str | None
) -> AsyncIterator[BusAuthority]:
    """The callout, answering while the context is open. Its issuer seed is in `secrets_dir` (or
    `$GF_AUTH_ISSUER_SEED`); the system account's password (for kicks) is read from `secrets_dir/nats.env`
    when the server is ours, else from `$GF_SYSTEM_PASSWORD`. With that connection the workers' connection
    advisories are forwarded to the schedulers too (`advisories`)."""
    system = await _system_connection(secrets_dir, nats_url)
    authority = BusAuthority(nc, credentials, load_or_create_issuer(secrets_dir), system)
    advisories = ConnectionAdvisories(nc, system) if system is not None else None
    await authority.start()
    try:
        if advisories is not None:
            await advisories.start()
        yield authority
    finally:
        if advisories is not None:
            await advisories.stop()
        await authority.stop()
        if system is not None:
            await system.close()


async def _system_connection(secrets_dir: Path, nats_url: str | None) -> NatsClient | None:
    variable = password_variable("system")
    password = read_nats_env(secrets_dir).get(variable) or os.environ.get(variable)
    if password is None:
        logger.warning(
            "no system account password in %s: revoked identities keep their connection until it expires",
            secrets_dir / NATS_ENV_FILE,
        )
        return None
    return await connect(with_user(nats_url_from_env(nats_url), "system", password), name="gateway-system")

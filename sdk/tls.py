"""TLS for connections to NATS and to the HTTP gateway, seen from the connecting side.

Certificates are verified by default (chain and host name). Turning verification off is one explicit
choice per environment: `GF_TLS_VERIFY=false`, accepted only where `GF_ENV` is `dev` or `test` and
logged as a warning at every start; a program that passes `verify=False` itself gets the warning too.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from sdk.errors import BadRequest

logger = logging.getLogger(__name__)

#: A CA bundle (PEM) that signed the servers' certificates; the system's CAs otherwise.
TLS_CA_ENV = "GF_TLS_CA"
#: `false` turns certificate verification off (dev and test environments only).
TLS_VERIFY_ENV = "GF_TLS_VERIFY"
#: The environment's name; verification may be off only in these.
ENV_NAME_ENV = "GF_ENV"
INSECURE_ENVIRONMENTS = ("dev", "test")

Verify = bool | str | Path | ssl.SSLContext


def client_context(ca_file: str | Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A context that verifies the server against `ca_file` (or the system CAs), unless `verify` is off."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        logger.warning("TLS certificate verification is OFF: any server can pose as the platform")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def context_from_env(env: Mapping[str, str] = os.environ) -> ssl.SSLContext | None:
    """The context `GF_TLS_CA` / `GF_TLS_VERIFY` ask for, or None when neither is set (then a `tls://`
    URL gets nats-py's default, verifying context). Raises `BadRequest` for verification off outside
    the dev and test environments."""
    ca_file = env.get(TLS_CA_ENV) or None
    verify_text = env.get(TLS_VERIFY_ENV, "").strip().lower()
    if ca_file is None and not verify_text:
        return None
    if verify_text not in ("", "true", "1", "false", "0"):
        raise BadRequest(f"{TLS_VERIFY_ENV} must be true or false, not {verify_text!r}")
    verify = verify_text not in ("false", "0")
    if not verify and env.get(ENV_NAME_ENV) not in INSECURE_ENVIRONMENTS:
        raise BadRequest(
            f"{TLS_VERIFY_ENV}=false is accepted only with {ENV_NAME_ENV} set to one of "
            f"{', '.join(INSECURE_ENVIRONMENTS)}"
        )
    return client_context(ca_file, verify=verify)


def httpx_verify(verify: Verify) -> ssl.SSLContext | bool:
    """httpx's `verify=` for ours: True (system CAs), a CA bundle path, a context, or False."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        return client_context(verify=False)
    if verify is True:
        return True
    return client_context(verify)

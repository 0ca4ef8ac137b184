"""Who may do what: the gateway's access rules, applied the same way to HTTP and NATS requests.

Every request except `/health`, `/schema` and the token exchange carries an access token; the gateway
turns it into a `Principal` once, then one of these rules decides:

| principal            | jobs                                   | workers, config, admin |
| -------------------- | -------------------------------------- | ---------------------- |
| client API key       | submits; sees and cancels its own jobs | refused (`Forbidden`)  |
| operator API key     | submits; sees and cancels every job    | allowed                |
| worker (its token)   | refused                                | refused                |

Workers authenticate their own endpoints with signatures instead (`Credentials.verify_report`).
"""

from __future__ import annotations

from gateway.auth.tokens import Principal
from sdk.errors import Forbidden


def require_client(principal: Principal) -> Principal:
    """A principal that may use the job API: an API key's holder, not a worker."""
    if principal.kind != "client":
        raise Forbidden(f"a {principal.kind} token cannot use the job API", {"reason": "role"})
    return principal


def require_operator(principal: Principal) -> Principal:
    if principal.role != "operator":
        raise Forbidden("this needs an operator API key", {"reason": "role"})
    return principal


def job_scope(principal: Principal) -> str | None:
    """The owner a query is limited to: None (every job) for an operator, the API key's id for a client."""
    require_client(principal)
    return None if principal.role == "operator" else principal.subject

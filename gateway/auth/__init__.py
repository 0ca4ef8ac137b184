"""Authentication of clients and workers: API keys, rotating access/refresh tokens, worker enrollment
and rotation, and verification of signed worker requests. docs/security.md explains the threat model.

The parts: `master_key` (the root secret and derivation), `tokens` (credential formats, pure),
`records` (what the `auth` bucket holds), `revocations` (the in-memory revocation mirror), `replay`
(timestamp window and nonces), `families` (token families, refresh, access-token checks), `api_keys`,
`workers` (enrollment, rotation, revocation), `signed` (signed worker requests) and `credentials`
(the service the gateway calls, made of those parts). Every read-decide-write goes through
`gateway.kv.Bucket.update`.
"""

from gateway.auth.credentials import Credentials
from gateway.auth.families import AuthSettings
from gateway.auth.master_key import load_or_create_master_key
from gateway.auth.replay import NonceWindow
from gateway.auth.tokens import Principal
from sdk.api import ApiKeyInfo, TokenPair, WorkerCredentials

__all__ = [
    "ApiKeyInfo",
    "AuthSettings",
    "Credentials",
    "NonceWindow",
    "Principal",
    "TokenPair",
    "WorkerCredentials",
    "load_or_create_master_key",
]

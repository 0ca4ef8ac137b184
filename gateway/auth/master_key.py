"""The platform's master key: 32 random bytes in the data directory, and the keys derived from it.

Every secret the platform hands out is either random and stored only as a keyed digest, or derived from
this key (worker HMAC secrets, token MACs). So the `auth` bucket alone reveals nothing, and losing the
key file invalidates every credential at once (which is also how to revoke everything).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdk.private_files import write_private

logger = logging.getLogger(__name__)

MASTER_KEY_BYTES = 32
#: The key's file name in the secrets dir (`<data dir>/secrets`, or the gateway's `--secrets-dir`).
MASTER_KEY_FILE = "master.key"


def load_or_create_master_key(path: Path) -> bytes:
    """Read the key at `path`, or create it (mode 0600) on first run.

    Runs once at start-up, before the event loop has anything else to do, so it uses plain file I/O.
    """
    path = Path(path)
    if not path.exists():
        _create(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Like ssh with a private key: a key others can read may already have leaked.
        raise PermissionError(f"master key {path} has mode {mode:o}; run `chmod 600 {path}`")
    key = path.read_bytes()
    if len(key) != MASTER_KEY_BYTES:
        raise ValueError(f"master key {path} holds {len(key)} bytes, expected {MASTER_KEY_BYTES}")
    return key


def _create(path: Path) -> None:
    # Of two processes starting at once, exactly one key wins; both then read that one.
    if write_private(path, secrets.token_bytes(MASTER_KEY_BYTES), replace=False):
        logger.info("created master key %s", path)


def derive_key(master_key: bytes, purpose: str) -> bytes:
    """A key for one purpose, so a MAC made for one use (an access token) is never valid for another."""
    return hmac.new(master_key, purpose.encode(), hashlib.sha256).digest()


def worker_secret(master_key: bytes, worker_id: str, generation: int) -> bytes:
    """The HMAC secret of a worker's credential generation; derived, so nothing secret is stored."""
    return derive_key(master_key, f"worker:{worker_id}:{generation}")


def session_signing_key(master_key: bytes) -> Ed25519PrivateKey:
    """The Ed25519 key that signs direct-session tokens (`sdk.direct`): derived, so every gateway of the
    platform signs alike, and workers verify with its public half from their runtime config."""
    return Ed25519PrivateKey.from_private_bytes(derive_key(master_key, "direct-session-tokens"))

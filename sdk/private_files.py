"""Files that hold secrets or identities (keys, passwords, credentials, worker ids): written whole or not
at all, readable by their owner only."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Write `data` to `path` atomically with mode 0600 (its folder 0700 when created). With
    `replace=False` an existing file wins, and of two processes creating it at once exactly one does.
    Returns whether this call wrote the file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)  # fails if the name exists: the first writer wins
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)

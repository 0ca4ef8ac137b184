"""The `gpu-worker` application that every command registers on, and how a command fails.

Exit statuses: 0 done, 1 the platform could not be reached or does not know the worker (or the worker
could not start), 2 a bad flag, key or value (nothing was changed).
"""

from __future__ import annotations

import sys

from cyclopts import App

from sdk.errors import BadRequest, PlatformError, Timeout, Unavailable

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2

app = App(name="gpu-worker", help="Run this machine as a GPU worker of the gpu-fabric platform.")


def fail(exc: PlatformError) -> int:
    """Print why a command failed; the exit status says whether it was the input (2) or the platform (1)."""
    message = exc.message
    if isinstance(exc, (Unavailable, Timeout)):
        message = f"cannot reach the platform: {message}"
    if isinstance(exc, Timeout):
        # A NATS user without the right to ask (a worker's own) gets no answer at all, not a refusal.
        message += "; this needs an operator's NATS user and API key (GF_API_KEY)"
    print(f"gpu-worker: {message}", file=sys.stderr)
    return EXIT_BAD_CONFIG if isinstance(exc, BadRequest) else EXIT_FAILED


def main() -> None:
    app()

"""Running the gateway as a process: uvicorn serving the litestar app (over TLS when given a
certificate), stopped by an event.

Stopping: uvicorn waits for open requests before it runs the app's shutdown, so the pending long polls
and streams are answered first (503, `Retry-After`; `JobFeed.close`); whatever else is still open after
`GRACEFUL_SHUTDOWN_S` is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from gateway.admin import open_admin
from gateway.auth import AuthSettings
from gateway.http import create_app
from gateway.metrics import Operability
from sdk.api import CreateApiKey
from sdk.local import OPERATOR_KEY_FILE
from sdk.metrics import DEFAULT_METRICS_HOST, metrics_endpoint
from sdk.private_files import write_private

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The caller owns signals (gpuctl turns them into `stop`); uvicorn must not re-raise them.
        yield


async def serve(
    nats_url: str | None,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    secrets_dir: Path,
    settings: AuthSettings = AuthSettings(),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    serve_nats_api: bool = True,
    metrics_port: int | None = None,
    metrics_host: str = DEFAULT_METRICS_HOST,
    reuse_port: bool = False,
) -> None:
    """Serve until `stop` is set. With `tls_cert` (and `tls_key`, unless the certificate file holds
    the key too) the API is HTTPS only. With `metrics_port`, this process's own metrics are served there
    too (`sdk.metrics`); `/metrics` on the API port has them and the fleet's. With `reuse_port` several
    gateways listen on the same port and the kernel spreads new connections over them (one that dies
    drops out of the group)."""
    await ensure_operator_key(nats_url, secrets_dir)
    app = create_app(nats_url, secrets_dir=secrets_dir, settings=settings, serve_nats_api=serve_nats_api)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
    )
    server = _Server(config)
    with metrics_endpoint(metrics_port, host=metrics_host, registry=app.plugins.get(Operability).metrics.process):
        task = asyncio.create_task(server.serve(sockets=[shared_socket(host, port)] if reuse_port else None))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if (gateway := app.state.get("gateway")) is not None:
            gateway.feed.close()
        server.should_exit = True
        await task
        stopped.cancel()
    logger.info("gateway on %s:%s stopped", host, port)


def shared_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT, which other gateways on the same port also bind (Linux, the BSDs)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("--reuse-port needs SO_REUSEPORT, which this platform lacks: run one gateway per port")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    logger.info("gateway shares %s:%s with the other gateways (SO_REUSEPORT)", host, port)
    return sock


async def ensure_operator_key(nats_url: str | None, secrets_dir: Path) -> None:
    """First start: an operator API key in `<secrets_dir>/operator.key` (0600), the one credential no client
    can ask for (every admin route needs an operator). Of two gateways starting at once, one key is kept."""
    path = secrets_dir / OPERATOR_KEY_FILE
    if path.exists():
        return
    async with open_admin(nats_url, secrets_dir) as admin:
        created = await admin.create_api_key(CreateApiKey(name="operator (first start)", role="operator"))
        if write_private(path, (created.api_key + "\n").encode(), replace=False):
            logger.info("created the first operator API key %s in %s", created.key_id, path)
        else:
            await admin.revoke_api_key(created.key_id)  # another gateway wrote its key first

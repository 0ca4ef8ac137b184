"""Running the gateway as a process: uvicorn serving the litestar app, stopped by an event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from gateway.http import create_app

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The caller owns signals (gpuctl turns them into `stop`); uvicorn must not re-raise them.
        yield


async def serve(nats_url: str | None, host: str, port: int, stop: asyncio.Event) -> None:
    config = uvicorn.Config(create_app(nats_url), host=host, port=port, log_level="warning", lifespan="on")
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    stopped.cancel()
    logger.info("gateway on %s:%s stopped", host, port)

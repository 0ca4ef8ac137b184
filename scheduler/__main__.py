"""`python -m scheduler`: run one scheduler instance (leader or hot standby) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from scheduler.service import serve
from sdk.connection import nats_url_from_env


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(nats_url_from_env(), stop, os.environ.get("SCHEDULER_ID"))


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    asyncio.run(main())

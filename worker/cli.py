"""`gpu-worker`: run this machine as a worker of the platform.

`gpu-worker start` reads the local config (flags > `GPU_WORKER_*` > config.yaml > defaults), runs the
echo engine plus whichever model engines this install can import (torch, transformers, diffusers
come with the `engines` extra), and stops cleanly on SIGINT/SIGTERM: a first signal lets running
jobs finish (up to `drain_timeout_s`), a second one stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from cyclopts import App
from nats.errors import Error as NatsError

from sdk.api import ReportModelLoaded, ReportModelUnloaded
from sdk.errors import PlatformError
from worker.config import ConfigError, LocalConfig, load_config
from worker.engines.base import BaseEngine
from worker.engines.echo import EchoEngine
from worker.runtime import HostTelemetry, Worker

logger = logging.getLogger(__name__)

#: Engines that need the heavy `engines` extra; a worker without it still runs echo jobs.
MODEL_ENGINE_MODULES = ("worker.engines.llm", "worker.engines.image")

#: Packages that log at the configured level; every other library logs warnings only.
LOGGED_PACKAGES = ("worker", "sdk")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Exit statuses: a bad flag or config value, and a worker that could not start.
EXIT_BAD_CONFIG = 2
EXIT_START_FAILED = 1

app = App(name="gpu-worker", help="Run this machine as a GPU worker of the gpu-fabric platform.")


@app.command
def start(
    *,
    nats_url: str | None = None,
    name: str | None = None,
    region: str | None = None,
    config: Path | None = None,
    state_dir: Path | None = None,
) -> int:
    """Run the worker until SIGINT or SIGTERM.

    Parameters
    ----------
    nats_url
        The platform's NATS server(s), comma-separated (default: $NATS_URL, else nats://127.0.0.1:4222).
    name
        The name operators see (default: the host name).
    region
        The region this worker serves (default: "default").
    config
        The config file (default: $GPU_WORKER_CONFIG, else ~/.config/gpu-worker/config.yaml).
    state_dir
        Where the worker keeps its identity between runs (default: ~/.local/state/gpu-worker).
    """
    flags = {"nats_url": nats_url, "name": name, "region": region, "state_dir": str(state_dir) if state_dir else None}
    try:
        local = load_config(config, overrides=flags)
    except ConfigError as exc:
        print(f"gpu-worker: {exc.message}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT)
    for package in LOGGED_PACKAGES:
        logging.getLogger(package).setLevel(local.log_level.upper())
    # Importing the model engines (torch) takes seconds; a stop meanwhile has nothing to clean up.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_before_start)
    return asyncio.run(_serve(local, available_engines()))


def _exit_before_start(signum: int, frame: object) -> None:
    logger.info("%s before the worker started: exiting", signal.Signals(signum).name)
    raise SystemExit(0)


def available_engines() -> dict[str, BaseEngine]:
    """Echo, plus each model engine whose module imports here (skipped, with a log line, when not)."""
    engines: dict[str, BaseEngine] = {EchoEngine.job_type: EchoEngine()}
    for module_name in MODEL_ENGINE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            logger.info("%s unavailable (%s); install gpu-fabric[engines] to run it", module_name, exc)
            continue
        except Exception:
            # A broken engine must not keep the others from serving.
            logger.exception("%s failed to import; running without it", module_name)
            continue
        for engine_class in _engine_classes(module):
            engines[engine_class.job_type] = engine_class()
    return engines


def _engine_classes(module: ModuleType) -> list[type[BaseEngine]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseEngine)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]


async def _serve(config: LocalConfig, engines: Mapping[str, BaseEngine]) -> int:
    try:
        worker = _build_worker(config, engines)
    except (OSError, ValueError) as exc:  # unreadable TLS files, an engine that does not fit
        logger.error("the worker cannot be set up: %s", exc)
        return EXIT_BAD_CONFIG
    stop_requested = asyncio.Event()
    forced: list[asyncio.Task[None]] = []

    def on_signal(signum: signal.Signals) -> None:
        if not stop_requested.is_set():
            logger.info("%s: stopping (send it again to stop without waiting for jobs)", signum.name)
            stop_requested.set()
        else:
            logger.warning("%s again: stopping now", signum.name)
            forced.append(asyncio.create_task(worker.stop(drain=False)))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows has no signal handlers in asyncio
            loop.add_signal_handler(signum, on_signal, signum)

    # A signal during start (NATS or the gateway still coming up) must stop it too.
    starting = asyncio.create_task(worker.start())
    stopping = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return 0
    stopping.cancel()
    if (exc := starting.exception()) is not None:
        if not isinstance(exc, (PlatformError, NatsError, OSError)):
            raise exc
        logger.error("the worker could not start: %s", exc)
        return EXIT_START_FAILED
    await stop_requested.wait()
    await worker.stop(drain=True)
    await asyncio.gather(*forced)
    return 0


def _build_worker(config: LocalConfig, engines: Mapping[str, BaseEngine]) -> Worker:
    """The worker with its model cache and telemetry; those modules need no torch to import."""
    from worker.models import MemoryProbe, ModelCache
    from worker.telemetry import gpu_snapshot

    probe = MemoryProbe(config.gpu_indices)
    limit_bytes = config.memory.limit_bytes

    def telemetry() -> HostTelemetry:
        free_bytes = probe.free_bytes()
        if limit_bytes is not None:
            free_bytes = limit_bytes if free_bytes is None else min(free_bytes, limit_bytes)
        return HostTelemetry(gpus=tuple(gpu_snapshot(config.gpu_indices)), memory_free_bytes=free_bytes)

    if not any(engine.needs_model for engine in engines.values()):
        return Worker.from_config(config, engines, telemetry=telemetry)
    cache = ModelCache(probe, limit_bytes=limit_bytes)
    worker = Worker.from_config(
        config, engines, models=cache, telemetry=telemetry, loaded_models=lambda: [m.model for m in cache.loaded()]
    )

    async def on_loaded(model: str, memory_bytes: int) -> None:
        await worker.report(ReportModelLoaded(model=model, memory_bytes=memory_bytes))

    async def on_unloaded(model: str) -> None:
        await worker.report(ReportModelUnloaded(model=model))

    cache.on_loaded, cache.on_unloaded = on_loaded, on_unloaded
    return worker


def main() -> None:
    app()

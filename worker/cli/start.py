"""`gpu-worker start`: run this machine's worker until SIGINT or SIGTERM.

The worker is built by `Worker.from_config` from the local config and the engines asked for; this command
adds only what a person at a terminal needs: logging, the live screen, and the signals. A first signal
drains (running jobs finish, up to `drain_timeout_s`), a second one stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import get_args

from nats.errors import Error as NatsError
from rich.console import Console
from rich.logging import RichHandler

from sdk.api import JobType
from sdk.errors import BadRequest, PlatformError
from sdk.metrics import metrics_endpoint
from sdk.process import exit_now, run_service_loop
from worker.cli.app import EXIT_BAD_CONFIG, EXIT_FAILED, app, fail
from worker.cli.console import LiveStatus, Phase, ScreenSample, redacted_url
from worker.config import ConfigError, LocalConfig, load_config
from worker.engines import available_engines
from worker.engines.base import BaseEngine
from worker.metrics import readings
from worker.models import LoadStage
from worker.runtime import Worker
from worker.telemetry import HostTelemetry, select_gpus

logger = logging.getLogger(__name__)

#: Packages that log at the configured level; every other library logs warnings only.
LOGGED_PACKAGES = ("worker", "sdk")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@app.command
def start(
    *,
    nats_url: str | None = None,
    name: str | None = None,
    region: str | None = None,
    config: Path | None = None,
    state_dir: Path | None = None,
    engines: str | None = None,
    metrics_port: int | None = None,
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
    engines
        The engines to run, comma-separated: echo, llm, image, embedding (default: echo plus each model engine
        this install can import). `echo` alone starts in a second: it never imports torch.
    metrics_port
        Serve this process's own metrics (Prometheus text at /metrics) on this port (default:
        $GPU_WORKER_METRICS_PORT, else off; `metrics_host` in the config binds another address than 127.0.0.1).
    """
    flags = {
        "nats_url": nats_url, "name": name, "region": region, "state_dir": str(state_dir) if state_dir else None,
        "metrics_port": metrics_port,
    }
    try:
        local = load_config(config, overrides=flags)
        job_types = parse_engines(engines)
    except ConfigError as exc:
        return fail(exc)
    # A terminal gets the live screen, with log lines above it; anything else (a log file) log lines only.
    console = Console() if sys.stdout.isatty() else None
    _setup_logging(local.log_level, console)
    # Importing the model engines (torch) takes seconds; a stop meanwhile has nothing to clean up.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_before_start)
    select_gpus(local.gpu_indices)
    try:
        chosen = available_engines(job_types)
    except ConfigError as exc:
        logger.error("%s", exc.message)
        return EXIT_BAD_CONFIG
    exit_now(run_service_loop(_serve(local, chosen, console)))  # stopped cleanly: skip torch's seconds of teardown


def parse_engines(text: str | None) -> tuple[str, ...] | None:
    """`"echo,llm"` -> `("echo", "llm")`; None (not given) stays None. Raises ConfigError."""
    if text is None:
        return None
    valid = get_args(JobType)
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in valid]
    if not names or unknown:
        raise ConfigError(f"--engines {text!r}: unknown engine {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return names


def _setup_logging(level: str, console: Console | None) -> None:
    if console is not None:
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for package in LOGGED_PACKAGES:
        logging.getLogger(package).setLevel(level.upper())
    # The worker logs each unanswered attempt itself, naming the request; stamina's line would repeat it.
    logging.getLogger("stamina").setLevel(logging.ERROR)


def _exit_before_start(signum: int, frame: object) -> None:
    logger.info("%s before the worker started: exiting", signal.Signals(signum).name)
    raise SystemExit(0)

async def _serve(config: LocalConfig, engines: Mapping[str, BaseEngine], console: Console | None) -> int:
    live: LiveStatus | None = None

    def on_load_progress(model: str, stage: LoadStage) -> None:
        # `loaded` and `failed` are logged by the cache itself, with the memory taken or the reason.
        if stage not in (LoadStage.LOADED, LoadStage.FAILED):
            logger.info("model %s: %s", model, stage.value.replace("_", " "))
        if live is not None:
            live.on_load_progress(model, stage)

    try:
        worker = Worker.from_config(config, engines, on_load_progress=on_load_progress)
    except (OSError, ValueError, ConfigError) as exc:  # unreadable TLS files, an engine or GPUs that do not fit
        logger.error("the worker cannot be set up: %s", exc)
        return EXIT_BAD_CONFIG
    if console is not None:
        live = LiveStatus(console, partial(_sample, worker, config))
    showing = asyncio.create_task(live.run()) if live is not None else None
    try:
        with metrics_endpoint(config.metrics_port, readings(worker), host=config.metrics_host):
            return await _run(worker, live)
    except BadRequest as exc:  # the metrics port is taken
        logger.error("%s", exc.message)
        return EXIT_BAD_CONFIG
    finally:
        if live is not None and showing is not None:
            live.phase = Phase.STOPPED
            await live.refresh()
            showing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await showing


async def _run(worker: Worker, live: LiveStatus | None) -> int:
    """Start, serve until a signal, drain; a second signal cuts the drain short."""
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
        return EXIT_FAILED
    if live is not None:
        live.phase = Phase.ONLINE
    # A GPU that failed for good, a platform that refuses this worker (revoked), or a connection the NATS
    # client gave up on stops it too, and the exit status says so (a supervisor starts it again).
    failures = (worker.device_lost, worker.identity_refused, worker.connection_lost)
    ending = [asyncio.create_task(stop_requested.wait()), *(asyncio.create_task(f.wait()) for f in failures)]
    await asyncio.wait(ending, return_when=asyncio.FIRST_COMPLETED)
    for task in ending:
        task.cancel()
    if live is not None:
        live.phase = Phase.DRAINING
    await worker.stop(drain=True)
    await asyncio.gather(*forced)
    return EXIT_FAILED if any(failure.is_set() for failure in failures) else 0


async def _sample(worker: Worker, config: LocalConfig) -> ScreenSample:
    host = await worker.sample_host() or HostTelemetry()
    return ScreenSample(
        name=config.name,
        region=worker.region,
        nats_url=redacted_url(config.nats_url),
        worker_id=worker.worker_id,
        engines=worker.engines,
        capacity=worker.config.max_concurrency,
        in_flight=len(worker.in_flight),
        jobs_done=worker.jobs_done,
        gpus=host.gpus,
        memory_free_bytes=host.memory_free_bytes,
        models=worker.loaded_models,
    )

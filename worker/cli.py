"""`gpu-worker`: run this machine as a worker of the platform, and look after it.

- `configure` asks (or takes as flags) how to reach the platform, the region, the name, the GPUs and
  an enrollment token, and writes the local config file. With a token it enrolls at once: it registers,
  keeps the worker's id and credentials (HMAC secret, tokens; mode 0600) in the state dir, and drops
  the spent token from the file. A platform out of reach leaves the token for `start` to use.
- `start` reads the local config (flags > `GPU_WORKER_*` > config.yaml > defaults), runs the engines
  asked for (`--engines`; by default echo plus whichever model engines this install can import), shows
  a live screen on a terminal (log lines otherwise) and stops cleanly on SIGINT/SIGTERM: a first
  signal lets running jobs finish (up to `drain_timeout_s`), a second one stops at once.
- `status`, `get`, `set` and `models` ask the platform about this worker (its id is in the state dir,
  written when it first registered) and change its runtime config, which the platform pushes back to
  the running worker through its KV watch.

Exit statuses: 0 done, 1 the platform could not be reached or does not know the worker, 2 a bad flag,
key or value (nothing was changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal, NamedTuple, get_args
from urllib.parse import urlparse

import msgspec
import msgspec.inspect as mi
from cyclopts import App, Parameter
from nats.errors import Error as NatsError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.prompt import Prompt
from rich.table import Table

from sdk import subjects
from sdk.api import JobType, Registered, RegisterWorker, ReportModelLoaded, ReportModelUnloaded, Token, WorkerConfig
from sdk.client import Client
from sdk.connection import connect, nats_url_from_env, request
from sdk.errors import BadRequest, PlatformError, Timeout, Unavailable, WorkerNotFound
from sdk.events import WorkerModelLoaded, WorkerModelUnloaded, worker_event_decoder
from sdk.log import read_subject
from worker.config import (
    CONFIG_PATH_ENV,
    ENV_PREFIX,
    ConfigError,
    LocalConfig,
    default_config_path,
    host_name,
    load_config,
    save_config,
    user_state_dir,
)
from worker.console import (
    LiveStatus,
    Phase,
    WorkerSnapshot,
    config_table,
    format_bytes,
    format_value,
    gpu_table,
    models_table,
    redacted_url,
    worker_table,
)
from worker.engines.base import BaseEngine
from worker.engines.echo import EchoEngine
from worker.models import LoadStage, MemoryProbe, ModelCache
from worker.runtime import STATE_FILE, HostTelemetry, Worker, WorkerState, save_credentials, save_identity
from worker.telemetry import gpu_snapshot, memory_free_bytes

logger = logging.getLogger(__name__)

#: Engines that need the heavy `engines` extra (torch), by job type; a worker without it still runs echo jobs.
MODEL_ENGINE_MODULES = {"llm": "worker.engines.llm", "image": "worker.engines.image"}

#: Packages that log at the configured level; every other library logs warnings only.
LOGGED_PACKAGES = ("worker", "sdk")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Exit statuses: the platform unreachable or a worker it does not know (or one that could not start),
#: and a bad flag, config key or value.
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2

#: The region `configure` proposes for a first config.
DEFAULT_REGION = "local"
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
#: Where a model's name goes in the list of valid runtime config keys.
MODEL_PLACEHOLDER = "<model>"

app = App(name="gpu-worker", help="Run this machine as a GPU worker of the gpu-fabric platform.")


# --- configure -----------------------------------------------------------------------------------------


@app.command
async def configure(
    *,
    config: Path | None = None,
    nats_url: str | None = None,
    region: str | None = None,
    name: str | None = None,
    gpus: str | None = None,
    enrollment_token: str | None = None,
    yes: Annotated[bool, Parameter(name=["--yes", "-y", "--non-interactive"], negative=())] = False,
    enroll: bool = True,
    timeout_s: float = 10.0,
) -> int:
    """Write this worker's config file, asking each question that no flag answers.

    Parameters
    ----------
    config
        The config file to write (default: $GPU_WORKER_CONFIG, else ~/.config/gpu-worker/config.yaml).
        Re-running proposes its current values.
    nats_url
        The platform's NATS server(s), comma-separated (e.g. nats://platform.example:4222).
    region
        The region this worker serves (letters, digits, '_' or '-').
    name
        The name operators see (default: the host name).
    gpus
        The GPUs this worker may use: "all", or indices such as 0,1.
    enrollment_token
        The one-use token from the platform's operator (empty: none).
    yes
        Accept the defaults for every question no flag answers, without prompting; a bad value is an error.
    enroll
        Spend the enrollment token now (register with the platform and store the credentials it
        answers); with --no-enroll, `gpu-worker start` enrolls with it.
    timeout_s
        How long to wait for the platform when enrolling.
    """
    path = (config or Path(os.environ.get(CONFIG_PATH_ENV) or default_config_path())).expanduser()
    console = Console(highlight=False)
    try:
        current = _current_config(path)
        detected = gpu_snapshot()
        if not yes:
            console.print(f"Configuring this GPU worker; answers go to [bold]{escape(str(path))}[/].")
            if detected:
                console.print(gpu_table(detected, title="GPUs on this machine"))
            else:
                console.print("No NVIDIA GPU found on this machine: models would run on the CPU.")
        given = {"nats_url": nats_url, "region": region, "name": name, "gpus": gpus, "enrollment_token": enrollment_token}
        answers = {
            question.key: _answer(console, question, given[question.key], interactive=not yes)
            for question in _questions(current, [gpu.index for gpu in detected])
        }
    except ConfigError as exc:
        return _fail(exc)
    except EOFError:
        print("gpu-worker: no answer on standard input; pass --yes to accept the defaults", file=sys.stderr)
        return EXIT_BAD_CONFIG
    chosen = msgspec.structs.replace(current, **answers)
    save_config(chosen, path)
    console.print(f"Wrote {escape(str(path))} (readable by you only):")
    summary = Table(show_header=False)
    summary.add_row("nats_url", redacted_url(chosen.nats_url))
    for key in ("region", "name", "gpus"):
        summary.add_row(key, format_value(msgspec.to_builtins(getattr(chosen, key))))
    summary.add_row("enrollment_token", "set" if chosen.enrollment_token else "not set")
    console.print(summary)
    if enroll and chosen.enrollment_token is not None:
        enrolled = await _enroll(chosen, path, console, timeout_s)
        if enrolled != 0:
            return enrolled
    console.print("Start the worker with: [bold]gpu-worker start[/]")
    return 0


async def _enroll(config: LocalConfig, path: Path, console: Console, timeout_s: float) -> int:
    """Register with the enrollment token; keep the id and credentials the platform answers (once) in
    the state dir, and rewrite the config file without the spent token."""
    assert config.enrollment_token is not None
    try:
        nc = await connect(config.nats_url, name="gpu-worker-configure", tls=config.tls.ssl_context(), wait_s=timeout_s)
    except (Unavailable, NatsError, OSError) as exc:
        message = exc.message if isinstance(exc, PlatformError) else f"{type(exc).__name__}: {exc}"
        console.print(
            f"[yellow]Not enrolled yet: cannot reach the platform ({escape(message)}); "
            "`gpu-worker start` enrolls with the token.[/]"
        )
        return 0
    try:
        # Capabilities stay the default (echo) until `start` registers again with the engines it runs.
        req = RegisterWorker(
            name=config.name,
            region=config.region,
            worker_id=_previous_worker_id(config.state_dir),
            enrollment_token=config.enrollment_token,
        )
        registered = await request(nc, subjects.API_WORKERS_REGISTER, req, Registered, timeout_s=timeout_s)
    except PlatformError as exc:
        return _fail(exc)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    assert registered.credentials is not None  # an enrollment always answers credentials
    save_identity(config.state_dir, registered.worker_id)
    save_credentials(config.credentials_file, registered.credentials)
    save_config(msgspec.structs.replace(config, enrollment_token=None), path)
    console.print(
        f"Enrolled as worker [bold]{registered.worker_id}[/]; its credentials are in "
        f"{escape(str(config.credentials_file))} (readable by you only)."
    )
    return 0


def _previous_worker_id(state_dir: Path) -> str | None:
    """The id this machine had as a worker before, to enroll as the same worker again."""
    try:
        return registered_worker_id(state_dir)
    except WorkerNotFound:
        return None


class Question(NamedTuple):
    key: str
    prompt: str
    #: The answer proposed (Enter takes it), as text.
    default: str
    #: The answer as the config stores it; raises ConfigError naming the value.
    check: Callable[[str], Any]
    #: The proposed answer as the screen shows it (no password); None: typed and proposed hidden.
    shown: str | None


def _questions(current: LocalConfig, detected: list[int]) -> list[Question]:
    gpus = "all" if current.gpus == "all" else ",".join(map(str, current.gpus))
    return [
        Question("nats_url", "Platform NATS URL", current.nats_url, check_nats_url, redacted_url(current.nats_url)),
        Question("region", "Region", current.region, partial(check_token, "region"), current.region),
        Question("name", "Worker name", current.name, partial(check_token, "name"), current.name),
        Question(
            "gpus", "GPUs to use (all, or indices such as 0,1)", gpus, partial(check_gpus, detected=detected), gpus
        ),
        Question(
            "enrollment_token", "Enrollment token (optional; Enter keeps the current one)",
            current.enrollment_token or "", check_enrollment_token, None,
        ),
    ]


def _answer(console: Console, question: Question, given: str | None, *, interactive: bool) -> Any:
    """The flag's value if it is good; else (interactively) ask until an answer is good."""
    if given is not None or not interactive:
        try:
            return question.check(question.default if given is None else given)
        except ConfigError as exc:
            if not interactive:
                raise
            console.print(f"[red]{escape(exc.message)}[/]")
    while True:
        shown = "" if question.shown is None else f" [prompt.default]({escape(question.shown)})"
        text = Prompt.ask(
            question.prompt + shown,
            console=console,
            default=question.default,
            show_default=False,
            # Hidden typing needs a terminal; piped answers are read as they come.
            password=question.shown is None and sys.stdin.isatty(),
        )
        try:
            return question.check(text)
        except ConfigError as exc:
            console.print(f"[red]{escape(exc.message)}[/]")


def _current_config(path: Path) -> LocalConfig:
    """What the file says (without `GPU_WORKER_*` variables, which must not end up in it), or defaults."""
    if not path.exists():
        return LocalConfig(
            nats_url=nats_url_from_env(), name=host_name(), region=DEFAULT_REGION, state_dir=user_state_dir()
        )
    return load_config(path, env={k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)})


def check_nats_url(text: str) -> str:
    servers = [server.strip() for server in text.split(",") if server.strip()]
    if not servers:
        raise ConfigError("the NATS URL is empty; expected e.g. nats://platform.example:4222")
    for server in servers:
        parsed = urlparse(server if "://" in server else f"nats://{server}")
        try:
            valid = parsed.scheme in NATS_SCHEMES and bool(parsed.hostname) and parsed.port != 0
        except ValueError:  # a port that is not a number from 1 to 65535
            valid = False
        if not valid:
            raise ConfigError(
                f"{redacted_url(server)!r} is not a NATS URL; expected e.g. nats://platform.example:4222 "
                f"(schemes: {', '.join(NATS_SCHEMES)})"
            )
    return ",".join(servers)


def check_token(what: str, text: str) -> str:
    try:
        return msgspec.convert(text.strip(), Token)
    except msgspec.ValidationError:
        raise ConfigError(
            f"{what} {text!r} is not valid: 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        ) from None


def check_gpus(text: str, *, detected: Collection[int]) -> list[int] | Literal["all"]:
    """`all` or distinct GPU indices; indices must be among the detected GPUs when there are any
    (without a driver nothing is detected, and the choice is taken as given)."""
    if text.strip().lower() == "all":
        return "all"
    try:
        indices = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        indices = []
    if not indices or indices[0] < 0:
        raise ConfigError(f"GPUs {text!r}: expected `all` or GPU indices such as 0,1")
    missing = [index for index in indices if index not in detected]
    if detected and missing:
        raise ConfigError(
            f"GPUs {text!r}: no GPU {', '.join(map(str, missing))} on this machine; "
            f"detected: {', '.join(map(str, sorted(detected)))}"
        )
    return indices


def check_enrollment_token(text: str) -> str | None:
    token = text.strip()
    if any(character.isspace() for character in token) or len(token) > 4096:
        raise ConfigError("the enrollment token must be one word of at most 4096 characters")
    return token or None


# --- start ---------------------------------------------------------------------------------------------


@app.command
def start(
    *,
    nats_url: str | None = None,
    name: str | None = None,
    region: str | None = None,
    config: Path | None = None,
    state_dir: Path | None = None,
    engines: str | None = None,
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
        The engines to run, comma-separated: echo, llm, image (default: echo plus each model engine
        this install can import). `echo` alone starts in a second: it never imports torch.
    """
    flags = {"nats_url": nats_url, "name": name, "region": region, "state_dir": str(state_dir) if state_dir else None}
    try:
        local = load_config(config, overrides=flags)
        job_types = parse_engines(engines)
    except ConfigError as exc:
        return _fail(exc)
    # A terminal gets the live screen, with log lines above it; anything else (a log file) log lines only.
    console = Console() if sys.stdout.isatty() else None
    _setup_logging(local.log_level, console)
    # Importing the model engines (torch) takes seconds; a stop meanwhile has nothing to clean up.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_before_start)
    _select_gpus(local)
    try:
        chosen = available_engines(job_types)
    except ConfigError as exc:
        logger.error("%s", exc.message)
        return EXIT_BAD_CONFIG
    return asyncio.run(_serve(local, chosen, console))


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


def _exit_before_start(signum: int, frame: object) -> None:
    logger.info("%s before the worker started: exiting", signal.Signals(signum).name)
    raise SystemExit(0)


def _select_gpus(config: LocalConfig) -> None:
    """Make only the chosen GPUs visible to CUDA, before torch is imported: engines load onto `cuda:0`,
    which is then the first chosen GPU, the one the model cache measures."""
    indices = config.gpu_indices
    if indices is None:
        return
    visible = ",".join(map(str, indices))
    if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, visible):
        logger.warning("CUDA_VISIBLE_DEVICES=%s replaced by the configured gpus %s", os.environ["CUDA_VISIBLE_DEVICES"], visible)
    # NVML numbers GPUs in PCI bus order; CUDA must count the same way for the indices to agree.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    logger.info("using GPUs %s", visible)


def available_engines(job_types: Collection[str] | None = None) -> dict[str, BaseEngine]:
    """The engines for `job_types`; an asked-for engine that cannot be imported is a ConfigError.
    Without `job_types`: echo, plus each model engine whose module imports here (a log line when not)."""
    wanted = set(get_args(JobType) if job_types is None else job_types)
    engines: dict[str, BaseEngine] = {EchoEngine.job_type: EchoEngine()} if EchoEngine.job_type in wanted else {}
    for job_type, module_name in MODEL_ENGINE_MODULES.items():
        if job_type not in wanted:
            continue  # never imported: an echo-only worker does not load torch
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if job_types is not None:
                raise ConfigError(f"the {job_type} engine cannot run here ({exc}); install gpu-fabric[engines]") from None
            logger.info("%s unavailable (%s); install gpu-fabric[engines] to run it", module_name, exc)
            continue
        except Exception:
            if job_types is not None:
                raise
            # A broken engine must not keep the others from serving.
            logger.exception("%s failed to import; running without it", module_name)
            continue
        for engine_class in _engine_classes(module):
            if engine_class.job_type in wanted:
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


class _Assembled(NamedTuple):
    worker: Worker
    #: None for a worker whose engines load no models.
    cache: ModelCache | None
    telemetry: Callable[[], HostTelemetry]


async def _serve(config: LocalConfig, engines: Mapping[str, BaseEngine], console: Console | None) -> int:
    try:
        parts = _build_worker(config, engines)
    except (OSError, ValueError) as exc:  # unreadable TLS files, an engine that does not fit
        logger.error("the worker cannot be set up: %s", exc)
        return EXIT_BAD_CONFIG
    live = None
    if console is not None:
        live = LiveStatus(console, partial(_sample, parts, config, tuple(sorted(engines))))
    if parts.cache is not None:
        parts.cache.on_load_progress = partial(_on_load_progress, live)
    showing = asyncio.create_task(live.run()) if live is not None else None
    try:
        return await _run(parts.worker, live)
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
    await stop_requested.wait()
    if live is not None:
        live.phase = Phase.DRAINING
    await worker.stop(drain=True)
    await asyncio.gather(*forced)
    return 0


def _build_worker(config: LocalConfig, engines: Mapping[str, BaseEngine]) -> _Assembled:
    """The worker with its model cache and telemetry."""
    needs_models = any(engine.needs_model for engine in engines.values())
    # Only engines that load models need to know whether torch sees CUDA (which imports torch);
    # for the others the GPUs NVML reports decide where free memory is measured.
    on_gpu = None if needs_models else bool(gpu_snapshot(config.gpu_indices))
    probe = MemoryProbe(config.gpu_indices, on_gpu=on_gpu)
    limit_bytes = config.memory.limit_bytes

    def telemetry() -> HostTelemetry:
        free_bytes = probe.free_bytes()
        if limit_bytes is not None:
            free_bytes = limit_bytes if free_bytes is None else min(free_bytes, limit_bytes)
        return HostTelemetry(gpus=tuple(gpu_snapshot(config.gpu_indices)), memory_free_bytes=free_bytes)

    if not needs_models:
        return _Assembled(Worker.from_config(config, engines, telemetry=telemetry), None, telemetry)
    cache = ModelCache(probe, limit_bytes=limit_bytes)
    worker = Worker.from_config(
        config, engines, models=cache, telemetry=telemetry, loaded_models=lambda: [m.model for m in cache.loaded()]
    )

    async def on_loaded(model: str, memory_bytes: int) -> None:
        await worker.report(ReportModelLoaded(model=model, memory_bytes=memory_bytes))

    async def on_unloaded(model: str) -> None:
        await worker.report(ReportModelUnloaded(model=model))

    cache.on_loaded, cache.on_unloaded = on_loaded, on_unloaded
    return _Assembled(worker, cache, telemetry)


def _on_load_progress(live: LiveStatus | None, model: str, stage: LoadStage) -> None:
    # `loaded` and `failed` are logged by the cache itself, with the memory taken or the reason.
    if stage not in (LoadStage.LOADED, LoadStage.FAILED):
        logger.info("model %s: %s", model, stage.value.replace("_", " "))
    if live is not None:
        live.on_load_progress(model, stage)


async def _sample(parts: _Assembled, config: LocalConfig, engines: tuple[str, ...]) -> WorkerSnapshot:
    host = await asyncio.to_thread(parts.telemetry)  # NVML calls block
    worker = parts.worker
    return WorkerSnapshot(
        name=config.name,
        region=worker.region,
        nats_url=redacted_url(config.nats_url),
        worker_id=worker.worker_id,
        engines=engines,
        capacity=worker.config.max_concurrency,
        in_flight=len(worker.in_flight),
        jobs_done=worker.jobs_done,
        gpus=host.gpus,
        memory_free_bytes=host.memory_free_bytes,
        models=tuple(parts.cache.loaded()) if parts.cache is not None else (),
    )


# --- status, get, set, models: this worker as the platform sees it ----------------------------------------


@Parameter(name="*")
@dataclass(frozen=True)
class Target:
    """Which worker a command is about, and how to reach the platform."""

    config: Path | None = None
    """The config file (default: $GPU_WORKER_CONFIG, else ~/.config/gpu-worker/config.yaml)."""
    nats_url: str | None = None
    """The platform's NATS server(s) (default: from the config)."""
    state_dir: Path | None = None
    """The worker's state dir, where its id was written when it registered (default: from the config)."""
    worker_id: str | None = None
    """Another worker's id, instead of this machine's."""
    timeout_s: float = 5.0
    """How long to wait for the platform to answer."""


@dataclass(frozen=True)
class _Session:
    client: Client
    worker_id: str
    local: LocalConfig
    console: Console


@app.command
async def status(*, target: Target = Target()) -> int:
    """This worker's health as the platform sees it, and this machine's GPUs."""

    async def show(session: _Session) -> int:
        view = await session.client.worker(session.worker_id)
        local_gpus = await asyncio.to_thread(gpu_snapshot)
        console = session.console
        console.print(worker_table(view, dt.datetime.now(dt.UTC)))
        if view.gpus:
            console.print(gpu_table(view.gpus, title="GPUs as last reported"))
        if local_gpus:
            selected = session.local.gpu_indices
            used = [gpu.index for gpu in local_gpus] if selected is None else selected
            console.print(gpu_table(local_gpus, title="GPUs on this machine", selected=used))
        else:
            free_bytes = await asyncio.to_thread(memory_free_bytes)
            console.print(f"No NVIDIA GPU found on this machine; {format_bytes(free_bytes)} of host memory free.")
        return 0

    return await _with_platform(target, show)


@app.command
async def get(key: str | None = None, /, *, target: Target = Target()) -> int:
    """Print this worker's effective runtime config, or one KEY of it (e.g. max_concurrency).

    Parameters
    ----------
    key
        A dotted key such as load_control.acceptance_rate or models.gpt2.dtype.
    """
    try:
        setting = resolve_key(key) if key is not None else None
    except BadRequest as exc:
        return _fail(exc)

    async def show(session: _Session) -> int:
        view = await session.client.worker_config(session.worker_id)
        if setting is None:
            session.console.print(config_table(config_rows(view.effective, view.overrides), session.worker_id))
        else:
            print(format_value(lookup(view.effective, setting)))
        return 0

    return await _with_platform(target, show)


@app.command(name="set")
async def set_(key: str, value: str, /, *, target: Target = Target()) -> int:
    """Change one runtime config KEY of this worker to VALUE; the platform pushes it to the running worker.

    VALUE is read as JSON when it is JSON (`0.8`, `true`, `{"dtype": "float16"}`), else as text;
    `null` removes this worker's own value, so the platform default applies again.

    Parameters
    ----------
    key
        A dotted key: `max_concurrency`, `heartbeat_interval_s`, `load_control.acceptance_rate`,
        `models.<model>.trust_remote_code`, `models.<model>.dtype`.
    value
        The new value.
    """
    try:
        setting = resolve_key(key)
        parsed = parse_value(value)
        check_setting(setting, parsed, value)
    except BadRequest as exc:
        return _fail(exc)

    async def change(session: _Session) -> int:
        client = session.client
        before = await client.worker_config(session.worker_id)
        view = await client.set_worker_config(session.worker_id, config_change(setting, parsed, before.effective))
        old, new = lookup(before.effective, setting), lookup(view.effective, setting)
        session.console.print(
            f"{'.'.join(setting.path)}: {escape(format_value(old))} -> [bold]{escape(format_value(new))}[/] "
            f"(worker {session.worker_id}, revision {view.revision}); the worker applies it at once"
        )
        if not before.effective.models and view.effective.models:
            # An empty `models` lets any model run; a listed one makes it an allow-list.
            session.console.print(
                f"Note: only the listed models may run on this worker now ({escape(', '.join(view.effective.models))})."
            )
        return 0

    return await _with_platform(target, change)


@app.command
async def models(*, target: Target = Target()) -> int:
    """The models loaded on this worker and the memory each took, as the platform knows them."""

    async def show(session: _Session) -> int:
        view = await session.client.worker(session.worker_id)
        label = f"{view.name} ({view.id})"
        if not view.loaded_models:
            session.console.print(f"No models loaded on {escape(label)}.")
        else:
            memory = await _model_memory(session.client, view.id)
            session.console.print(f"Models loaded on {escape(label)}:")
            session.console.print(models_table(view.loaded_models, memory))
        for gpu in view.gpus:
            session.console.print(
                f"GPU {gpu.index} ({escape(gpu.name)}): {format_bytes(gpu.memory_used_bytes)} of "
                f"{format_bytes(gpu.memory_total_bytes)} used at the last heartbeat"
            )
        return 0

    return await _with_platform(target, show)


async def _with_platform(target: Target, action: Callable[[_Session], Awaitable[int]]) -> int:
    """Run `action` against the platform; a failure is a message and an exit status, never a traceback."""
    try:
        async with _platform(target) as session:
            return await action(session)
    except PlatformError as exc:
        return _fail(exc)
    except (NatsError, OSError) as exc:
        return _fail(Unavailable(f"{type(exc).__name__}: {exc}"))


@contextlib.asynccontextmanager
async def _platform(target: Target) -> AsyncIterator[_Session]:
    local = load_config(
        target.config,
        overrides={"nats_url": target.nats_url, "state_dir": str(target.state_dir) if target.state_dir else None},
    )
    worker_id = target.worker_id or registered_worker_id(local.state_dir)
    nc = await connect(local.nats_url, name="gpu-worker-cli", tls=local.tls.ssl_context(), wait_s=target.timeout_s)
    try:
        yield _Session(Client(nc, timeout_s=target.timeout_s), worker_id, local, Console(highlight=False))
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def registered_worker_id(state_dir: Path) -> str:
    """The id this machine's worker got when it registered (in `<state_dir>/worker.json`)."""
    path = state_dir / STATE_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=WorkerState).worker_id
    except FileNotFoundError:
        raise WorkerNotFound(
            f"this worker never registered with the platform ({path} does not exist); "
            "start it once with `gpu-worker start`, or name a worker with --worker-id"
        ) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WorkerNotFound(f"{path} is unreadable ({exc}); start the worker again to rewrite it") from None


async def _model_memory(client: Client, worker_id: str) -> dict[str, int]:
    """The memory each model took when the worker loaded it, from the worker's events in the log
    (the platform's worker view names the models but not their memory)."""
    try:
        raw = await read_subject(client.nc.jetstream(), subjects.WORKERS_STREAM, subjects.worker_subject(worker_id))
    except NatsError as exc:  # a NATS user that may not read the log: the table shows no memory
        logger.info("cannot read the events of worker %s: %s", worker_id, exc)
        return {}
    memory: dict[str, int] = {}
    for data, _ in raw:
        match worker_event_decoder.decode(data):
            case WorkerModelLoaded(model=model, memory_bytes=memory_bytes):
                memory[model] = memory_bytes
            case WorkerModelUnloaded(model=model):
                memory.pop(model, None)
    return memory


def _fail(exc: PlatformError) -> int:
    """Print why a command failed; the exit status says whether it was the input (2) or the platform (1)."""
    message = exc.message
    if isinstance(exc, (Unavailable, Timeout)):
        message = f"cannot reach the platform: {message}"
    if isinstance(exc, Timeout):
        # A NATS user without the right to ask (a worker's own) gets no answer at all, not a refusal.
        message += "; this needs an operator's NATS user and API key (GF_API_KEY)"
    print(f"gpu-worker: {message}", file=sys.stderr)
    return EXIT_BAD_CONFIG if isinstance(exc, BadRequest) else EXIT_FAILED


# --- Runtime config keys: dotted paths into sdk.api.WorkerConfig -----------------------------------------


class Setting(NamedTuple):
    """A dotted key resolved against WorkerConfig; a model's name is one part of the path."""

    path: tuple[str, ...]
    #: The type of the container each part is looked up in (WorkerConfig first).
    parents: tuple[mi.Type, ...]
    #: The type of the value the key names.
    kind: mi.Type


def config_keys(kind: mi.StructType | None = None, prefix: str = "") -> list[str]:
    """Every settable leaf key: `max_concurrency`, ..., `models.<model>.dtype`."""
    keys: list[str] = []
    for field in _fields(WorkerConfig) if kind is None else kind.fields:
        match field.type:
            case mi.StructType():
                keys += config_keys(field.type, f"{prefix}{field.name}.")
            case mi.DictType(value_type=mi.StructType() as value):
                keys += config_keys(value, f"{prefix}{field.name}.{MODEL_PLACEHOLDER}.")
            case _:
                keys.append(prefix + field.name)
    return keys


def resolve_key(key: str) -> Setting:
    """`models.Qwen/Qwen2.5-0.5B.dtype` -> path `("models", "Qwen/Qwen2.5-0.5B", "dtype")`; a section
    (`load_control`, `models.gpt2`) is a key too. Raises BadRequest listing the valid keys."""
    parts = key.split(".")
    path: list[str] = []
    parents: list[mi.Type] = []
    kind: mi.Type = mi.type_info(WorkerConfig)
    while parts:
        match kind:
            case mi.StructType(fields=fields):
                field = next((f for f in fields if f.name == parts[0]), None)
                if field is None:
                    break
                parents.append(kind)
                path.append(parts.pop(0))
                kind = field.type
            case mi.DictType(value_type=value):
                # Model names hold dots (`Qwen2.5`): the last part names a setting only when it is one.
                names_setting = isinstance(value, mi.StructType) and parts[-1] in {f.name for f in value.fields}
                name_parts = parts[:-1] if names_setting and len(parts) > 1 else parts
                parents.append(kind)
                path.append(".".join(name_parts))
                parts = parts[len(name_parts):]
                kind = value
            case _:
                break
    if parts or not all(path):
        valid = config_keys()
        raise BadRequest(f"unknown key `{key}`; valid keys: {', '.join(valid)}", {"key": key, "valid_keys": valid})
    return Setting(tuple(path), tuple(parents), kind)


def parse_value(text: str) -> Any:
    """JSON when it is JSON (`0.8`, `true`, `null`, `{...}`), else the text itself (`float16`)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_setting(setting: Setting, value: Any, text: str) -> None:
    """Refuse a value WorkerConfig would not take, naming the key, the value and what was expected.
    None (unset) always passes: the default applies again."""
    if value is None:
        return
    try:
        msgspec.convert(_nest(setting.path, value), WorkerConfig, strict=False)
    except msgspec.ValidationError as exc:
        expected = str(exc).split(" - at `", 1)[0]
        if isinstance(setting.kind, mi.LiteralType):
            expected += f"; valid values: {', '.join(map(str, setting.kind.values))}"
        raise BadRequest(
            f"{'.'.join(setting.path)} = {text}: {expected[:1].lower()}{expected[1:]}; "
            f"valid keys: {', '.join(config_keys())}",
            {"key": ".".join(setting.path), "value": text},
        ) from None


def config_change(setting: Setting, value: Any, effective: WorkerConfig) -> dict[str, Any]:
    """The partial config to send. The platform replaces a dict-valued setting (`models`) whole, so that
    one goes out complete: the effective one with this key changed."""
    top = setting.path[0]
    top_kind = setting.parents[1] if len(setting.path) > 1 else setting.kind
    if isinstance(top_kind, mi.DictType):
        current = msgspec.to_builtins(effective)[top]
        return {top: _replaced(current, setting.path[1:], value)}
    return _nest(setting.path, value)


def lookup(effective: WorkerConfig, setting: Setting) -> Any:
    """The value a key has in `effective`; a model not listed has the default settings (as the runtime
    gives it when any model may run)."""
    data: Any = msgspec.to_builtins(effective)
    for part, parent in zip(setting.path, setting.parents):
        if isinstance(parent, mi.DictType) and part not in data and isinstance(parent.value_type, mi.StructType):
            data = msgspec.to_builtins(parent.value_type.cls())
        else:
            data = data[part]
    return data


def config_rows(effective: WorkerConfig, overrides: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """`(key, value, set for this worker)` for every leaf of the effective config."""
    rows: list[tuple[str, Any, bool]] = []
    dict_valued = {f.name for f in _fields(WorkerConfig) if isinstance(f.type, mi.DictType)}

    def walk(data: dict[str, Any], own: Any, prefix: str, whole: bool | None) -> None:
        for name, value in data.items():
            here = isinstance(own, dict) and name in own
            overridden = here if whole is None else whole
            if isinstance(value, dict) and value:
                # A dict-valued setting (`models`) is replaced whole: all its entries come from one place.
                inner = overridden if not prefix and name in dict_valued else whole
                walk(value, own[name] if here else None, f"{prefix}{name}.", inner)
            else:
                rows.append((prefix + name, value, overridden))

    walk(msgspec.to_builtins(effective), overrides, "", None)
    return rows


def _fields(struct: type) -> tuple[mi.Field, ...]:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    return info.fields


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for part in reversed(path[1:]):
        value = {part: value}
    return {path[0]: value}


def _replaced(data: Any, path: tuple[str, ...], value: Any) -> Any:
    """`data` with the value at `path` set, or removed when `value` is None."""
    if not path:
        return value
    out = dict(data) if isinstance(data, dict) else {}
    if value is None and len(path) == 1:
        out.pop(path[0], None)
    else:
        out[path[0]] = _replaced(out.get(path[0]), path[1:], value)
    return out


def main() -> None:
    app()

"""`gpu-worker status`, `get`, `set` and `models`: this machine's worker as the platform sees it.

Each command reads the worker's id from its state dir (written when it first registered; `--worker-id`
names another), connects to the platform and asks it through the SDK client. `set` checks the key and
the value against the runtime config before anything is sent (`worker.config_keys`); the platform
validates and stores it, and pushes it to the running worker through its KV watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cyclopts import Parameter
from nats.errors import Error as NatsError
from rich.console import Console
from rich.markup import escape

from sdk import bus, subjects
from sdk.auth import API_KEY_ENV
from sdk.client import Client
from sdk.connection import connect
from sdk.errors import BadRequest, InvalidTransition, PlatformError, Unavailable, WorkerNotFound
from sdk.events import worker_event_decoder
from sdk.log import read_subject
from sdk.workers import WorkerState, apply_worker
from worker.cli.app import app, fail
from worker.cli.console import config_table, format_bytes, format_value, gpu_table, models_table, worker_table
from worker.config import LocalConfig, load_config
from worker.config_keys import check_setting, config_change, config_rows, lookup, parse_value, resolve_key
from worker.registration import STATE_FILE, read_worker_id
from worker.telemetry import gpu_snapshot, memory_free_bytes

logger = logging.getLogger(__name__)


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
        return fail(exc)

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
        return fail(exc)

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
        return fail(exc)
    except (NatsError, OSError) as exc:
        return fail(Unavailable(f"{type(exc).__name__}: {exc}"))


@contextlib.asynccontextmanager
async def _platform(target: Target) -> AsyncIterator[_Session]:
    local = load_config(
        target.config,
        overrides={"nats_url": target.nats_url, "state_dir": str(target.state_dir) if target.state_dir else None},
    )
    worker_id = target.worker_id or registered_worker_id(local.state_dir)
    # Without a user in the URL, the operator's API key is the connection's NATS identity too (`sdk.bus`).
    api_key = os.environ.get(API_KEY_ENV)
    identity = bus.client_options(api_key) if api_key and bus.identity_needed(local.nats_url) else {}
    nc = await connect(
        local.nats_url, name="gpu-worker-cli", tls=local.tls.ssl_context(), wait_s=target.timeout_s, **identity
    )
    try:
        yield _Session(Client(nc, timeout_s=target.timeout_s), worker_id, local, Console(highlight=False))
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def registered_worker_id(state_dir: Path) -> str:
    """The id this machine's worker got when it registered (in `<state_dir>/worker.json`)."""
    worker_id = read_worker_id(state_dir)
    if worker_id is None:
        raise WorkerNotFound(
            f"this worker never registered with the platform ({state_dir / STATE_FILE} does not exist); "
            "start it once with `gpu-worker start`, or name a worker with --worker-id"
        )
    return worker_id


async def _model_memory(client: Client, worker_id: str) -> dict[str, int]:
    """The memory each model took when the worker loaded it, folded from the worker's events in the log
    by `sdk.workers.apply_worker` (the platform's worker view names the models but not their memory)."""
    try:
        raw = await read_subject(client.nc.jetstream(), subjects.WORKERS_STREAM, subjects.worker_subject(worker_id))
    except NatsError as exc:  # a NATS user that may not read the log: the table shows no memory
        logger.info("cannot read the events of worker %s: %s", worker_id, exc)
        return {}
    state: WorkerState | None = None
    for data, seq in raw:
        try:
            state = apply_worker(state, worker_event_decoder.decode(data), seq)
        except InvalidTransition as exc:  # as in the projections: a refused event changes nothing
            logger.info("skipped event #%d of worker %s: %s", seq, worker_id, exc)
    return dict(state.loaded_models) if state is not None else {}

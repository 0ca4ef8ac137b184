"""What `gpu-worker` shows a person: rich tables of the platform's view of this worker, its runtime config,
its models and GPU telemetry, and the live screen of a running worker on a terminal.

Every table is built by a pure function of the data it shows, so what a person sees can be tested
without a terminal; `LiveStatus` only redraws those renderings while the worker runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import msgspec
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from sdk.api import WorkerView
from sdk.events import GpuInfo
from worker.models import LoadedModel, LoadStage

#: How the platform's worker statuses are coloured.
STATUS_STYLES = {"online": "green", "draining": "yellow", "lost": "red", "deregistered": "dim"}
#: How often the live screen samples the worker and its GPUs (the spinner animates in between).
LIVE_SAMPLE_S = 1.0


def format_bytes(count: int | None) -> str:
    """`1536` -> `1.5 KiB`; None (not measured) -> `-`."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_ago(at: dt.datetime | None, now: dt.datetime) -> str:
    if at is None:
        return "never"
    seconds = max((now - at).total_seconds(), 0.0)
    return f"{at.astimezone():%Y-%m-%d %H:%M:%S} ({seconds:.1f}s ago)"


def redacted_url(url: str) -> str:
    """A NATS URL as a screen may show it: each server's scheme, host and port, never a user or password."""
    shown = []
    for server in url.split(","):
        parsed = urlparse(server.strip() if "://" in server else f"nats://{server.strip()}")
        try:
            port = f":{parsed.port}" if parsed.port else ""
        except ValueError:
            port = ""
        shown.append(f"{parsed.scheme}://{parsed.hostname or ''}{port}")
    return ",".join(shown)


def format_value(value: Any) -> str:
    """A config value as JSON (what `gpu-worker set` takes back), strings without their quotes."""
    return value if isinstance(value, str) else json.dumps(value)


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, "bold"))


# --- Tables for the one-shot commands -----------------------------------------------------------------


def worker_table(view: WorkerView, now: dt.datetime) -> Table:
    """`gpu-worker status`: the worker as the platform sees it."""
    table = Table(title=f"worker {view.name}", box=box.SIMPLE, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("id", view.id)
    table.add_row("region", view.region)
    table.add_row("status", status_text(view.status))
    table.add_row("last heartbeat", format_ago(view.last_heartbeat, now))
    table.add_row("capacity", f"{view.capacity} jobs at once")
    in_flight = f"{len(view.in_flight)}" + (f": {', '.join(view.in_flight)}" if view.in_flight else "")
    table.add_row("jobs in flight", in_flight)
    table.add_row("engines", ", ".join(view.capabilities) or "-")
    table.add_row("loaded models", ", ".join(view.loaded_models) or "none")
    return table


def gpu_table(gpus: Sequence[GpuInfo], *, title: str, selected: Collection[int] | None = None) -> Table:
    """One row per GPU; with `selected`, a column saying whether this worker uses it."""
    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    for column in ("GPU", "name", "memory used", "utilisation", "temperature", "power"):
        table.add_column(column, overflow="fold")
    if selected is not None:
        table.add_column("used by this worker")
    for gpu in gpus:
        row = [
            str(gpu.index),
            gpu.name,
            f"{format_bytes(gpu.memory_used_bytes)} / {format_bytes(gpu.memory_total_bytes)}",
            "-" if gpu.utilization_pct is None else f"{gpu.utilization_pct:.0f}%",
            "-" if gpu.temperature_c is None else f"{gpu.temperature_c:.0f} °C",
            "-" if gpu.power_w is None else f"{gpu.power_w:.0f} W",
        ]
        if selected is not None:
            row.append("yes" if gpu.index in selected else "no")
        table.add_row(*row)
    return table


def config_table(rows: Sequence[tuple[str, Any, bool]], worker: str) -> Table:
    """`gpu-worker get`: each setting, its value, and whether this worker overrides the default."""
    table = Table(title=f"runtime config of {worker}", box=box.SIMPLE, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    table.add_column("set by")
    for key, value, overridden in rows:
        table.add_row(key, format_value(value), "this worker" if overridden else "platform default")
    return table


def models_table(models: Sequence[str], memory_bytes: Mapping[str, int]) -> Table:
    """`gpu-worker models`: the models the platform knows as loaded, and what each took when it loaded."""
    table = Table(box=box.SIMPLE)
    table.add_column("model", overflow="fold")
    table.add_column("memory", justify="right")
    for model in models:
        table.add_row(model, format_bytes(memory_bytes.get(model)))
    if models and len(memory_bytes) >= len(models):
        table.add_section()
        table.add_row("total", format_bytes(sum(memory_bytes.get(m, 0) for m in models)))
    return table


# --- The live screen of `gpu-worker start` --------------------------------------------------------------


class Phase(enum.StrEnum):
    #: Connecting and registering.
    STARTING = "starting"
    #: Taking jobs.
    ONLINE = "online"
    #: Told to stop: running jobs finish, no new ones come.
    DRAINING = "draining"
    STOPPED = "stopped"


PHASE_STYLES = {Phase.STARTING: "yellow", Phase.ONLINE: "green", Phase.DRAINING: "yellow", Phase.STOPPED: "dim"}
LOAD_STAGE_TEXT = {
    LoadStage.WAITING_FOR_MEMORY: "waiting for running jobs to release memory for",
    LoadStage.EVICTING: "unloading idle models to make room for",
    LoadStage.LOADING: "loading",
}


class ScreenSample(msgspec.Struct, frozen=True, kw_only=True):
    """What the live screen shows, sampled from the running worker."""

    name: str
    region: str
    #: Without credentials (`redacted_url`).
    nats_url: str
    worker_id: str | None
    engines: tuple[str, ...]
    capacity: int
    in_flight: int
    jobs_done: int
    gpus: tuple[GpuInfo, ...] = ()
    memory_free_bytes: int | None = None
    models: tuple[LoadedModel, ...] = ()


def live_view(
    snapshot: ScreenSample, phase: Phase, loading: Mapping[str, tuple[LoadStage, float]], now_s: float
) -> RenderableType:
    """The screen: who and where, jobs, GPUs, loaded models, and a spinner per model being loaded.
    `loading` maps a model to its stage and the monotonic time the load began."""
    header = Text.assemble(
        ("gpu-worker ", "bold"),
        (snapshot.name, "bold cyan"),
        f"  {snapshot.worker_id or 'not registered yet'}  region {snapshot.region}  ",
        (f"● {phase}", PHASE_STYLES[phase]),
        f"  {snapshot.nats_url}",
    )
    jobs = Text(
        f"jobs: {snapshot.in_flight} in flight / capacity {snapshot.capacity} · {snapshot.jobs_done} done"
        f"   engines: {', '.join(snapshot.engines)}"
    )
    parts: list[RenderableType] = [header, jobs]
    if snapshot.gpus:
        parts.append(gpu_table(snapshot.gpus, title="GPUs"))
    else:
        parts.append(Text(f"no GPU: models run on the CPU · {format_bytes(snapshot.memory_free_bytes)} memory free"))
    if snapshot.models:
        models = Table(title="loaded models", box=box.SIMPLE, title_justify="left")
        models.add_column("model", overflow="fold")
        models.add_column("memory", justify="right")
        for model in snapshot.models:
            models.add_row(model.model, format_bytes(model.memory_bytes))
        parts.append(models)
    for model, (stage, since_s) in loading.items():
        text = f"{LOAD_STAGE_TEXT.get(stage, str(stage))} {model} ({now_s - since_s:.0f}s)"
        parts.append(Spinner("dots", text=text, style="cyan"))
    return Group(*parts)


class LiveStatus:
    """Redraws `live_view` on a terminal while the worker runs; log lines print above it through the same
    console. `run()` until cancelled; `on_load_progress` is the model cache's callback."""

    def __init__(self, console: Console, sample: Callable[[], Awaitable[ScreenSample]]) -> None:
        self.phase = Phase.STARTING
        self._sample = sample
        self._snapshot: ScreenSample | None = None
        self._loading: dict[str, tuple[LoadStage, float]] = {}
        # Only the renderable built on the event loop is handed to the refresh thread, never live state.
        self._live = Live(console=console, refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)

    def on_load_progress(self, model: str, stage: LoadStage) -> None:
        if stage in (LoadStage.LOADED, LoadStage.FAILED):
            self._loading.pop(model, None)
        else:
            _, since_s = self._loading.get(model, (stage, time.monotonic()))
            self._loading[model] = (stage, since_s)
        self._redraw()

    async def run(self) -> None:
        with self._live:
            try:
                while True:
                    await self.refresh()
                    await asyncio.sleep(LIVE_SAMPLE_S)
            finally:
                self._redraw()  # the last frame stays on the screen

    async def refresh(self) -> None:
        self._snapshot = await self._sample()
        self._redraw()

    def _redraw(self) -> None:
        if self._snapshot is not None:
            self._live.update(live_view(self._snapshot, self.phase, dict(self._loading), time.monotonic()))

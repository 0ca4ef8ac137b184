"""`gpu-worker configure`: write this machine's local config, asking each question no flag answers.

Five questions (the platform's NATS URL, the region, the name, the GPUs, an enrollment token), each with
a proposed answer (Enter takes it): the file's current values on a re-run. Interactively a bad answer is
explained and asked again; with `--yes` it is an error that names the value, and nothing is written.
With an enrollment token it enrolls at once (see `_enroll`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlparse

import msgspec
from cyclopts import Parameter
from nats.errors import Error as NatsError
from rich.console import Console
from rich.markup import escape
from rich.prompt import Prompt
from rich.table import Table

from sdk import subjects
from sdk.api import Registered, RegisterWorker, Token
from sdk.connection import nats_url_from_env
from sdk.errors import PlatformError, Unauthorized, Unavailable, WorkerNotFound
from worker.cli.app import EXIT_BAD_CONFIG, app, fail
from worker.cli.console import format_value, gpu_table, redacted_url
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
from worker.link import PlatformLink
from worker.registration import read_worker_id, save_credentials, save_identity
from worker.telemetry import gpu_snapshot

#: The region `configure` proposes for a first config.
DEFAULT_REGION = "local"
NATS_SCHEMES = ("nats", "tls", "ws", "wss")


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
        return fail(exc)
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
    # The worker's own link: enrolling connects and asks exactly as the running worker will.
    link = PlatformLink(
        nats_url=config.nats_url, name="configure", tls=config.tls.ssl_context(),
        connect_wait_s=timeout_s, request_timeout_s=timeout_s,
    )
    try:
        await link.connect(config.enrollment_token)
    except Unauthorized:  # the auth callout says no more than that (the gateway's log says why)
        return fail(Unauthorized("the platform refused this enrollment token: unknown, already used or expired"))
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
        registered = await link.send(subjects.API_WORKERS_REGISTER, req, Registered)
    except PlatformError as exc:
        return fail(exc)
    finally:
        with contextlib.suppress(Exception):
            await link.close()
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
        return read_worker_id(state_dir)
    except WorkerNotFound:  # unreadable: enroll as a new worker
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

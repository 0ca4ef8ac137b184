"""Who this worker is to the platform: its registration, its credentials and their rotation.

The first registration spends an enrollment token and returns the worker's id, tokens and HMAC secret,
kept in `credentials_path` (mode 0600); later registrations are signed instead. A worker comes back as
the same worker after a restart: its id is kept in `<state_dir>/worker.json`. When a heartbeat's answer
says `rotate`, the worker asks for its next credential generation and switches to it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from sdk import subjects
from sdk.api import JobType, Registered, RegisterWorker, RotateCredentials, WorkerCredentials
from sdk.errors import Unauthorized, WorkerNotFound
from sdk.private_files import write_private
from worker.link import PlatformLink
from worker.telemetry import HostTelemetry

logger = logging.getLogger(__name__)

#: The worker's identity between runs, in its state dir.
STATE_FILE = "worker.json"
#: Its credentials (id, tokens, HMAC secret), in its state dir unless `credentials_path` says otherwise.
CREDENTIALS_FILE = "credentials.json"


class WorkerIdentity(msgspec.Struct, kw_only=True):
    """What survives a restart (in `<state_dir>/worker.json`)."""

    worker_id: str


@dataclass(eq=False, kw_only=True)
class Registration:
    """Registers the worker and keeps its identity (id, region) and its credentials (on the link, which
    signs with them)."""

    link: PlatformLink
    name: str
    #: The region asked for; the platform's answer is the one served.
    region: str
    capabilities: list[JobType]
    state_dir: Path
    credentials_path: Path
    #: For the first registration only; a worker with credentials signs instead.
    enrollment_token: str | None
    sample_host: Callable[[], Awaitable[HostTelemetry | None]]

    @property
    def worker_id(self) -> str | None:
        """The id the platform knows this worker by (None until registered)."""
        return self.link.worker_id

    @property
    def credentials_generation(self) -> int | None:
        credentials = self.link.credentials
        return credentials.generation if credentials is not None else None

    async def connect(self) -> None:
        """Open the link as this worker (its stored credentials), or as a machine enrolling with its token:
        also when NATS refuses the credentials (revoked, or another installation's) and a token was given."""
        if self.link.credentials is None:
            self.link.credentials = self._read_credentials()
        try:
            await self.link.connect(self.enrollment_token)
        except Unauthorized:
            if self.link.credentials is None or self.enrollment_token is None:
                raise
            logger.warning("NATS refused this worker's credentials; enrolling with the token")
            self.link.credentials = None
            await self.link.connect(self.enrollment_token)

    async def register(self, *, retry_for_s: float) -> None:
        """Register (again): with the stored credentials if there are any, else with the enrollment token.
        Credentials the platform refuses are replaced by a new enrollment when a token was given."""
        link = self.link
        if link.credentials is None:
            link.credentials = self._read_credentials()
        previous = link.worker_id or (link.credentials.worker_id if link.credentials else self._read_worker_id())
        sample = await self.sample_host()

        async def register() -> Registered:
            req = RegisterWorker(
                name=self.name,
                region=self.region,
                capabilities=self.capabilities,
                gpus=list(sample.gpus) if sample else [],
                worker_id=previous,
                # A worker with credentials signs instead; the token is for its first registration only.
                enrollment_token=self.enrollment_token if link.credentials is None else None,
            )
            return await link.send(subjects.API_WORKERS_REGISTER, req, Registered, retry_for_s=retry_for_s)

        try:
            registered = await register()
        except Unauthorized as exc:
            if link.credentials is None or self.enrollment_token is None:
                raise
            # Revoked, or credentials of another installation: a new token given to it enrolls it again.
            logger.warning("this worker's credentials were refused (%s); enrolling with the token", exc.message)
            link.credentials = None
            registered = await register()
        if link.worker_id is not None and (registered.worker_id, registered.region) != (link.worker_id, self.region):
            # The dispatch consumer is bound to the old identity; only a restart can move it.
            logger.error(
                "re-registration answered %s in %s, not %s in %s; restart this worker",
                registered.worker_id, registered.region, link.worker_id, self.region,
            )
            return
        link.worker_id, self.region = registered.worker_id, registered.region
        save_identity(self.state_dir, registered.worker_id)
        if registered.credentials is not None:
            self._store_credentials(registered.credentials)
        if link.enrolling:
            await link.reconnect_as_worker()
        returning = " (returning)" if previous == registered.worker_id else ""
        logger.info(
            "registered as %s (%s) in region %s%s", registered.worker_id, self.name, registered.region, returning
        )

    async def rotate(self) -> None:
        """Ask for the next credential generation and switch to it (the previous one verifies for a
        minute more, so requests signed meanwhile still land)."""
        assert self.link.worker_id is not None
        credentials = await self.link.send(
            subjects.rotate_subject(self.link.worker_id), RotateCredentials(), WorkerCredentials
        )
        self._store_credentials(credentials)
        logger.info("rotated this worker's credentials to generation %d", credentials.generation)

    def _store_credentials(self, credentials: WorkerCredentials) -> None:
        save_credentials(self.credentials_path, credentials)
        self.link.credentials = credentials
        logger.info(
            "stored this worker's credentials (generation %d) in %s", credentials.generation, self.credentials_path
        )

    def _read_credentials(self) -> WorkerCredentials | None:
        try:
            return msgspec.json.decode(self.credentials_path.read_bytes(), type=WorkerCredentials)
        except FileNotFoundError:
            return None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("ignoring unreadable credentials %s (enrolling again): %s", self.credentials_path, exc)
            return None

    def _read_worker_id(self) -> str | None:
        try:
            return read_worker_id(self.state_dir)
        except WorkerNotFound as exc:
            logger.warning("%s; registering as a new worker", exc.message)
            return None


# --- The files a worker keeps ----------------------------------------------------------------------------


def read_worker_id(state_dir: Path) -> str | None:
    """The id this machine's worker got when it registered, or None if it never did. Raises
    WorkerNotFound when `<state_dir>/worker.json` is unreadable."""
    path = state_dir / STATE_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=WorkerIdentity).worker_id
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WorkerNotFound(f"{path} is unreadable ({exc}); start the worker again to rewrite it") from None


def save_identity(state_dir: Path, worker_id: str) -> None:
    """Remember the worker's id in its state dir, so a restart comes back as the same worker."""
    write_private(state_dir / STATE_FILE, msgspec.json.encode(WorkerIdentity(worker_id=worker_id)))


def save_credentials(path: Path, credentials: WorkerCredentials) -> None:
    """Keep the worker's credentials (its HMAC secret among them) readable by the owner only."""
    write_private(path, msgspec.json.encode(credentials))

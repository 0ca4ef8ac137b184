"""Worker commands and queries: registration, heartbeats, a worker's reports about itself, credential
rotation; the worker list and one worker (from the projections).

A worker's reports about its jobs are job commands (`gateway.jobs`); the reports about itself (models
loaded and unloaded, draining) are appended to its own subject `workers.<id>`.
"""

from __future__ import annotations

import logging
import secrets

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from gateway.auth import Credentials
from gateway.history import HistoryQueries
from gateway.jobs import PROJECTION_TIMEOUT_S
from sdk import subjects
from sdk.api import (
    Accepted,
    GetWorker,
    HeartbeatAck,
    ListWorkers,
    Registered,
    RegisterWorker,
    WorkerCredentials,
    WorkerPage,
    WorkerView,
)
from sdk.connection import request
from sdk.errors import BadRequest
from sdk.events import (
    Heartbeat,
    WorkerCredentialsRotated,
    WorkerEvent,
    WorkerRegistered,
    encoder,
    worker_event_decoder,
)
from sdk.log import append
from sdk.signing import AuthReason, forbidden, refused
from sdk.workers import SelfReport, decide_self_report, must_register

logger = logging.getLogger(__name__)


async def last_worker_event(js: JetStreamContext, worker_id: str) -> WorkerEvent | None:
    """The newest event on `workers.<id>` (None: the platform never heard of this worker)."""
    try:
        msg = await js.get_msg(subjects.WORKERS_STREAM, subject=subjects.worker_subject(worker_id), direct=True)
    except NotFoundError:
        return None
    return worker_event_decoder.decode(msg.data or b"")


class WorkerCommands(HistoryQueries):
    """The gateway's worker commands and queries (a part of `gateway.service.Gateway`)."""

    nc: NatsClient
    js: JetStreamContext
    credentials: Credentials

    # --- Queries -----------------------------------------------------------------------------------

    async def workers(self, req: ListWorkers) -> WorkerPage:
        if req.at_time is not None:
            return await self.workers_at(req)  # the past fleet, folded from the log (`gateway.history`)
        return await request(self.nc, subjects.PROJ_WORKERS_LIST, req, WorkerPage, timeout_s=PROJECTION_TIMEOUT_S)

    async def worker(self, worker_id: str) -> WorkerView:
        return await request(
            self.nc, subjects.PROJ_WORKERS_GET, GetWorker(id=worker_id), WorkerView, timeout_s=PROJECTION_TIMEOUT_S
        )

    # --- Commands ----------------------------------------------------------------------------------

    async def register(self, req: RegisterWorker, returning: str | None = None) -> Registered:
        """`WorkerRegistered`. A new worker spends an enrollment token and receives its credentials (once);
        a returning worker has proved who it is (`returning`: the worker id its signature names)."""
        credentials: WorkerCredentials | None = None
        if returning is not None:
            if req.worker_id not in (None, returning):
                raise forbidden(AuthReason.WORKER_MISMATCH, f"worker {returning} cannot register as {req.worker_id}")
            worker_id = returning
        elif req.enrollment_token is not None:
            worker_id = req.worker_id or f"w{secrets.token_hex(6)}"
            credentials = await self.credentials.enroll(req.enrollment_token, worker_id)
        else:
            raise refused(
                AuthReason.MISSING_HEADER,
                "a new worker registers with an enrollment token (`gpuctl workers enroll`); "
                "a returning worker signs its registration",
            )
        event = WorkerRegistered(
            worker_id=worker_id,
            name=req.name,
            region=req.region,
            capabilities=tuple(req.capabilities),
            gpus=tuple(req.gpus),
        )
        ack = await append(self.js, subjects.worker_subject(worker_id), event)
        how = "enrolled" if credentials is not None else "returning"
        logger.info("worker %s (%s) registered in region %s (%s)", worker_id, req.name, req.region, how)
        return Registered(worker_id=worker_id, region=req.region, seq=ack.seq, credentials=credentials)

    async def heartbeat(self, worker_id: str, beat: Heartbeat) -> HeartbeatAck:
        """Store the latest telemetry; a worker the platform lost (or never knew) must register again."""
        if beat.worker_id != worker_id:
            raise BadRequest(f"heartbeat for {beat.worker_id} sent on the subject of {worker_id}")
        if must_register(await last_worker_event(self.js, worker_id)):
            return HeartbeatAck(registered=False)
        await self.js.publish(subjects.heartbeat_subject(beat.region, worker_id), encoder.encode(beat))
        return HeartbeatAck(registered=True, rotate=await self.credentials.rotation_due(worker_id))

    async def rotate(self, worker_id: str) -> WorkerCredentials:
        """The worker's next credential generation, in the reply only; the log records the generation
        (once: a generation sent again after a lost reply is not a new event)."""
        rotation = await self.credentials.rotate_worker(worker_id)
        credentials = rotation.credentials
        if rotation.issued:
            event = WorkerCredentialsRotated(worker_id=worker_id, generation=credentials.generation)
            await append(self.js, subjects.worker_subject(worker_id), event)
        logger.info("worker %s rotated its credentials to generation %d", worker_id, credentials.generation)
        return credentials

    async def report_self(self, worker_id: str, report: SelfReport) -> Accepted:
        """Append what a worker reports about itself to its subject."""
        ack = await append(self.js, subjects.worker_subject(worker_id), decide_self_report(worker_id, report))
        return Accepted(seq=ack.seq)

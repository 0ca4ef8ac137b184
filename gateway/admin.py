"""The operator's actions on credentials: API keys, enrollment tokens, rotating and revoking workers.

One implementation behind the gateway's admin routes (`/api/v1/admin/...`, which `gpuctl keys|workers`
call like any other client) and the gateway's first start (`open_admin`: the first operator key). Revoking a worker also appends `WorkerDeregistered`, so the scheduler
requeues the jobs it held; nothing here ever logs or appends a secret.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from gateway.auth import Credentials, load_or_create_master_key
from gateway.auth.master_key import MASTER_KEY_FILE
from sdk import subjects
from sdk.api import (
    ApiKeyCreated,
    ApiKeyList,
    CreateApiKey,
    CreateEnrollment,
    EnrollmentCreated,
    WorkerAction,
)
from sdk.connection import connect
from sdk.events import WorkerDeregistered, now_ms, worker_event_decoder
from sdk.log import append, ensure_streams

logger = logging.getLogger(__name__)

REVOKED_REASON = "revoked"


class Admin:
    def __init__(self, js: JetStreamContext, credentials: Credentials) -> None:
        self.js = js
        self.credentials = credentials

    async def create_api_key(self, req: CreateApiKey) -> ApiKeyCreated:
        key_id, api_key = await self.credentials.create_api_key(req.name, req.role)
        return ApiKeyCreated(key_id=key_id, name=req.name, role=req.role, api_key=api_key)

    async def list_api_keys(self) -> ApiKeyList:
        return ApiKeyList(items=await self.credentials.list_api_keys())

    async def revoke_api_key(self, key_id: str) -> None:
        await self.credentials.revoke_api_key(key_id)

    async def create_enrollment(self, req: CreateEnrollment) -> EnrollmentCreated:
        token = await self.credentials.create_enrollment_token(req.ttl_s, worker_id=req.worker_id)
        return EnrollmentCreated(
            enrollment_token=token, expires_at_ms=now_ms() + int(req.ttl_s * 1000), worker_id=req.worker_id
        )

    async def request_rotation(self, worker_id: str) -> WorkerAction:
        """The worker rotates at its next heartbeat (it must ask itself: only it may see the new secret)."""
        await self.credentials.request_rotation(worker_id)
        return WorkerAction(worker_id=worker_id, status="rotation_requested")

    async def revoke_worker(self, worker_id: str) -> WorkerAction:
        """Refuse the worker's signatures and tokens from now on, and deregister it: the scheduler
        requeues the jobs it held. Revoking twice appends nothing more."""
        await self.credentials.revoke_worker(worker_id)
        if not await self._deregistered(worker_id):
            event = WorkerDeregistered(worker_id=worker_id, reason=REVOKED_REASON)
            await append(self.js, subjects.worker_subject(worker_id), event)
        logger.info("worker %s revoked and deregistered", worker_id)
        return WorkerAction(worker_id=worker_id, status="revoked")

    async def _deregistered(self, worker_id: str) -> bool:
        try:
            subject = subjects.worker_subject(worker_id)
            msg = await self.js.get_msg(subjects.WORKERS_STREAM, subject=subject, direct=True)
        except NotFoundError:
            return False
        return isinstance(worker_event_decoder.decode(msg.data or b""), WorkerDeregistered)


@asynccontextmanager
async def open_admin(nats_url: str | None, secrets_dir: Path) -> AsyncIterator[Admin]:
    """`Admin` outside a serving gateway (its first start, tests): connects as the platform user
    (`nats_url` carries the credentials) and reads the master key from `secrets_dir` (created there on
    first use)."""
    master_key = load_or_create_master_key(secrets_dir / MASTER_KEY_FILE)
    nc = await connect(nats_url, name="gateway-admin", wait_s=10.0)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        async with await Credentials.open(js, master_key) as credentials:
            yield Admin(js, credentials)
    finally:
        await nc.close()

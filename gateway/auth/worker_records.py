"""Worker records mirrored in memory from the `auth` bucket by a KV watch, so verifying a signed report
(two per job, and every heartbeat) reads no bucket.

Revocation stays immediate where it happens: the gateway that writes a worker's record (enrollment,
rotation, promotion, revocation) reads it back into the mirror before it answers, and the mirror never
takes an older revision over a newer one, so a read that began before the write cannot bring the old
record back. Every other gateway sees the change through its watch within milliseconds, as it sees a
revoked token family (`gateway.auth.revocations`). A worker the mirror does not know (enrolled on
another gateway a moment ago) is read from the bucket.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from gateway.auth.records import WORKER_RECORDS, WorkerRecord, worker_decoder
from gateway.kv import KeyMirror, Versioned

logger = logging.getLogger(__name__)


class WorkerRecords(KeyMirror):
    def __init__(self, kv: KeyValue) -> None:
        super().__init__(kv, WORKER_RECORDS)
        self._records: dict[str, Versioned[WorkerRecord]] = {}

    async def start(self, timeout_s: float = 10.0) -> None:
        await super().start(timeout_s)
        logger.info("worker record mirror loaded %d workers", len(self._records))

    def get(self, worker_id: str) -> Versioned[WorkerRecord] | None:
        """The mirrored record (None: unknown here, or the mirror is not following the bucket)."""
        return self._records.get(worker_id) if self.following else None

    def put(self, worker_id: str, loaded: Versioned[WorkerRecord]) -> None:
        """Keep a record read from the bucket, unless a newer revision is known."""
        known = self._records.get(worker_id)
        if self.following and (known is None or known.revision < loaded.revision):
            self._records[worker_id] = loaded

    def apply(self, entry: KeyValue.Entry) -> None:
        worker_id = WORKER_RECORDS.token(entry.key)
        if worker_id is None:  # not a record's key (the watch reads every depth under `worker.`)
            return
        if entry.operation in (KV_DEL, KV_PURGE):
            self._records.pop(worker_id, None)
            return
        try:
            record = worker_decoder.decode(entry.value or b"")
        except msgspec.DecodeError:
            logger.warning("ignored an undecodable worker record %s", entry.key)
            return
        known = self._records.get(worker_id)
        if known is None or known.revision < (entry.revision or 0):
            self._records[worker_id] = Versioned(record, entry.revision or 0)

    def __len__(self) -> int:
        return len(self._records)

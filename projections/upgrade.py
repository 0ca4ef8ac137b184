"""Read-model upgrades without downtime: the projections' answer to schema migrations.

Each read model declares a version (`store.MODEL_VERSIONS`). Projections that start on a file of other
versions do not drop it: they keep answering reads from it, frozen where it stood (`Store.open_frozen`),
and fold the log from the start into a new file beside it, `<db>.upgrade`, with the same consumers and
batches as always. Once the new file has reached the end the log had when the upgrade began, and the
log has not run away meanwhile (`CATCH_UP_LAG`), the service switches under its write lock: the new file
is closed, renamed over the old one and opened again, and reads go to it. The old file's rows stay
readable until that moment, so reads continue throughout; a read that asks for a write newer than the
old file (`min_seq`) waits for the switch, as it would for any lagging projection.

A restart during an upgrade starts it again (the half-built file is deleted); the old file is only ever
replaced by a file that has caught up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from nats.js import JetStreamContext

from projections.feed import BATCH_MAX, log_ends
from projections.store import Store
from sdk.api.projections import UpgradeProgress

logger = logging.getLogger(__name__)

#: The new file takes over once every stream is at most this far behind the log's end.
CATCH_UP_LAG = BATCH_MAX
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def remove_with_side_files(path: Path) -> None:
    for suffix in ("", *SQLITE_SIDE_FILES):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class Upgrade:
    """The new file being folded from the log, and when it may take over from `db_path`."""

    def __init__(self, db_path: Path, versions: Mapping[str, int]) -> None:
        self.db_path = db_path
        self.path = db_path.with_name(f"{db_path.name}.upgrade")
        self.versions = dict(versions)
        self.targets: dict[str, int] = {}
        self.started_at_ms = time.time_ns() // 1_000_000
        self.store: Store | None = None

    async def begin(self, js: JetStreamContext) -> Store:
        """An empty new file to fold into from the start of the log; the log's end now is the target."""
        remove_with_side_files(self.path)  # what a restart left half-built
        self.targets = await log_ends(js)
        self.store = await Store.open(self.path, self.versions)
        logger.info("upgrading read models to %s: folding the log into %s up to %s", self.versions, self.path, self.targets)
        return self.store

    async def caught_up(self, js: JetStreamContext) -> bool:
        """Whether the new file has reached its targets and is near the log's end now (else the targets
        move to the end now, and folding goes on)."""
        assert self.store is not None
        positions = self.store.positions
        if any(positions.get(stream, 0) < target for stream, target in self.targets.items()):
            return False
        ends = await log_ends(js)
        if all(end - positions.get(stream, 0) <= CATCH_UP_LAG for stream, end in ends.items()):
            return True
        self.targets = ends
        return False

    async def take_over(self) -> Store:
        """Close the new file, rename it over the old one and open it there. The caller holds the write
        lock (no batch in flight) and keeps the old, frozen store answering until this returns: it reads
        the old file's inode, which the rename leaves intact, and the old file has no write-ahead log
        that the new one could mistake for its own."""
        assert self.store is not None
        await self.store.close()
        for suffix in SQLITE_SIDE_FILES:
            Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)
        os.replace(self.path, self.db_path)
        self.store = None
        store = await Store.open(self.db_path, self.versions)
        logger.info("read models upgraded to %s in %s at %s", self.versions, self.db_path, store.positions)
        return store

    async def abandon(self) -> None:
        if self.store is not None:
            await self.store.close()
            self.store = None

    def progress(self) -> UpgradeProgress:
        return UpgradeProgress(
            path=str(self.path),
            positions=dict(self.store.positions) if self.store else {},
            targets=dict(self.targets),
            started_at_ms=self.started_at_ms,
        )


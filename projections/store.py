"""The read models in one SQLite file: jobs and workers folded from the streams, plus stream positions.

Each batch of events is one transaction that writes the rows and the positions they reach (DESIGN,
invariant 5): a crash never leaves rows ahead of, or behind, the position a restart resumes from.
Job rows go through the shared `sdk.jobs.apply`, worker rows through `sdk.workers.apply_worker`, so the
projection and the scheduler never disagree.

Every column is folded from one stream only (jobs from JOBS; a worker's lifecycle columns from WORKERS,
its telemetry columns from the latest heartbeat), so the order in which the live consumers of the
three streams interleave never changes a row: replaying the streams one after another gives the same
tables. Heartbeats are short-lived, though: a rebuild run after a worker's last heartbeat aged out of
HEARTBEATS (10 minutes) has no telemetry for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite
import msgspec

from sdk import subjects
from sdk.errors import InvalidTransition, StaleAttempt
from sdk.events import heartbeat_decoder, job_event_decoder, worker_event_decoder
from sdk.jobs import HELD_BY_WORKER, TERMINAL, Job, JobStatus, apply
from sdk.stream_reader import Delivered
from sdk.workers import WorkerRow, WorkerStatus, apply_heartbeat, apply_worker

logger = logging.getLogger(__name__)

#: Each read model's version: bump a model's number whenever its table or its fold changes. Read models
#: are rebuilt from events, never migrated: projections that start on a file of other versions keep
#: serving it while they build the new one from the log beside it, then switch (`projections.service`,
#: docs/operations.md "Read-model upgrades"). Files from before per-model versions carry one number in
#: `PRAGMA user_version` (3 was the last).
MODEL_VERSIONS = {"jobs": 4, "workers": 3}

SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, model TEXT, params TEXT NOT NULL, region TEXT,
    priority INTEGER NOT NULL, max_attempts INTEGER NOT NULL, timeout_s REAL NOT NULL, owner TEXT,
    region_policy TEXT, max_latency_ms REAL, webhook_url TEXT, status TEXT NOT NULL, attempt INTEGER NOT NULL, worker_id TEXT, result TEXT, error TEXT,
    progress REAL, cancel_requested INTEGER NOT NULL, submitted_at_ms INTEGER NOT NULL,
    assigned_at_ms INTEGER, started_at_ms INTEGER, finished_at_ms INTEGER,
    seq INTEGER NOT NULL, submitted_seq INTEGER NOT NULL
);
CREATE INDEX jobs_newest_first ON jobs (submitted_seq);
CREATE INDEX jobs_by_worker ON jobs (worker_id, status);
CREATE TABLE workers (
    id TEXT PRIMARY KEY, name TEXT, region TEXT, status TEXT, capabilities TEXT NOT NULL,
    loaded_models TEXT NOT NULL, gpus TEXT NOT NULL, updated_at_ms INTEGER NOT NULL, seq INTEGER NOT NULL,
    capacity INTEGER NOT NULL, last_heartbeat_ms INTEGER, heartbeat_models TEXT NOT NULL,
    heartbeat_gpus TEXT NOT NULL
);
CREATE TABLE positions (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE models (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
"""
#: Jobs whose events retention took out of the log (their rows came from, or went to, a snapshot).
#: Not a read model: bookkeeping, so the next run does not archive them again. Created on every open, so
#: files from before retention get it without a version change.
ARCHIVED_SCHEMA = "CREATE TABLE IF NOT EXISTS archived (id TEXT PRIMARY KEY);"
#: A stream message as the fold takes it: `Delivered`, or a plain tuple of its fields (`projections.refold`).
Message = Delivered | tuple[str, int, bytes, int]
#: The most ids looked up in one query (SQLite's limit on parameters is 32,766).
LOAD_CHUNK = 10_000
#: Rows first, positions last (`dump` compares the rows).
TABLES = ("jobs", "workers", "positions", "models", "archived")


# --- Workers: the row (the shared lifecycle fold plus the latest heartbeat) --------------------------


# --- Rows <-> structs ----------------------------------------------------------------------------

Row = TypeVar("Row", Job, WorkerRow)
_json = msgspec.json.Encoder()


class Table(Generic[Row]):
    """One column per struct field; nested values (params, results, lists) as JSON text."""

    def __init__(self, name: str, kind: type[Row], json_columns: Iterable[str], columns: Iterable[str] = ()) -> None:
        self.name = name
        self.kind = kind
        #: `columns` restricts the table to those a file of another version has (`Store.open_frozen`):
        #: fields it lacks take their defaults, columns it has beyond them are not read.
        self.columns = tuple(f.name for f in msgspec.structs.fields(kind) if not columns or f.name in columns)
        self.json_columns = frozenset(json_columns)
        self._json_at = tuple(i for i, c in enumerate(self.columns) if c in self.json_columns)
        self.select_sql = f"SELECT {', '.join(self.columns)} FROM {name}"
        self.upsert_sql = (
            f"INSERT OR REPLACE INTO {name} ({', '.join(self.columns)}) "
            f"VALUES ({', '.join('?' * len(self.columns))})"
        )

    def restricted_to(self, columns: Iterable[str]) -> Table[Row]:
        return Table(self.name, self.kind, self.json_columns, frozenset(columns))

    def to_row(self, obj: Row) -> tuple[Any, ...]:
        # `astuple` in C, then JSON only where a column needs it: the replay's hottest line after decoding.
        # sqlite3 binds str enums as their text and bools as 0/1.
        row = list(msgspec.structs.astuple(obj))
        for i in self._json_at:
            row[i] = _json.encode(row[i]).decode()
        return tuple(row)

    def from_row(self, row: Sequence[Any]) -> Row:
        fields = {
            c: msgspec.json.decode(v) if c in self.json_columns else v for c, v in zip(self.columns, row)
        }
        return msgspec.convert(fields, self.kind, strict=False)  # strict=False: SQLite's 0/1 for bools


JOBS = Table("jobs", Job, ("params", "result", "error"))
WORKERS = Table("workers", WorkerRow, ("capabilities", "loaded_models", "gpus", "heartbeat_models", "heartbeat_gpus"))

DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    subjects.JOBS_STREAM: job_event_decoder,
    subjects.WORKERS_STREAM: worker_event_decoder,
    subjects.HEARTBEATS_STREAM: heartbeat_decoder,
}


# --- The store -----------------------------------------------------------------------------------


async def _versions(db: aiosqlite.Connection) -> dict[str, int] | None:
    """The model versions a file was folded with; None for a file without read models."""
    tables = {name for (name,) in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "models" in tables:
        return dict(await db.execute_fetchall("SELECT name, version FROM models"))  # type: ignore[arg-type]
    if "positions" in tables:
        [(version,)] = await db.execute_fetchall("PRAGMA user_version")
        return {name: version for name in MODEL_VERSIONS}
    return None


async def file_versions(path: Path) -> dict[str, int] | None:
    """The model versions of the read models in `path`; None when there are none (no file, or empty)."""
    if not path.exists():
        return None
    async with aiosqlite.connect(path) as db:
        return await _versions(db)


class Store:
    """One writer connection (the fold) and one reader connection (queries); WAL lets them overlap."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        positions: dict[str, int],
        versions: dict[str, int],
        tables: tuple[Table[Job], Table[WorkerRow]] = (JOBS, WORKERS),
    ) -> None:
        self._writer = writer
        self._reader = reader
        #: The last applied sequence of each stream, as committed.
        self.positions = positions
        #: The version of each read model in this file.
        self.versions = versions
        self._jobs, self._workers = tables

    @classmethod
    async def open(cls, path: Path, versions: dict[str, int] | None = None) -> Store:
        """Open the read models in `path` to fold into them; a file of other `versions` (default: this
        code's) is emptied first, to be refolded from the streams."""
        versions = versions or MODEL_VERSIONS
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; a batch opens and commits its own.
        writer = await aiosqlite.connect(path, isolation_level=None)
        await writer.execute("PRAGMA journal_mode=WAL")
        # NORMAL may lose the last commits on power loss, but rows and positions go together, so a
        # restart simply refolds them from the streams.
        await writer.execute("PRAGMA synchronous=NORMAL")
        found = await _versions(writer)
        if found != versions:
            if found:
                logger.info("read model versions %s are not %s: refolding %s", found, versions, path)
            await writer.executescript("".join(f"DROP TABLE IF EXISTS {t};" for t in TABLES) + SCHEMA)
            await writer.executemany("INSERT INTO models (name, version) VALUES (?, ?)", versions.items())
        await writer.execute(ARCHIVED_SCHEMA)
        positions = dict(await writer.execute_fetchall("SELECT stream, seq FROM positions"))
        reader = await aiosqlite.connect(path)
        logger.info("opened read models %s at %s", path, positions)
        return cls(writer, reader, positions, dict(versions))

    @classmethod
    async def open_frozen(cls, path: Path) -> Store:
        """Open the read models of another version in `path` to read them only, while their successor is
        built: the file leaves WAL mode (its write-ahead log folded in), so it can be replaced by a rename
        while this store still reads it; tables read only the columns the file has."""
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=DELETE")
        versions = await _versions(db) or {}
        columns = {
            table: {row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
            for table in ("jobs", "workers")
        }
        positions = dict(await db.execute_fetchall("SELECT stream, seq FROM positions"))
        tables = (JOBS.restricted_to(columns["jobs"]), WORKERS.restricted_to(columns["workers"]))
        logger.info("serving read models %s of versions %s at %s until their successor is built", path, versions, positions)
        return cls(db, db, positions, versions, tables)  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._reader is not self._writer:
            await self._reader.close()
        await self._writer.close()

    async def apply_batch(self, batch: Sequence[Message]) -> None:
        """Fold a batch of stream messages (`Delivered`, or the same fields in a plain tuple) into the
        rows, in one transaction with the positions reached.

        Each row touched is read once, folded in memory through the whole batch and written once
        (`executemany`): a batch that holds whole job lifecycles costs one row write per job."""
        if not batch:
            return
        # Decoded in batch order, jobs apart from workers: each table is folded from its own events only.
        job_events: list[tuple[int, Any]] = []
        worker_events: list[tuple[str, int, Any]] = []
        for stream, seq, data, _pending in batch:
            if not data:
                continue  # no event: a gap filler of `gpuctl import`, purged once the import ends
            try:
                event = DECODERS[stream].decode(data)
            except msgspec.DecodeError as exc:
                logger.warning("skipped undecodable %s #%d: %s", stream, seq, exc)
                continue
            if stream == subjects.JOBS_STREAM:
                job_events.append((seq, event))
            else:
                worker_events.append((stream, seq, event))
        jobs: dict[str, Job] = await self._load(JOBS, {event.job_id for _, event in job_events})
        workers: dict[str, WorkerRow] = await self._load(WORKERS, {event.worker_id for _, _, event in worker_events})
        for seq, event in job_events:
            try:
                jobs[event.job_id] = apply(jobs.get(event.job_id), event, seq)
            except (InvalidTransition, StaleAttempt) as exc:
                _skipped(subjects.JOBS_STREAM, seq, event, exc)
        for stream, seq, event in worker_events:
            try:
                if stream == subjects.WORKERS_STREAM:
                    row = workers.get(event.worker_id) or WorkerRow(id=event.worker_id)
                    workers[event.worker_id] = apply_worker(row, event, seq)
                else:
                    workers[event.worker_id] = apply_heartbeat(workers.get(event.worker_id), event)
            except (InvalidTransition, StaleAttempt) as exc:
                _skipped(stream, seq, event, exc)
        reached = {stream: seq for stream, seq, *_ in batch}

        await self._writer.execute("BEGIN IMMEDIATE")
        try:
            await self._writer.executemany(JOBS.upsert_sql, [JOBS.to_row(job) for job in jobs.values()])
            await self._writer.executemany(WORKERS.upsert_sql, [WORKERS.to_row(row) for row in workers.values()])
            await self._writer.executemany(
                "INSERT OR REPLACE INTO positions (stream, seq) VALUES (?, ?)", reached.items()
            )
            await self._writer.execute("COMMIT")
        except BaseException:
            await self._writer.execute("ROLLBACK")
            raise
        self.positions.update(reached)

    async def _load(self, table: Table[Row], ids: set[str]) -> dict[str, Row]:
        wanted = list(ids)
        found: dict[str, Row] = {}
        # SQLite takes at most 32,766 parameters in one statement.
        for start in range(0, len(wanted), LOAD_CHUNK):
            chunk = wanted[start : start + LOAD_CHUNK]
            rows = await self._writer.execute_fetchall(
                f"{table.select_sql} WHERE id IN ({', '.join('?' * len(chunk))})", chunk
            )
            found.update((obj.id, obj) for obj in map(table.from_row, rows))
        return found

    async def put_archived(self, jobs: Sequence[Job]) -> None:
        """Write the rows of jobs retention archived, as they are, and mark them archived (a snapshot
        loaded before the rest of the log is folded, or the jobs a retention run just archived)."""
        await self._writer.execute("BEGIN IMMEDIATE")
        try:
            await self._writer.executemany(JOBS.upsert_sql, [JOBS.to_row(job) for job in jobs])
            await self._writer.executemany("INSERT OR IGNORE INTO archived (id) VALUES (?)", [(j.id,) for j in jobs])
            await self._writer.execute("COMMIT")
        except BaseException:
            await self._writer.execute("ROLLBACK")
            raise

    # --- Queries (reader connection) ---

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._reader.execute_fetchall(f"{self._jobs.select_sql} WHERE id = ?", (job_id,))
        return self._jobs.from_row(rows[0]) if rows else None

    async def list_jobs(
        self,
        *,
        limit: int,
        status: JobStatus | None = None,
        job_type: str | None = None,
        worker_id: str | None = None,
        owner: str | None = None,
        below_seq: int | None = None,
    ) -> list[Job]:
        """Newest first (by submission sequence), only jobs submitted before `below_seq` when given."""
        where, args = _filters(
            {
                "status = ?": status.value if status else None,
                "type = ?": job_type,
                "worker_id = ?": worker_id,
                "owner = ?": owner,
                "submitted_seq < ?": below_seq,
            }
        )
        rows = await self._reader.execute_fetchall(
            f"{self._jobs.select_sql}{where} ORDER BY submitted_seq DESC LIMIT ?", (*args, limit)
        )
        return [self._jobs.from_row(row) for row in rows]

    async def finished_before(self, cutoff_ms: int) -> list[Job]:
        """Jobs that ended (completed, failed, cancelled, expired) before `cutoff_ms` and are not archived
        yet, oldest first."""
        ended = tuple(s.value for s in TERMINAL)
        rows = await self._reader.execute_fetchall(
            f"{self._jobs.select_sql} WHERE status IN ({', '.join('?' * len(ended))}) AND finished_at_ms < ?"
            " AND id NOT IN (SELECT id FROM archived) ORDER BY submitted_seq",
            (*ended, cutoff_ms),
        )
        return [self._jobs.from_row(row) for row in rows]

    async def jobs_held_by(self, worker_id: str) -> list[str]:
        """Ids of the jobs assigned to or running on a worker, oldest first."""
        held = tuple(s.value for s in HELD_BY_WORKER)
        rows = await self._reader.execute_fetchall(
            f"SELECT id FROM jobs WHERE worker_id = ? AND status IN ({', '.join('?' * len(held))})"
            " ORDER BY submitted_seq",
            (worker_id, *held),
        )
        return [job_id for (job_id,) in rows]

    async def get_worker(self, worker_id: str) -> WorkerRow | None:
        rows = await self._reader.execute_fetchall(
            f"{self._workers.select_sql} WHERE id = ? AND status IS NOT NULL", (worker_id,)
        )
        return self._workers.from_row(rows[0]) if rows else None

    async def list_workers(self, *, region: str | None = None, status: WorkerStatus | None = None) -> list[WorkerRow]:
        # A worker only heard of through heartbeats has no status yet: not listed until it registers.
        where, args = _filters(
            {"region = ?": region, "status = ?": status.value if status else None}, "status IS NOT NULL"
        )
        rows = await self._reader.execute_fetchall(f"{self._workers.select_sql}{where} ORDER BY id", args)
        return [self._workers.from_row(row) for row in rows]


def _skipped(stream: str, seq: int, event: Any, exc: Exception) -> None:
    logger.warning("skipped %s #%d (%s): %s", stream, seq, type(event).__name__, exc)


def _filters(conditions: dict[str, Any], *fixed: str) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause of the `fixed` conditions and those whose value is not None, and their arguments."""
    used = {sql: value for sql, value in conditions.items() if value is not None}
    clauses = [*fixed, *used]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(used.values())


async def dump(db_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the read models, ordered by primary key: two databases with equal dumps are equal."""
    async with aiosqlite.connect(db_path) as db:
        return {table: list(await db.execute_fetchall(f"SELECT * FROM {table} ORDER BY id")) for table in TABLES[:2]}


async def read_positions(db_path: Path) -> dict[str, int]:
    """The stream positions a database has applied (what `rebuild(until=...)` takes to reproduce it)."""
    async with aiosqlite.connect(db_path) as db:
        return dict(await db.execute_fetchall("SELECT stream, seq FROM positions"))  # type: ignore[arg-type]

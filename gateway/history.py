"""Time travel: a job, the job list and the fleet as they were at a JOBS sequence (`at_seq`) or at a
moment (`at_time`, RFC 3339), folded from the log with the core's own `apply` (`sdk.history`).

The read models hold only the present, so these reads go to the log, like a job's events do: one job
folds its own subject (direct gets), a list or the fleet folds the streams up to that point, which
costs a read of the log so far (seconds for a million events): an operator's question, not a hot path.
A moment is the last sequence the server had stored by then (`sdk.history.seq_at_time`), so `at_time`
and `at_seq` name the same states. Ownership holds as in the present: a client sees only its own jobs.
Telemetry is not history (HEARTBEATS keeps ten minutes): a past worker shows the last heartbeat before
that moment only while the stream still holds it, else none and a capacity of 1, as a rebuilt read model.
"""

from __future__ import annotations

import datetime as dt
import logging
import re

import msgspec
from nats.js import JetStreamContext

from sdk import subjects
from sdk.api import GetJob, JobPage, JobView, ListJobs, ListWorkers, WorkerPage, job_view
from sdk.errors import BadRequest, JobNotFound
from sdk.events import Heartbeat, heartbeat_decoder
from sdk.history import fold_job, fold_until, parse_time, read_log, seq_at_time, stream_end
from sdk.jobs import HELD_BY_WORKER, JobStatus, visible_to
from sdk.workers import WorkerRow, WorkerState, WorkerStatus, apply_heartbeat, worker_view

logger = logging.getLogger(__name__)

_CURSOR = re.compile(r"[1-9][0-9]{0,18}")


class HistoryQueries:
    """The gateway's reads of the past (a part of `gateway.service.Gateway`)."""

    js: JetStreamContext

    async def _jobs_seq(self, at_seq: int | None, at_time: str | None) -> int:
        """The JOBS sequence a request names: `at_seq` as it is, or the last one stored by `at_time`."""
        if at_seq is not None and at_time is not None:
            raise BadRequest("give at_seq or at_time, not both", {"at_seq": at_seq, "at_time": at_time})
        if at_time is not None:
            return await seq_at_time(self.js, subjects.JOBS_STREAM, parse_time(at_time))
        assert at_seq is not None
        last_seq = await stream_end(self.js, subjects.JOBS_STREAM)
        if at_seq > last_seq:
            raise BadRequest(
                f"at_seq {at_seq} is beyond the end of {subjects.JOBS_STREAM} (its last sequence is {last_seq})",
                {"at_seq": at_seq, "last_seq": last_seq},
            )
        return at_seq

    async def job_at(self, req: GetJob, owner: str | None) -> JobView:
        seq = await self._jobs_seq(req.at_seq, req.at_time)
        job = await fold_job(self.js, req.id, seq)
        if job is None or not visible_to(job, owner):
            raise JobNotFound(f"job {req.id} not found at {subjects.JOBS_STREAM} #{seq}", {"id": req.id, "at_seq": seq})
        logger.info("job %s read as of %s #%d", req.id, subjects.JOBS_STREAM, seq)
        return job_view(job)

    async def jobs_at(self, req: ListJobs, owner: str | None) -> JobPage:
        """The list as `proj.jobs.list` would have answered then: filtered, newest first, paged by cursor."""
        if req.status is not None and req.status not in {s.value for s in JobStatus}:
            raise BadRequest(f"status {req.status!r} is not one of {', '.join(s.value for s in JobStatus)}")
        if req.cursor is not None and not _CURSOR.fullmatch(req.cursor):
            raise BadRequest(f"cursor {req.cursor!r} is not one this endpoint returned")
        seq = await self._jobs_seq(req.at_seq, req.at_time)
        fold = await fold_until(self.js, {subjects.JOBS_STREAM: seq})
        below = int(req.cursor) if req.cursor else None
        jobs = sorted(
            (
                job for job in fold.jobs.values()
                if visible_to(job, owner)
                and req.status in (None, job.status.value)
                and req.type in (None, job.type)
                and req.worker_id in (None, job.worker_id)
                and (below is None or job.submitted_seq < below)
            ),
            key=lambda job: job.submitted_seq,
            reverse=True,
        )
        page = jobs[: req.limit]
        more = len(jobs) > req.limit
        return JobPage(items=[job_view(job) for job in page], next_cursor=str(page[-1].submitted_seq) if more else None)

    async def workers_at(self, req: ListWorkers) -> WorkerPage:
        """The fleet at `req.at_time`: each registered worker's lifecycle, the jobs it held, its last heartbeat."""
        assert req.at_time is not None
        at = parse_time(req.at_time)
        if req.status is not None and req.status not in {s.value for s in WorkerStatus}:
            raise BadRequest(f"status {req.status!r} is not one of {', '.join(s.value for s in WorkerStatus)}")
        ends = {stream: await seq_at_time(self.js, stream, at) for stream in (subjects.JOBS_STREAM, subjects.WORKERS_STREAM)}
        fold = await fold_until(self.js, ends)
        heartbeats = await self._heartbeats_until(at)
        held: dict[str, list[tuple[int, str]]] = {}
        for job in fold.jobs.values():
            if job.status in HELD_BY_WORKER and job.worker_id is not None:
                held.setdefault(job.worker_id, []).append((job.submitted_seq, job.id))
        views = [
            worker_view(
                _worker_row(state, heartbeats.get(state.id)),
                [job_id for _, job_id in sorted(held.get(state.id, []))],
            )
            for state in sorted(fold.workers.values(), key=lambda w: w.id)
            if state.registered
            and req.region in (None, state.region)
            and req.status in (None, state.status.value if state.status else None)
        ]
        return WorkerPage(items=views)

    async def _heartbeats_until(self, at: dt.datetime) -> dict[str, Heartbeat]:
        """Each worker's last heartbeat stored by `at`, of those HEARTBEATS still holds."""
        end = await seq_at_time(self.js, subjects.HEARTBEATS_STREAM, at)
        latest: dict[str, Heartbeat] = {}
        async for record in read_log(self.js, subjects.HEARTBEATS_STREAM, until_seq=end):
            beat = heartbeat_decoder.decode(record.data)
            latest[beat.worker_id] = beat
        return latest


def _worker_row(state: WorkerState, beat: Heartbeat | None) -> WorkerRow:
    """The worker as a reader's row: its fold, with the telemetry of its last heartbeat by then if any."""
    row = WorkerRow(**msgspec.structs.asdict(state))
    return apply_heartbeat(row, beat) if beat is not None else row

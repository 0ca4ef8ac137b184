"""Where one job's time goes: the hops between the client's clock and the times the server stored each
of the job's events (one machine, one clock), as medians over jobs run one at a time."""

from __future__ import annotations

import statistics

from nats.js.errors import NotFoundError

from sdk import subjects
from sdk.connection import connect

#: The hops of one job, between the client's clock and the times the server stored each event.
HOPS = ("submit -> JobSubmitted stored", "-> JobAssigned (scheduler)", "-> JobStarted (dispatch, worker, report)",
        "-> JobCompleted (engine, report)", "-> the client's wait returns")


async def job_hops(nats_url: str, jobs: list[tuple[str, int, int]]) -> dict[str, float]:
    """Median ms of each hop of the jobs run one at a time (same machine: one clock)."""
    nc = await connect(nats_url, name="bench-hops")
    gaps: dict[str, list[float]] = {hop: [] for hop in HOPS}
    try:
        for job_id, start_ns, end_ns in jobs:
            stored = {}
            seq = 1
            while True:
                try:
                    msg = await nc.jetstream().get_msg(subjects.JOBS_STREAM, seq=seq, subject=subjects.job_subject(job_id),
                                                       next=True, direct=True)
                except NotFoundError:
                    break
                kind = (msg.headers or {}).get(subjects.EVENT_TYPE_HEADER, "")
                stored.setdefault(kind, msg.time.timestamp() * 1e9)  # type: ignore[union-attr]
                seq = msg.seq + 1
            times = [start_ns, *(stored.get(f"job.{kind}") for kind in ("submitted", "assigned", "started", "completed")),
                     end_ns]
            if None in times:
                continue
            for hop, before, after in zip(HOPS, times, times[1:]):
                gaps[hop].append((after - before) / 1e6)  # type: ignore[operator]
    finally:
        await nc.close()
    return {hop: statistics.median(values) for hop, values in gaps.items() if values}

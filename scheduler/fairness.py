"""Fairness: the order queued jobs are offered to workers.

Higher priority first. At equal priority the clients take turns: each client's first queued job, then
each client's second, and so on, every client's own jobs in submission order. A client that queued
10,000 jobs gets one offer per turn like a client that queued one, so a burst does not starve anyone;
within a turn the earlier submission goes first. Jobs without an owner (from before authentication) take
their turns as one client.
"""

from __future__ import annotations

from collections.abc import Iterable

from sdk.jobs import Job

#: Sort keys are packed into one integer (priority, then turn, then sequence; each field below 2**48), which
#: sorts 100,000 jobs several times faster than tuples do.
_FIELD = 1 << 48
_TOP_PRIORITY = 1 << 20


def fair_order(jobs: Iterable[Job]) -> list[Job]:
    by_submission = sorted(jobs, key=lambda job: (_TOP_PRIORITY - job.priority) * _FIELD + job.submitted_seq)
    turns: dict[tuple[int, str | None], int] = {}
    keys: list[int] = []
    for job in by_submission:
        client = (job.priority, job.owner)
        turn = turns.get(client, 0)
        turns[client] = turn + 1
        keys.append(((_TOP_PRIORITY - job.priority) * _FIELD + turn) * _FIELD + job.submitted_seq)
    return [by_submission[i] for i in sorted(range(len(keys)), key=keys.__getitem__)]

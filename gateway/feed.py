"""The gateway's live view of recent jobs: a fold of the gateway's one follower of JOBS (`gateway.follow`).

Two things ride on it: `wait` (a caller waiting for a job's terminal state is woken by the event that
ends it, with no polling and no consumer per waiter), and a cache of recent job states that makes a
worker's report one append instead of a fold of the job's subject. The cache is a first guess only:
an append at a stale sequence fails, and the caller folds the subject and decides again.

Memory: the cache holds live jobs only. A job leaves it when it finishes (nothing writes to a finished
job; a late report or a cancel folds the subject), and the least recently touched go first beyond
`CACHE_SIZE` (a backlog of queued jobs). At about 1 KB a job that is 10 MB at most, whatever the number of
jobs served; waiters leave with their request. Beside it, the last `FINISHED_SIZE` finished jobs (2 MB):
a client's wait usually comes just after its job ended, and a finished state is final, so `recent`
answers it without folding the subject. A finished job is never cached as live again (a read that
started before it finished comes back stale).

On shutdown `close` answers every pending waiter (and so every long poll and stream built on one) with
`Unavailable` at once, and refuses new ones: the HTTP server waits for open requests before it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from nats.aio.client import Client as NatsClient

from sdk.errors import InvalidTransition, StaleAttempt, Unavailable
from sdk.events import JobEvent
from sdk.jobs import Job, apply
from sdk.log import load_job

logger = logging.getLogger(__name__)

#: Live jobs kept (about 1 KB each); beyond it a report folds its job's subject: one read more.
CACHE_SIZE = 10_000
#: Finished jobs kept for the waits that come just after the end (about 1 KB each).
FINISHED_SIZE = 2_000
#: What a client is told to wait before it retries a request cut short by a shutdown (`Retry-After`).
SHUTDOWN_RETRY_AFTER_S = 1


class JobFeed:
    def __init__(self, nc: NatsClient, cache_size: int = CACHE_SIZE, finished_size: int = FINISHED_SIZE) -> None:
        self._js = nc.jetstream()
        self._cache: OrderedDict[str, Job] = OrderedDict()
        self._cache_size = cache_size
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._finished_size = finished_size
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        #: Re-reads of jobs whose cached copy missed events (kept: a task nobody holds may be collected).
        self._refreshes: set[asyncio.Task[None]] = set()
        self._closed = False

    async def stop(self) -> None:
        for task in self._refreshes:
            task.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()
        self._waiters.clear()

    def get(self, job_id: str) -> Job | None:
        return self._cache.get(job_id)

    def recent(self, job_id: str) -> Job | None:
        """The live job, or the job as it finished if it finished lately (None: fold the subject)."""
        return self._cache.get(job_id) or self._finished.get(job_id)

    def __len__(self) -> int:
        """How many live jobs the cache holds (at most `cache_size`)."""
        return len(self._cache)

    @property
    def finished(self) -> int:
        """How many finished jobs are kept for `recent` (at most `finished_size`)."""
        return len(self._finished)

    @property
    def waiting(self) -> int:
        """How many waits are pending."""
        return sum(len(futures) for futures in self._waiters.values())

    def remember(self, job: Job) -> None:
        """Keep a state this gateway just read or wrote (newer sequences win); a finished job leaves
        the cache and wakes its waiters."""
        if job.status.terminal:
            self._cache.pop(job.id, None)
            _keep_newest(self._finished, job, self._finished_size)
            self._wake(job)
            return
        if job.id in self._finished:
            return  # a stale read: the job has finished since
        _keep_newest(self._cache, job, self._cache_size)

    def close(self) -> None:
        """Fail every pending waiter with `Unavailable` now, and every later one at once (shutdown)."""
        if self._closed:
            return
        self._closed = True
        pending = self.waiting
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(_shutting_down())
        self._waiters.clear()
        logger.info("gateway shutting down: answered %d pending waits", pending)

    def waiter(self, job_id: str) -> asyncio.Future[Job]:
        """A future resolved with the job once it is terminal; register it before reading the job.
        Raises `Unavailable` once the feed is closed."""
        if self._closed:
            raise _shutting_down()
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        return future

    def forget_waiter(self, job_id: str, future: asyncio.Future[Job]) -> None:
        if future.done() and not future.cancelled():
            future.exception()  # failed by `close` while its job was read: retrieved, not a warning at exit
        futures = self._waiters.get(job_id)
        if futures and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiters[job_id]

    def _wake(self, job: Job) -> None:
        for future in self._waiters.pop(job.id, []):
            if not future.done():
                future.set_result(job)

    def apply(self, event: JobEvent, seq: int) -> None:
        """Fold one event of the log (`gateway.follow.JobFold`): the cached job moves on, its waiters wake."""
        known = self._cache.get(event.job_id) or self._finished.get(event.job_id)
        if known is not None and known.seq >= seq:
            return
        try:
            job = apply(known, event, seq)
        except (InvalidTransition, StaleAttempt):
            # The cache missed events of this job (it was evicted, or the log's start was replayed): drop
            # the guess, and read the job again for whoever waits on it.
            self._cache.pop(event.job_id, None)
            if event.job_id in self._waiters:
                task = asyncio.get_running_loop().create_task(self._refresh(event.job_id))
                self._refreshes.add(task)
                task.add_done_callback(self._refreshes.discard)
            return
        self.remember(job)

    async def _refresh(self, job_id: str) -> None:
        job = await load_job(self._js, job_id)
        if job is not None:
            self.remember(job)


def _keep_newest(jobs: OrderedDict[str, Job], job: Job, size: int) -> None:
    """Put `job` last in `jobs` unless `jobs` holds a newer state of it; the oldest leave past `size`."""
    known = jobs.get(job.id)
    if known is None or known.seq < job.seq:
        jobs[job.id] = job
        jobs.move_to_end(job.id)
        while len(jobs) > size:
            jobs.popitem(last=False)


def _shutting_down() -> Unavailable:
    return Unavailable("the gateway is shutting down; retry", {"retry_after_s": SHUTDOWN_RETRY_AFTER_S})

"""Direct sessions in the scheduler: each open session holds one slot of its worker, counted beside the
jobs in flight, so placement never gives that slot to a job (`sdk.direct` tells the whole story).

- `SessionBook` folds the SESSIONS stream (every instance, like the other streams): the open sessions,
  per worker. The leader applies its own appends at once; the consumer's later copy is ignored.
- `DirectSessions` is the leader's part. It answers `sched.direct.open` (no queue group: every instance
  hears it and only the leader answers, so standbys stay silent): under the lock that `_place` holds,
  it chooses the worker with `placement.choose_worker` (warm model first), appends
  `DirectSessionOpened` and counts the slot. A session nobody can take is refused with the placement
  explanation's reasons (`NoWorkerAvailable`). At each sweep it ends the sessions whose time is up or
  whose worker is lost, deregistered or draining: it asks the worker for the usage (a lost worker is
  not asked) and appends `DirectSessionClosed` at the session's sequence.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from scheduler.placement import NoPlacement, choose_worker, describe_rank, explain
from sdk import subjects
from sdk.api import decode
from sdk.connection import error_reply
from sdk.direct import DirectSession, PlaceSession, SessionPlaced, apply_session, closing, end_on_worker
from sdk.errors import InvalidTransition, NoWorkerAvailable, PlatformError, Unavailable
from sdk.events import DirectSessionClosed, DirectSessionOpened, SessionEvent, now_ms, session_event_decoder
from sdk.jobs import Job
from sdk.log import WrongLastSequence, append
from sdk.regions import LatencyTable
from sdk.tasks import cancel_and_wait

if TYPE_CHECKING:
    from scheduler.view import SchedulerView, TrackedWorker

logger = logging.getLogger(__name__)


class SessionBook:
    """The open direct sessions, by id and by worker."""

    def __init__(self) -> None:
        self.open: dict[str, DirectSession] = {}
        self._by_worker: dict[str, set[str]] = {}
        #: Sessions that ended, so a late copy of their opening does not open them again.
        self._ended: set[str] = set()

    def apply(self, event: SessionEvent, seq: int) -> DirectSession | None:
        """Fold one event; the session's new state, or None when the event changed nothing."""
        state = self.open.get(event.session_id)
        if event.session_id in self._ended or (state is not None and seq <= state.seq):
            return None
        try:
            new = apply_session(state, event, seq)
        except InvalidTransition as exc:
            logger.warning("ignoring %s at seq %d: %s", type(event).__name__, seq, exc.message)
            return None
        if new.closed is not None:
            self.open.pop(new.id, None)
            self._by_worker.get(new.worker_id, set()).discard(new.id)
            self._ended.add(new.id)
        else:
            self.open[new.id] = new
            self._by_worker.setdefault(new.worker_id, set()).add(new.id)
        return new

    def slots(self, worker_id: str) -> int:
        """The slots of `worker_id` its open sessions hold."""
        return len(self._by_worker.get(worker_id, ()))

    def due(self, workers: Mapping[str, TrackedWorker], now: int) -> list[tuple[DirectSession, str]]:
        """The open sessions to end now, with why: their worker gone or draining, or their time up."""
        out = []
        for session in self.open.values():
            worker = workers.get(session.worker_id)
            if worker is None or worker.gone:
                out.append((session, "worker_lost"))
            elif worker.draining:
                out.append((session, "worker_draining"))
            elif session.expires_at_ms <= now:
                out.append((session, "expired"))
        return out


class DirectSessions:
    """The leader's direct-session duties: place new sessions, end finished ones."""

    def __init__(
        self,
        nc: NatsClient,
        view: SchedulerView,
        *,
        latencies: Callable[[], LatencyTable],
        leading: Callable[[], bool],
        ready: Callable[[], bool],
        placing: asyncio.Lock,
        rng: random.Random,
        slot_freed: Callable[[], None],
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._view = view
        self._latencies = latencies
        self._leading = leading
        self._ready = ready
        self._placing = placing
        self._rng = rng
        self._slot_freed = slot_freed
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Sessions being ended now (one task each).
        self._ending: set[str] = set()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(subjects.SCHED_DIRECT_OPEN, cb=self._on_open)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        await cancel_and_wait(*self._tasks)

    def on_event(self, msg: Msg, seq: int, stored_at_us: int) -> None:
        """A message of the SESSIONS stream (every instance folds it), stored at `seq`."""
        closed = self._apply(session_event_decoder.decode(msg.data), seq)
        if closed:
            self._slot_freed()

    def _apply(self, event: SessionEvent, seq: int) -> bool:
        """Fold `event`; whether it freed a slot."""
        new = self._view.sessions.apply(event, seq)
        return new is not None and new.closed is not None

    # --- Opening ------------------------------------------------------------------------------------

    async def _on_open(self, msg: Msg) -> None:
        if not self._leading() or not msg.reply:
            return  # a standby stays silent: the leader answers
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        headers = None
        try:
            reply = msgspec.json.encode(await self.open(decode(msg.data, PlaceSession)))
        except PlatformError as exc:
            reply, headers = error_reply(exc)
        try:
            await self._nc.publish(msg.reply, reply, headers=headers)
        except nats.errors.Error as exc:  # the gateway times out and answers 503; the session stays logged
            logger.warning("direct session: the answer to %s was not sent: %s", msg.subject, exc)

    async def open(self, place: PlaceSession) -> SessionPlaced:
        """Choose the session's worker as a job's would be, log the opening and count its slot."""
        if not self._ready():
            raise Unavailable("the scheduler is still reading the streams; retry", {"retry_after_s": 1})
        req = place.request
        job = Job(
            id=place.session_id, type=req.type, model=req.model, params={}, region=req.region, priority=0,
            max_attempts=1, timeout_s=req.ttl_s, owner=place.owner, region_policy=req.region_policy,
            max_latency_ms=req.max_latency_ms,
        )
        # Under the lock of `_place`: no job is being given a slot this decision also counts as free.
        async with self._placing:
            candidates = self._view.candidates()
            latencies = self._latencies()
            chosen = choose_worker(job, candidates.values(), draw=self._rng.random(), latencies=latencies)
            if isinstance(chosen, NoPlacement):
                able, reasons = explain(job, candidates.values(), latencies)
                top = f"; most are {reasons[0].reason} ({reasons[0].workers})" if reasons else ""
                raise NoWorkerAvailable(
                    f"no worker can take a direct {req.type} session now ({len(candidates)} workers{top})",
                    {"able_workers": able, "reasons": msgspec.to_builtins(reasons)},
                )
            expires_at_ms = now_ms() + int(req.ttl_s * 1000)
            event = DirectSessionOpened(
                session_id=place.session_id, owner=place.owner, worker_id=chosen.worker_id, region=chosen.region,
                job_type=req.type, model=req.model, expires_at_ms=expires_at_ms,
                rank=describe_rank(job, candidates[chosen.worker_id], chosen.distance_ms),
            )
            ack = await append(self._js, subjects.session_subject(place.session_id), event, expected_seq=0)
            self._apply(event, ack.seq)
        logger.info("direct session %s -> worker %s (%s)", place.session_id, chosen.worker_id, event.rank)
        return SessionPlaced(worker_id=chosen.worker_id, region=chosen.region, expires_at_ms=expires_at_ms)

    # --- Ending ---------------------------------------------------------------------------------------

    def sweep(self) -> None:
        """End the sessions that are over (the leader, at each sweep), each in a task of its own: asking a
        worker for the usage may take `END_TIMEOUT_S`, which must not hold up placement."""
        for session, reason in self._view.sessions.due(self._view.workers, now_ms()):
            if session.id not in self._ending:
                self._ending.add(session.id)
                task = asyncio.create_task(self._end(session, reason))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _end(self, session: DirectSession, reason: str) -> None:
        try:
            await self._close(session, reason)
        except Exception:  # e.g. NATS away: the next sweep tries again
            logger.exception("direct session %s: ending it failed; retrying at the next sweep", session.id)
        finally:
            self._ending.discard(session.id)

    async def _close(self, session: DirectSession, reason: str) -> None:
        usage = None if reason == "worker_lost" else await end_on_worker(self._nc, session.worker_id, session.id, reason)
        event: DirectSessionClosed = closing(session, reason, usage)
        try:
            ack = await append(self._js, subjects.session_subject(session.id), event, expected_seq=session.seq)
        except WrongLastSequence:
            return  # closed meanwhile (by its owner): the consumer brings that close
        if self._apply(event, ack.seq):
            self._slot_freed()
        logger.info("direct session %s on worker %s ended: %s", session.id, session.worker_id, reason)

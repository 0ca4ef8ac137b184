"""Leader election through a KV lease: one scheduler writes, the others stand by.

The bucket `scheduler-lease` has a TTL (`sdk.log.LEASE_TTL_S`), so the key of a leader that dies vanishes
by itself. The leader creates the key and renews it every `renew_interval_s` with an update at the
revision it last wrote; a standby tries to create it every `retry_interval_s`, so it takes over within
the TTL plus one retry after the leader dies (at once after a clean stop, which deletes the key).

A renewal that fails for any reason (someone else holds the key, NATS did not answer in time) means
stepping down at once: a scheduler that is not sure it leads must not write. Appends at the expected
sequence keep even two schedulers that both believe they lead from both winning a decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from sdk import subjects
from sdk.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


class LeaderLease:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        holder: str,
        renew_interval_s: float = 1.0,
        retry_interval_s: float = 0.5,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._js = js
        self.holder = holder
        self.renew_interval_s = renew_interval_s
        self.retry_interval_s = retry_interval_s
        self._on_change = on_change
        self._kv: KeyValue | None = None
        #: Revision of our lease entry while we lead; None while we stand by.
        self._revision: int | None = None
        self._task: asyncio.Task[None] | None = None
        #: How many times this instance has become leader; lets the service notice a new term.
        self.term = 0

    @property
    def is_leader(self) -> bool:
        return self._revision is not None

    async def start(self) -> None:
        self._kv = await self._js.key_value(subjects.SCHEDULER_LEASE_BUCKET)
        self._task = asyncio.create_task(self._run(self._kv), name=f"lease-{self.holder}")

    async def stop(self) -> None:
        """Stop campaigning; a leader deletes its key so a standby takes over without waiting for the TTL."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        revision = self._revision
        if revision is None or self._kv is None:
            return
        self._step_down("stopped")
        try:
            # At our revision only: never delete a lease someone else has taken since.
            await self._kv.delete(subjects.SCHEDULER_LEASE_KEY, last=revision)
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning("%s: could not release the lease (%s); it expires by itself", self.holder, exc)

    async def _run(self, kv: KeyValue) -> None:
        while True:
            if self.is_leader:
                await asyncio.sleep(self.renew_interval_s)
                await self._renew(kv)
            else:
                await self._acquire(kv)
                if not self.is_leader:
                    await asyncio.sleep(self.retry_interval_s)

    async def _acquire(self, kv: KeyValue) -> None:
        try:
            revision = await asyncio.wait_for(
                kv.create(subjects.SCHEDULER_LEASE_KEY, self.holder.encode()), self.renew_interval_s
            )
        except KeyWrongLastSequenceError:
            return  # another scheduler leads
        except (nats.errors.Error, TimeoutError) as exc:
            logger.debug("%s: lease not acquired: %s", self.holder, exc)
            return
        self._revision = revision
        self.term += 1
        logger.info("%s: became the scheduler leader (term %d)", self.holder, self.term)
        if self._on_change is not None:
            self._on_change(True)

    async def _renew(self, kv: KeyValue) -> None:
        try:
            self._revision = await asyncio.wait_for(
                kv.update(subjects.SCHEDULER_LEASE_KEY, self.holder.encode(), last=self._revision),
                self.renew_interval_s,
            )
        except KeyWrongLastSequenceError:
            self._step_down("another scheduler holds the lease")
        except (nats.errors.Error, TimeoutError) as exc:
            self._step_down(f"renewal failed: {exc!r}")

    def _step_down(self, reason: str) -> None:
        self._revision = None
        logger.info("%s: stepped down as scheduler leader: %s", self.holder, reason)
        if self._on_change is not None:
            self._on_change(False)

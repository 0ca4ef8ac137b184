"""The chaos suite's platform: a local stack run as `gpuctl up` runs it (every component a process, restarted
by a supervisor when it dies), the steady load of jobs, and the choice of what to kill.

Faults (`FAULTS`), each a SIGKILL, the crash a process cannot clean up after:
- `worker`: the worker holding the most jobs (by the read model);
- `scheduler`: the scheduler that holds the leader lease (a standby runs beside it);
- `gateway`, `projections`, `nats`: one gateway, one projections replica, one NATS node (on a cluster,
  `--cluster 3`, one of two gateways, one of two projections replicas, one of three nodes, chosen by the
  round's seed);
- `worker+scheduler`: a worker holding jobs and the scheduler leader at the same instant.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from nats.js.errors import KeyNotFoundError

from sdk import subjects
from sdk.client import Client
from sdk.errors import PlatformError
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.process import Child

logger = logging.getLogger(__name__)

FAULTS = ("worker", "scheduler", "gateway", "projections", "nats", "worker+scheduler")
#: How often the supervisor looks for dead children (as `gpuctl up` does).
SUPERVISE_EVERY_S = 0.5
#: How long the platform may take to be whole again after a round (a worker with torch starts slowly).
WHOLE_TIMEOUT_S = 120.0
#: An SDK call that gets no answer within this long counts as not acknowledged.
SUBMIT_TIMEOUT_S = 5.0
#: How often a probe submits an instant job after a kill, until the platform recovered.
PROBE_EVERY_S = 0.2
#: The most submissions waiting for an answer at once (a dead gateway must not pile them up).
MAX_PENDING_SUBMITS = 64
#: Gateways and projections replicas on a cluster (`--cluster N`): the fault kills one of them.
CLUSTER_REPLICAS = 2


@dataclass
class Victim:
    label: str
    child: Child
    #: The worker's id, for a worker (its jobs are followed until they are taken back).
    worker_id: str | None = None


@dataclass
class Load:
    """A steady stream of jobs, half over HTTP (a 201), half over NATS (a reply): echo jobs that sleep a
    little, and a few LLM jobs with the tiny model. Only submissions answered with an id count."""

    http: HttpClient
    client: Client
    rng: random.Random
    rate_per_s: float
    llm_model: str | None
    acknowledged: list[str] = field(default_factory=list)
    refused: int = 0
    _probes: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        pending: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_PENDING_SUBMITS)
        n = 0
        while not stop.is_set():
            n += 1
            await slots.acquire()
            task = asyncio.create_task(self._submit(n, slots))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(1 / self.rate_per_s)
        await asyncio.gather(*pending)

    async def probe(self, stop: asyncio.Event) -> None:
        """After a kill: one instant job (an echo without sleep) every `PROBE_EVERY_S`, so the time until
        the platform completes one again is not hidden by the wait for the next such job in the load."""
        n = 0
        while not stop.is_set():
            n += 1
            via: HttpClient | Client = self.http if n % 2 else self.client
            task = asyncio.create_task(self._acknowledge(via, "echo", None, {"probe": n}))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
            await asyncio.sleep(PROBE_EVERY_S)
        await asyncio.gather(*self._probes)

    async def _submit(self, n: int, slots: asyncio.Semaphore) -> None:
        # Every draw happens before the first await: the same seed gives the same jobs in the same order.
        via: HttpClient | Client = self.http if self.rng.random() < 0.5 else self.client
        if self.llm_model is not None and self.rng.random() < 0.08:
            kind, model, params = "llm", self.llm_model, {"prompt": "chaos", "max_new_tokens": 8, "seed": n}
        else:
            kind, model, params = "echo", None, {"n": n, "sleep_s": self.rng.choice((0.0, 0.0, 0.2, 0.5, 1.0))}
        try:
            await self._acknowledge(via, kind, model, params)
        finally:
            slots.release()

    async def _acknowledge(self, via: HttpClient | Client, kind: str, model: str | None, params: dict[str, Any]) -> None:
        try:
            submitted = await asyncio.wait_for(via.submit(kind, model=model, params=params), SUBMIT_TIMEOUT_S)
            self.acknowledged.append(submitted.id)
        except (PlatformError, nats.errors.Error, OSError, TimeoutError) as exc:
            # Not acknowledged, so nothing was promised (the checker holds the platform to acknowledged jobs).
            self.refused += 1
            logger.debug("submission not acknowledged: %r", exc)


class ChaosPlatform:
    """The stack, its supervisor, and operator connections to it (HTTP and NATS)."""

    def __init__(self, stack: LocalStack, workers: dict[str, str]) -> None:
        self.stack = stack
        #: Worker name -> its engines.
        self.workers = workers
        self.http: HttpClient | None = None
        self.client: Client | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, data_dir: Path, workers: dict[str, str], heartbeat_interval_s: float, cluster: int = 1
    ) -> ChaosPlatform:
        """A scheduler leader and a hot standby, and `workers` (name -> engines); on one NATS server one
        gateway and one projections, on a `cluster` of nodes two of each (`CLUSTER_REPLICAS`), as
        `gpuctl up --cluster N --gateways 2 --projections 2` runs them. Children are spawned from this (the
        main) thread, as gpuctl does: a child dies with its thread."""
        replicas = CLUSTER_REPLICAS if cluster > 1 else 1
        stack = LocalStack(data_dir, cluster=cluster, gateways=replicas, projections=replicas, schedulers=2)
        stack.start()
        platform = cls(stack, workers)
        try:
            platform.http = HttpClient(stack.http_url, api_key=stack.operator_key)
            platform.client = await Client.connect(stack.nats_url, api_key=stack.operator_key, timeout_s=SUBMIT_TIMEOUT_S)
            await platform.http.set_config_defaults({"heartbeat_interval_s": heartbeat_interval_s})
            for name, engines in workers.items():
                stack.start_worker(name, "local", "--engines", engines)
            platform._supervisor = asyncio.create_task(platform._supervise())
            await platform.whole()
        except BaseException:
            await platform.stop()
            raise
        return platform

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        if self.http is not None:
            await self.http.close()
        self.stack.stop()

    async def _supervise(self) -> None:
        """What `gpuctl up` does between screen refreshes: start again whatever died."""
        while True:
            self.stack.restart_crashed()
            await asyncio.sleep(SUPERVISE_EVERY_S)

    async def whole(self, timeout_s: float = WHOLE_TIMEOUT_S) -> None:
        """Wait until every child runs, the gateway answers, a scheduler leads and every worker is online."""
        deadline = time.monotonic() + timeout_s
        while not await self._is_whole():
            if time.monotonic() > deadline:
                states = {name: child.state for name, child in self.stack.children.items()}
                raise RuntimeError(f"the platform is not whole after {timeout_s:g}s: {states}")
            await asyncio.sleep(0.25)

    async def _is_whole(self) -> bool:
        assert self.http is not None
        if not all(child.running for child in self.stack.children.values()):
            return False
        try:
            if (await self.http.health())["status"] != "ok" or await self.leader() is None:
                return False
            online = {w.name for w in await self.http.workers(status="online") if w.last_heartbeat}
        except (PlatformError, nats.errors.Error, OSError, TimeoutError):
            return False
        return online >= set(self.workers)

    async def leader(self) -> Child | None:
        """The scheduler child that holds the lease now."""
        assert self.client is not None
        try:
            kv = await self.client.nc.jetstream().key_value(subjects.SCHEDULER_LEASE_BUCKET)
            entry = await kv.get(subjects.SCHEDULER_LEASE_KEY)
        except (KeyNotFoundError, nats.errors.Error, TimeoutError):
            return None
        holder = (entry.value or b"").decode()
        # A scheduler's lease id is its instance id: its child's name, or by default `<host>-<pid>`.
        return next(
            (c for c in self._children("scheduler")
             if holder == c.name or (c.process is not None and holder.endswith(f"-{c.process.pid}"))),
            None,
        )

    def _children(self, prefix: str) -> list[Child]:
        return [child for name, child in self.stack.children.items() if name.startswith(prefix)]

    async def victims(self, fault: str, rng: random.Random) -> list[Victim]:
        """What to kill for `fault`; random choices come from `rng` (the round's seed)."""
        chosen: list[Victim] = []
        for part in fault.split("+"):
            match part:
                case "worker":
                    chosen.append(await self._busiest_worker(rng))
                case "scheduler":
                    leader = await self.leader()
                    if leader is None:
                        raise RuntimeError("no scheduler holds the lease")
                    chosen.append(Victim(f"{leader.name} (leader)", leader))
                case "gateway" | "projections" | "nats":
                    child = rng.choice(sorted(self._children(part), key=lambda c: c.name))
                    chosen.append(Victim(child.name, child))
                case _:
                    raise ValueError(f"unknown fault {part!r}; choose from {', '.join(FAULTS)}")
        return chosen

    async def _busiest_worker(self, rng: random.Random) -> Victim:
        assert self.http is not None
        workers = sorted(await self.http.workers(status="online"), key=lambda w: w.name)
        most = max(len(w.in_flight) for w in workers)
        worker = rng.choice([w for w in workers if len(w.in_flight) == most])
        return Victim(f"worker {worker.name} ({most} jobs)", self.stack.children[f"worker-{worker.name}"], worker.id)


def kill(victims: Sequence[Victim]) -> float:
    """SIGKILL every victim at once; returns when (epoch seconds, the broker's clock on this machine)."""
    killed_at_s = time.time()
    for victim in victims:
        victim.child.kill()
        logger.info("killed %s", victim.label)
    return killed_at_s

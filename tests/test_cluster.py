"""The platform on a 3-node NATS cluster with replicated services (`gpuctl up --cluster 3 --gateways 2
--projections 2`, two schedulers), each replicated service losing one process to SIGKILL while it works:
the survivors answer, and nothing acknowledged is lost.

One stack for the module (starting it is the slow part); each test kills a process of a different service,
so the service it kills is whole when it starts, and what earlier tests killed leaves survivors that serve it:
the tests pass in any order (checked in reverse)."""

from __future__ import annotations

import asyncio
import collections
import json
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sdk import subjects
from sdk.api import Accepted
from sdk.broker import NatsCluster
from sdk.connection import connect
from sdk.errors import PlatformError
from sdk.events import event_type
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import LEASE_TTL_S
from sdk.migrate import send_chunk
from tests.conftest import running_stack, wait_until

pytestmark = pytest.mark.slow

#: Every stream and bucket the platform makes (`sdk.log.ensure_streams`), as JetStream names them.
PLATFORM_STREAMS = [
    subjects.JOBS_STREAM, subjects.WORKERS_STREAM, subjects.SESSIONS_STREAM, subjects.HEARTBEATS_STREAM,
    subjects.DISPATCH_STREAM,
    f"KV_{subjects.WORKER_CONFIG_BUCKET}", f"KV_{subjects.SCHEDULER_LEASE_BUCKET}", f"KV_{subjects.AUTH_BUCKET}",
    f"KV_{subjects.PLATFORM_CONFIG_BUCKET}", f"KV_{subjects.WEBHOOKS_BUCKET}", f"OBJ_{subjects.RESULTS_BUCKET}",
]


async def test_a_single_node_data_dir_moves_into_a_new_cluster_with_its_history(tmp_path: Path) -> None:
    single = LocalStack(tmp_path)
    single.start()
    try:
        async with HttpClient(single.http_url, api_key=single.operator_key) as client:
            # No worker: the job waits in the log for one.
            accepted = await client.submit("echo", params={"from": "one node"})
            key = await client.create_api_key("alice")
    finally:
        single.stop()

    grown = LocalStack(tmp_path, cluster=3)
    grown.start()
    try:
        nc = await connect(grown.nats_url, name="test-cluster")
        try:
            jobs = await nc.jetstream().stream_info(subjects.JOBS_STREAM)
        finally:
            await nc.close()
        assert jobs.config.num_replicas == 3
        # The same sequence numbers (a client's `min_seq` still means the same write), the same keys.
        async with HttpClient(grown.http_url, api_key=key.api_key) as alice:
            assert [job.id for job in (await alice.list()).items] == []
        async with HttpClient(grown.http_url, api_key=grown.operator_key) as client:
            view = await client.get(accepted.id, min_seq=accepted.seq)
            assert (view.status, view.params) == ("queued", {"from": "one node"})
            assert [event_type(record.event) for record in await client.events(accepted.id)] == ["job.submitted"]
    finally:
        grown.stop()


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with running_stack(tmp_path_factory.mktemp("cluster"), ["w1"], cluster=3, gateways=2, projections=2) as stack:
        yield stack


@pytest.fixture
async def http(cluster: LocalStack) -> AsyncIterator[HttpClient]:
    async with HttpClient(cluster.http_url, api_key=cluster.operator_key) as client:
        yield client


class Load:
    """Submits short echo jobs over HTTP one after another; keeps every acknowledged submission and the
    times at which a submission was refused or failed."""

    def __init__(self, http: HttpClient) -> None:
        self.http = http
        self.acked: list[tuple[float, Accepted]] = []
        self.refused: list[tuple[float, str]] = []
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        while not self.stopping.is_set():
            try:
                accepted = await self.http.submit("echo", params={"n": len(self.acked), "sleep_s": 0.1})
                self.acked.append((time.monotonic(), accepted))
            except PlatformError as exc:
                self.refused.append((time.monotonic(), exc.code))
                await asyncio.sleep(0.1)

    def acked_after(self, at: float) -> int:
        return sum(1 for when, _ in self.acked if when > at)


async def test_every_stream_and_bucket_has_three_replicas(cluster: LocalStack) -> None:
    nc = await connect(cluster.nats_url, name="test-cluster")
    try:
        infos = [await nc.jetstream().stream_info(name) for name in PLATFORM_STREAMS]
    finally:
        await nc.close()
    assert {info.config.name: info.config.num_replicas for info in infos} == dict.fromkeys(PLATFORM_STREAMS, 3)
    # Every copy is on its own node.
    assert all(len({info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}) == 3 for info in infos)


async def test_killed_gateway_leaves_the_port_answering(cluster: LocalStack, http: HttpClient) -> None:
    gateways = cluster.replicas_of("gateway")
    assert len(gateways) == 2
    gateways[1].kill()
    # New connections, each of which the kernel may hand to either socket: only the survivor's is left.
    for _ in range(20):
        async with httpx.AsyncClient() as fresh:
            assert (await fresh.get(f"{cluster.http_url}/health")).status_code == 200
    async with HttpClient(cluster.http_url, api_key=cluster.operator_key) as client:
        accepted = await client.submit("echo", params={"after": "gateway"})
        assert (await client.wait(accepted.id, timeout_s=60)).result == {"after": "gateway"}


async def test_killed_projections_replica_leaves_reads_answering(cluster: LocalStack, http: HttpClient) -> None:
    accepted = await http.submit("echo", params={"after": "projections"})
    replicas = cluster.replicas_of("projections")
    assert len(replicas) == 2
    replicas[1].kill()
    # Reads go through `proj.>`: the queue group has one member left, which still waits for `min_seq`.
    for _ in range(10):
        view = await http.get(accepted.id, min_seq=accepted.seq)
        assert view.id == accepted.id
    assert (await http.wait(accepted.id, timeout_s=60)).status == "completed"
    assert accepted.id in [job.id for job in (await http.list(limit=20)).items]


async def test_killed_scheduler_leader_is_replaced_by_the_standby(cluster: LocalStack, http: HttpClient) -> None:
    leader = await cluster.leader()
    assert leader is not None and leader.name in {"scheduler", "scheduler-2"}
    standby = next(child for child in cluster.replicas_of("scheduler") if child is not leader)
    leader.kill()

    async def standby_leads() -> bool:
        return await cluster.leader() is standby

    # The dead leader's key expires with the bucket's TTL; the standby tries every half second.
    await wait_until(standby_leads, LEASE_TTL_S + 10, "the standby to take the lease")
    accepted = await http.submit("echo", params={"after": "scheduler"})
    assert (await http.wait(accepted.id, timeout_s=60)).result == {"after": "scheduler"}


async def test_killed_nats_node_mid_load_loses_no_acknowledged_job(cluster: LocalStack, http: HttpClient) -> None:
    load = Load(http)
    running = asyncio.create_task(load.run())
    try:
        await wait_until(lambda: _true(len(load.acked) >= 10), 60, "10 submissions before the kill")
        # The node that leads JOBS: its loss forces an election where every submission is written.
        nc = await connect(cluster.nats_url, name="test-cluster")
        try:
            leader = (await nc.jetstream().stream_info(subjects.JOBS_STREAM)).cluster.leader
        finally:
            await nc.close()
        victim = next(b for b in cluster.brokers if b.cluster is not None and b.cluster.server_name == leader)
        victim.kill()
        killed_at = time.monotonic()
        await wait_until(lambda: _true(load.acked_after(killed_at) >= 20), 60, "20 submissions after the kill")
    finally:
        load.stopping.set()
        await running
    times = [when for when, _ in load.acked]
    longest_pause = max(later - earlier for earlier, later in zip(times, times[1:], strict=False))
    print(f"NATS node {leader} killed: {len(load.acked)} jobs acknowledged, refused: "
          f"{collections.Counter(code for _, code in load.refused)}, longest pause {longest_pause:.2f}s")
    assert longest_pause < 30
    # What a client saw while the streams failed over: "try again" (503), never an internal error.
    assert {code for _, code in load.refused} <= {"unavailable", "timeout"}

    # Every acknowledged job is in the log and completes exactly once.
    ids = [accepted.id for _, accepted in load.acked]
    done = await asyncio.gather(*(http.wait(job_id, timeout_s=90) for job_id in ids))
    assert [job.status for job in done] == ["completed"] * len(ids)
    histories = await asyncio.gather(*(http.events(job_id) for job_id in ids))
    completions = collections.Counter(
        sum(1 for record in history if event_type(record.event) == "job.completed") for history in histories
    )
    assert completions == {1: len(ids)}


async def _true(value: bool) -> bool:
    return value


async def test_a_restore_chunk_waits_for_the_restoring_nodes_interest(nc: NatsClient) -> None:
    """The restoring node subscribes as the restore starts, and its interest reaches the client's node a
    moment later: a chunk sent before then found no responder, which aborted a move under load."""
    subject = nc.new_inbox()

    async def respond(msg: Msg) -> None:
        await msg.respond(b"{}")

    async def responder_comes_late() -> None:
        await asyncio.sleep(0.3)
        await nc.subscribe(subject, cb=respond)

    late = asyncio.create_task(responder_comes_late())
    answer = await send_chunk(nc, subject, b"chunk", 5)
    await late
    assert answer.data == b"{}"


def test_single_node_stays_the_default(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    assert [b.name for b in stack.brokers] == ["nats-server"] and stack.brokers[0].cluster is None
    assert stack.replicas == 1 and stack.counts == {"gateway": 1, "projections": 1, "scheduler": 1}


async def test_the_nodes_route_to_each_other_over_tls_verified_both_ways(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    # `start()` returns once a stream can be placed on all three nodes: every route is up, over TLS.
    with NatsCluster(tmp_path / "nodes", 3, secrets_dir=secrets_dir, log_dir=tmp_path / "logs", route_tls=True) as nodes:
        nc = await connect(nodes.url_as("system"), name="test-cluster-tls")
        try:
            varz = await _from_every_server(nc, "$SYS.REQ.SERVER.PING.VARZ", 3)
            routez = await _from_every_server(nc, "$SYS.REQ.SERVER.PING.ROUTEZ", 3)
        finally:
            await nc.close()
    assert [(v["cluster"].get("tls_required"), v["cluster"].get("tls_verify")) for v in varz] == [(True, True)] * 3
    assert [r["num_routes"] >= 2 for r in routez] == [True] * 3
    # The CA's and the nodes' keys are the owner's alone.
    keys = sorted((secrets_dir / "route-tls").glob("*.key"))
    assert [k.name for k in keys] == ["ca.key", "gf-1.key", "gf-2.key", "gf-3.key"]
    assert {stat.S_IMODE(k.stat().st_mode) for k in keys} == {0o600}


async def _from_every_server(nc: NatsClient, subject: str, servers: int) -> list[dict[str, object]]:
    """The `data` of each server's answer to a system request that every server answers."""
    inbox = nc.new_inbox()
    answers = await nc.subscribe(inbox)
    await nc.publish(subject, b"{}", reply=inbox)
    try:
        return [json.loads((await answers.next_msg(timeout=10)).data)["data"] for _ in range(servers)]
    finally:
        await answers.unsubscribe()

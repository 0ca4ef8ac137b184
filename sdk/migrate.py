"""Moving a single server's streams into a cluster, sequence numbers, headers, timestamps and durable
consumers included: a JetStream snapshot of each stream from the old server, restored into the cluster
with the cluster's replicas.

Why not start the old store as a cluster node: a clustered server that finds streams in its store which
the cluster's metadata does not know deletes them as orphans. And why not copy message by message: the
copy would renumber the log, and the read models, the webhook consumer and every `seq` a client holds
point into it by number.

`gpuctl up --cluster N` runs `move_streams` by itself when the data dir has a single server's store
(`<data_dir>/nats`) and the cluster does not have the platform's streams yet; the old store is left in
place, untouched, until the operator deletes it. Memory streams (DISPATCH) cannot be snapshotted and
need not be: they are derived, and the scheduler re-dispatches from JOBS.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

logger = logging.getLogger(__name__)

#: The size of the pieces a snapshot travels in, both ways.
CHUNK_BYTES = 128 * 1024
#: How long the old server may take to send a whole snapshot, and the cluster to restore one.
TRANSFER_TIMEOUT_S = 300.0
API_TIMEOUT_S = 10.0
#: How long a restore's chunks wait for the restoring node's interest to reach this client's node.
INTEREST_WAIT_S = 10.0


class MigrationError(RuntimeError):
    """JetStream refused a step of the move; the message says which stream and why."""


async def move_streams(source: NatsClient, target: NatsClient, replicas: int) -> list[str]:
    """Copy every file-backed stream of `source` that `target` lacks into `target` with `replicas` copies;
    returns the names moved. A stream `target` already has is left alone (a second run moves nothing)."""
    present = set(await _stream_names(target))
    moved = []
    for name in await _stream_names(source):
        if name in present:
            logger.info("stream %s is already in the cluster; not moved", name)
            continue
        meta, data = await snapshot(source, name)
        if meta["config"].get("storage") == "memory":
            continue
        meta["config"]["num_replicas"] = replicas
        await restore(target, meta, data)
        logger.info("moved stream %s (%d messages, %d bytes) with %d replicas",
                    name, meta["state"].get("messages", 0), len(data), replicas)
        moved.append(name)
    return moved


async def snapshot(nc: NatsClient, stream: str) -> tuple[dict[str, Any], bytes]:
    """The stream's config and state, and its snapshot (an s2-compressed tar) as one byte string. A memory
    stream has no snapshot: its data is empty and its config says `storage: memory`."""
    info = await _api(nc, f"$JS.API.STREAM.INFO.{stream}", {})
    if info["config"].get("storage") == "memory":
        return {"config": info["config"], "state": info["state"]}, b""
    chunks: list[bytes] = []
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_chunk(msg: Msg) -> None:
        if not msg.data:  # the end: `204 EOF`, or an error status
            status = (msg.headers or {}).get("Status", "204")
            if not finished.done():
                if "204" in status:
                    finished.set_result(None)
                else:
                    finished.set_exception(MigrationError(f"snapshot of {stream} failed: {status} {msg.headers}"))
            return
        chunks.append(msg.data)
        if msg.reply:
            await nc.publish(msg.reply, b"")  # flow control: the server sends the next chunks once acked

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_chunk, pending_msgs_limit=-1, pending_bytes_limit=-1)
    try:
        reply = await _api(nc, f"$JS.API.STREAM.SNAPSHOT.{stream}", {"deliver_subject": inbox, "chunk_size": CHUNK_BYTES})
        await asyncio.wait_for(finished, TRANSFER_TIMEOUT_S)
    finally:
        await sub.unsubscribe()
    return {"config": reply["config"], "state": reply["state"]}, b"".join(chunks)


async def restore(nc: NatsClient, meta: dict[str, Any], data: bytes) -> None:
    """Create the stream `meta` describes from its snapshot `data`."""
    name = meta["config"]["name"]
    reply = await _api(nc, f"$JS.API.STREAM.RESTORE.{name}", meta)
    for start in range(0, len(data), CHUNK_BYTES):
        ack = await send_chunk(nc, reply["deliver_subject"], data[start:start + CHUNK_BYTES], API_TIMEOUT_S)
        _check(ack.data, f"restore of {name}")
    done = await send_chunk(nc, reply["deliver_subject"], b"", TRANSFER_TIMEOUT_S)
    _check(done.data, f"restore of {name}")


async def send_chunk(nc: NatsClient, subject: str, chunk: bytes, timeout_s: float) -> Msg:
    """A request to the node that restores: its subscription is made on that node as the restore starts,
    and reaches the node this client is on a moment later (routes tell each other of new interest
    asynchronously; on a loaded machine the first chunk found no responder). Nobody received a chunk
    that found no responder, so it is sent again, for up to `INTEREST_WAIT_S`."""
    deadline = asyncio.get_running_loop().time() + INTEREST_WAIT_S
    while True:
        try:
            return await nc.request(subject, chunk, timeout=timeout_s)
        except NoRespondersError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _stream_names(nc: NatsClient) -> list[str]:
    names: list[str] = []
    while True:
        page = await _api(nc, "$JS.API.STREAM.NAMES", {"offset": len(names)})
        names += page.get("streams") or []
        if len(names) >= page.get("total", 0) or not page.get("streams"):
            return names


async def _api(nc: NatsClient, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=API_TIMEOUT_S)
    return _check(reply.data, subject)


def _check(data: bytes, what: str) -> dict[str, Any]:
    """The decoded JetStream answer; `MigrationError` when it is an error."""
    answer: dict[str, Any] = json.loads(data) if data else {}
    if error := answer.get("error"):
        raise MigrationError(f"{what}: {error.get('description')} (err_code {error.get('err_code')})")
    return answer

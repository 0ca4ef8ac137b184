"""`sdk.stream_reader`: whole streams read in order through our own protocol parser, on a real server,
with and without headers, from a start sequence to a target, over TLS, and without leaving a consumer behind."""

from __future__ import annotations

import contextlib
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.js import api as js_api

from sdk.broker import EmbeddedNats
from sdk.certs import NodeCertificate
from sdk.connection import connect
from sdk.stream_reader import Delivered, read_stream
from sdk.tls import client_context
from tests.test_tls import certificate  # noqa: F401 (the fixture)

STREAM = "READER_TEST"


async def filled_stream(nc: NatsClient, count: int) -> list[tuple[int, bytes]]:
    """A stream of `count` messages on two subjects, every third one with headers and one empty:
    the `(seq, data)` that was stored."""
    js = nc.jetstream()
    await js.add_stream(js_api.StreamConfig(name=STREAM, subjects=["reader.*"], storage=js_api.StorageType.MEMORY))
    stored = []
    for n in range(count):
        data = b"" if n == 5 else f'{{"n": {n}, "text": "{"x" * (n % 50)}"}}'.encode()
        headers = {"Gf-Event-Type": "test", "Nats-Msg-Id": f"m-{n}"} if n % 3 == 0 else None
        ack = await js.publish(f"reader.{n % 2}", data, headers=headers)
        stored.append((ack.seq, data))
    return stored


async def read_all(nc: NatsClient, last_seq: int, **options: int) -> list[Delivered]:
    out: list[Delivered] = []
    async with contextlib.aclosing(read_stream(nc, STREAM, last_seq, **options)) as batches:
        async for batch in batches:
            assert batch, "an empty batch was yielded"
            out.extend(batch)
    return out


async def test_reads_every_message_in_order_across_many_small_batches(fresh_nats: EmbeddedNats) -> None:
    nc = await connect(fresh_nats.url, name="test-reader")
    try:
        stored = await filled_stream(nc, 250)
        read = await read_all(nc, stored[-1][0], batch=7)
        assert [(d.seq, d.data) for d in read] == stored
        assert {d.stream for d in read} == {STREAM}
        assert [d.pending for d in read] == list(range(249, -1, -1))
        # The reader's consumer is gone once it has read.
        assert await nc.jetstream().consumers_info(STREAM) == []
    finally:
        await nc.close()


async def test_reads_from_a_start_sequence_up_to_a_target_only(fresh_nats: EmbeddedNats) -> None:
    nc = await connect(fresh_nats.url, name="test-reader")
    try:
        stored = await filled_stream(nc, 40)
        read = await read_all(nc, 30, first_seq=11, batch=4)
        assert [(d.seq, d.data) for d in read] == stored[10:30]
        assert await read_all(nc, 9, first_seq=10) == []
    finally:
        await nc.close()


async def test_a_target_past_the_end_stops_at_the_end_and_removed_messages_are_skipped(
    fresh_nats: EmbeddedNats,
) -> None:
    nc = await connect(fresh_nats.url, name="test-reader")
    try:
        stored = await filled_stream(nc, 20)
        await nc.jetstream().purge_stream(STREAM, keep=8)  # what a stream's limits do to old messages
        read = await read_all(nc, 1_000)
        assert [(d.seq, d.data) for d in read] == stored[12:]
        await nc.jetstream().purge_stream(STREAM)
        assert await read_all(nc, 1_000) == []
    finally:
        await nc.close()


async def test_reads_over_tls_as_the_client_connected(
    tmp_path: Path, certificate: NodeCertificate  # noqa: F811
) -> None:
    with EmbeddedNats(tmp_path / "nats", tls_cert=certificate.cert_file, tls_key=certificate.key_file) as server:
        nc = await connect(server.url, name="test-reader-tls", tls=client_context(certificate.ca_file))
        try:
            stored = await filled_stream(nc, 30)
            assert [(d.seq, d.data) for d in await read_all(nc, stored[-1][0], batch=8)] == stored
        finally:
            await nc.close()


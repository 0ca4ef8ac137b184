"""Worker records mirrored by a KV watch (`gateway.auth.worker_records`): a signed report is verified
without a bucket read, and a revocation still stops a worker at once on the gateway that revokes it and
within moments on every other gateway."""

from __future__ import annotations

import secrets
import time

import pytest
from nats.aio.client import Client as NatsClient

from gateway.auth import Credentials
from sdk import subjects
from sdk.errors import PlatformError, Unauthorized
from sdk.signing import sign
from tests.conftest import wait_until


def _reason(exc: pytest.ExceptionInfo[PlatformError]) -> str:
    assert exc.value.details is not None
    return str(exc.value.details["reason"])


async def _report(credentials: Credentials, worker_id: str, secret_hex: str) -> str:
    subject = subjects.report_subject(worker_id)
    headers = sign(bytes.fromhex(secret_hex), subject, b"{}", now_ms=int(time.time() * 1000))
    return await credentials.verify_report(subject, b"{}", headers)


async def test_a_report_is_verified_from_the_mirror_and_a_revocation_stops_it_everywhere(nc: NatsClient) -> None:
    master_key = secrets.token_bytes(32)
    async with await Credentials.open(nc.jetstream(), master_key) as gateway_a, \
            await Credentials.open(nc.jetstream(), master_key) as gateway_b:
        wid = f"w{secrets.token_hex(6)}"
        creds = await gateway_a.enroll(await gateway_a.create_enrollment_token(), wid)
        secret_hex = creds.hmac_secret_hex
        assert await _report(gateway_a, wid, secret_hex) == wid

        async def b_knows_the_worker() -> bool:
            return gateway_b._worker_records.get(wid) is not None

        await wait_until(b_knows_the_worker, 10, "the other gateway's watch to bring the new worker")
        # Verified from memory: a bucket that cannot be read does not matter any more.
        reads = 0
        load = gateway_b._bucket.load

        async def counting_load(*args: object, **kwargs: object) -> object:
            nonlocal reads
            reads += 1
            return await load(*args, **kwargs)  # type: ignore[arg-type]

        gateway_b._bucket.load = counting_load  # type: ignore[method-assign]
        for _ in range(3):
            assert await _report(gateway_b, wid, secret_hex) == wid
        assert reads == 0

        await gateway_a.revoke_worker(wid)
        # At once on the gateway that revoked it: no watch delivery awaited.
        with pytest.raises(Unauthorized) as exc:
            await _report(gateway_a, wid, secret_hex)
        assert _reason(exc) == "revoked"

        # Within moments on the other one, through its watch.
        async def b_refuses() -> bool:
            try:
                await _report(gateway_b, wid, secret_hex)
            except Unauthorized as refused:
                return refused.details is not None and refused.details["reason"] == "revoked"
            return False

        await wait_until(b_refuses, 5, "the other gateway to refuse the revoked worker")


async def test_a_rotation_is_mirrored_before_the_answer(nc: NatsClient) -> None:
    """A worker that switches to its new secret right after rotating is accepted by the same gateway,
    and its old secret only during the grace period the record says."""
    async with await Credentials.open(nc.jetstream(), secrets.token_bytes(32)) as gateway:
        wid = f"w{secrets.token_hex(6)}"
        first = await gateway.enroll(await gateway.create_enrollment_token(), wid)
        assert await _report(gateway, wid, first.hmac_secret_hex) == wid
        await gateway.request_rotation(wid)
        rotated = (await gateway.rotate_worker(wid)).credentials
        assert await _report(gateway, wid, rotated.hmac_secret_hex) == wid  # promotes the new generation
        mirrored = gateway._worker_records.get(wid)
        assert mirrored is not None and mirrored.value.generation == rotated.generation
        assert mirrored.value.previous_generation == first.generation

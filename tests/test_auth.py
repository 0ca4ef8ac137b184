"""Credentials: API keys, rotating tokens, worker enrollment and rotation, signed reports, and that no
secret ever reaches a log record or the `auth` bucket."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.errors import APIError

from gateway.auth import AuthSettings, Credentials, NonceWindow, Principal, load_or_create_master_key
from sdk import subjects
from sdk.api import WorkerCredentials
from sdk.broker import EmbeddedNats
from sdk.errors import (
    HTTP_STATUS,
    ApiKeyNotFound,
    BadRequest,
    Conflict,
    Forbidden,
    PlatformError,
    Unauthorized,
    WorkerNotFound,
)
from sdk.signing import (
    MAX_SIGNED_BODY_BYTES,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WORKER_ID_HEADER,
    canonical_string,
    sign,
    verify_signature,
)
from tests.conftest import platform_nc, wait_until

START_MS = 1_700_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now_ms = START_MS

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def master_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
async def credentials(nc: NatsClient, master_key: bytes, clock: FakeClock) -> AsyncIterator[Credentials]:
    async with await Credentials.open(nc.jetstream(), master_key, clock=clock) as service:
        yield service


def reason(exc: pytest.ExceptionInfo[PlatformError]) -> str:
    assert exc.value.details is not None
    return str(exc.value.details["reason"])


def worker_id() -> str:
    return f"w{secrets.token_hex(6)}"


# --- Access and refresh tokens -------------------------------------------------------------------


async def test_access_token_verifies_until_it_expires(credentials: Credentials, clock: FakeClock) -> None:
    key_id, api_key = await credentials.create_api_key("ci", "client")
    pair = await credentials.issue_tokens(api_key)
    assert pair.expires_in_s == 900.0
    assert pair.refresh_expires_in_s == 7 * 86400.0

    principal = credentials.verify_access(pair.access_token)
    assert (principal.subject, principal.kind, principal.role) == (key_id, "client", "client")
    assert credentials.verify_authorization(f"Bearer {pair.access_token}") == principal

    clock.advance(15 * 60 - 0.001)
    assert credentials.verify_access(pair.access_token) == principal
    clock.advance(0.001)
    with pytest.raises(Unauthorized) as exc:
        credentials.verify_access(pair.access_token)
    assert reason(exc) == "expired"


async def test_forged_or_garbled_access_tokens_are_refused(
    credentials: Credentials, nc: NatsClient, clock: FakeClock
) -> None:
    _, api_key = await credentials.create_api_key("ci", "operator")
    token = (await credentials.issue_tokens(api_key)).access_token
    payload, mac = token.split(".")
    tampered = f"{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{mac}"
    async with await Credentials.open(nc.jetstream(), secrets.token_bytes(32), clock=clock) as other_platform:
        foreign = other_platform.verify_access
        for bad, expected in [
            (tampered, "bad_signature"),
            (token[:-3], "bad_signature"),
            ("gfa_no-dot", "malformed"),
            ("Bearer-less", "malformed"),
            (token.replace("gfa_", "gfr_"), "malformed"),
        ]:
            with pytest.raises(Unauthorized) as exc:
                credentials.verify_access(bad)
            assert reason(exc) == expected, bad
        with pytest.raises(Unauthorized) as exc:
            foreign(token)
        assert reason(exc) == "bad_signature"
    for header, expected in [(None, "missing_header"), ("", "missing_header"), (token, "malformed")]:
        with pytest.raises(Unauthorized) as exc:
            credentials.verify_authorization(header)
        assert reason(exc) == expected


async def test_refresh_rotates_the_pair(credentials: Credentials, clock: FakeClock) -> None:
    key_id, api_key = await credentials.create_api_key("ci", "client")
    first = await credentials.issue_tokens(api_key)
    clock.advance(60)
    second = await credentials.refresh(first.refresh_token)

    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    new = credentials.verify_access(second.access_token)
    assert new.subject == key_id
    assert new.family == credentials.verify_access(first.access_token).family
    third = await credentials.refresh(second.refresh_token)
    assert credentials.verify_access(third.access_token).subject == key_id


async def test_refresh_reuse_revokes_the_whole_family(
    credentials: Credentials, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    key_id, api_key = await credentials.create_api_key("ci", "client")
    stolen = await credentials.issue_tokens(api_key)
    legit = await credentials.refresh(stolen.refresh_token)
    unrelated = await credentials.issue_tokens(api_key)

    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unauthorized) as exc:
        await credentials.refresh(stolen.refresh_token)
    assert reason(exc) == "reused"

    # The newer pair, held by whoever refreshed first, stops working too.
    for token in (legit.access_token, stolen.access_token):
        with pytest.raises(Unauthorized) as exc:
            credentials.verify_access(token)
        assert reason(exc) == "revoked"
    with pytest.raises(Unauthorized) as exc:
        await credentials.refresh(legit.refresh_token)
    assert reason(exc) == "revoked"
    # Another session of the same key is untouched.
    assert credentials.verify_access(unrelated.access_token).subject == key_id

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "reuse" in r.getMessage()]
    assert len(warnings) == 1
    assert key_id in warnings[0].getMessage()
    assert stolen.refresh_token not in caplog.text
    assert stolen.refresh_token.rsplit(".", 1)[1] not in caplog.text


async def test_concurrent_refreshes_of_one_token_count_as_reuse(credentials: Credentials) -> None:
    _, api_key = await credentials.create_api_key("ci", "client")
    pair = await credentials.issue_tokens(api_key)
    outcomes = await asyncio.gather(
        credentials.refresh(pair.refresh_token), credentials.refresh(pair.refresh_token), return_exceptions=True
    )
    errors = [o for o in outcomes if isinstance(o, Unauthorized)]
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(errors) == 1 and errors[0].details == {"reason": "reused"}
    assert len(winners) == 1
    with pytest.raises(Unauthorized) as exc:
        credentials.verify_access(winners[0].access_token)
    assert reason(exc) == "revoked"


async def test_refresh_token_expires(credentials: Credentials, clock: FakeClock) -> None:
    _, api_key = await credentials.create_api_key("ci", "client")
    pair = await credentials.issue_tokens(api_key)
    clock.advance(7 * 86400)
    with pytest.raises(Unauthorized) as exc:
        await credentials.refresh(pair.refresh_token)
    assert reason(exc) == "expired"


async def test_ttls_are_configurable(nc: NatsClient, master_key: bytes, clock: FakeClock) -> None:
    settings = AuthSettings(access_ttl_s=30, refresh_ttl_s=120)
    async with await Credentials.open(nc.jetstream(), master_key, settings=settings, clock=clock) as service:
        _, api_key = await service.create_api_key("short", "client")
        pair = await service.issue_tokens(api_key)
        assert (pair.expires_in_s, pair.refresh_expires_in_s) == (30.0, 120.0)
        clock.advance(30)
        with pytest.raises(Unauthorized) as exc:
            service.verify_access(pair.access_token)
        assert reason(exc) == "expired"
    with pytest.raises(ValueError, match="positive"):
        Credentials(None, master_key, settings=AuthSettings(access_ttl_s=0))  # type: ignore[arg-type]


# --- API keys ------------------------------------------------------------------------------------


async def test_revoked_api_key_is_refused_with_its_tokens(credentials: Credentials, clock: FakeClock) -> None:
    key_id, api_key = await credentials.create_api_key("laptop", "client")
    pair = await credentials.issue_tokens(api_key)
    clock.advance(1)

    await credentials.revoke_api_key(key_id)

    with pytest.raises(Unauthorized) as exc:
        await credentials.issue_tokens(api_key)
    assert reason(exc) == "revoked"
    assert exc.value.code == "unauthorized"
    with pytest.raises(Unauthorized) as exc:
        credentials.verify_access(pair.access_token)
    assert reason(exc) == "revoked"
    with pytest.raises(Unauthorized) as exc:
        await credentials.refresh(pair.refresh_token)
    assert reason(exc) == "revoked"
    listed = {info.key_id: info for info in await credentials.list_api_keys()}
    assert listed[key_id].name == "laptop"
    assert listed[key_id].revoked_at_ms == clock.now_ms


async def test_wrong_or_unknown_api_keys_are_refused(credentials: Credentials) -> None:
    key_id, api_key = await credentials.create_api_key("ci", "client")
    for bad, expected in [
        (f"gfk_{key_id}.{'x' * 43}", "bad_signature"),
        (f"gfk_{'0' * 16}.{api_key.split('.')[1]}", "unknown"),
        (api_key.replace("gfk_", "gfe_"), "malformed"),
        ("gfk_nodot", "malformed"),
    ]:
        with pytest.raises(Unauthorized) as exc:
            await credentials.issue_tokens(bad)
        assert reason(exc) == expected, bad
    with pytest.raises(BadRequest, match="client, operator"):
        await credentials.create_api_key("root", "admin")  # type: ignore[arg-type]
    # An operator revoking a key that does not exist is told so (404), not refused as a bad request.
    with pytest.raises(ApiKeyNotFound) as missing:
        await credentials.revoke_api_key("0" * 16)
    assert (HTTP_STATUS[missing.value.code], reason(missing)) == (404, "unknown")


async def test_revocation_reaches_other_gateways_through_the_watch(
    credentials: Credentials, nc: NatsClient, master_key: bytes, clock: FakeClock
) -> None:
    key_id, api_key = await credentials.create_api_key("shared", "client")
    pair = await credentials.issue_tokens(api_key)
    async with await Credentials.open(nc.jetstream(), master_key, clock=clock) as replica:
        assert replica.verify_access(pair.access_token).subject == key_id
        await credentials.revoke_api_key(key_id)

        async def refused_there() -> bool:
            try:
                replica.verify_access(pair.access_token)
            except Unauthorized as exc:
                assert exc.details == {"reason": "revoked"}
                return True
            return False

        await wait_until(refused_there, 5, "the replica to see the revocation")


# --- Worker enrollment ---------------------------------------------------------------------------


async def test_enrollment_token_is_single_use(credentials: Credentials) -> None:
    token = await credentials.create_enrollment_token(ttl_s=600)
    wid = worker_id()
    creds = await credentials.enroll(token, wid)
    assert (creds.worker_id, creds.generation) == (wid, 1)
    assert bytes.fromhex(creds.hmac_secret_hex) == await credentials.worker_secret(wid)
    principal = credentials.verify_access(creds.access_token)
    assert (principal.subject, principal.kind, principal.role) == (wid, "worker", "worker")

    with pytest.raises(Unauthorized) as exc:
        await credentials.enroll(token, worker_id())
    assert reason(exc) == "already_used"


async def test_enrollment_token_expires(credentials: Credentials, clock: FakeClock) -> None:
    token = await credentials.create_enrollment_token(ttl_s=60)
    clock.advance(60)
    with pytest.raises(Unauthorized) as exc:
        await credentials.enroll(token, worker_id())
    assert reason(exc) == "expired"


async def test_enrollment_cannot_take_over_an_enrolled_worker(credentials: Credentials, clock: FakeClock) -> None:
    wid = worker_id()
    first = await credentials.enroll(await credentials.create_enrollment_token(), wid)
    with pytest.raises(Conflict, match="already enrolled"):
        await credentials.enroll(await credentials.create_enrollment_token(), wid)
    with pytest.raises(Forbidden) as exc:
        await credentials.enroll(await credentials.create_enrollment_token(worker_id=wid), worker_id())
    assert reason(exc) == "worker_mismatch"
    with pytest.raises(BadRequest):
        await credentials.enroll(await credentials.create_enrollment_token(), "bad.id")

    # An operator re-enrolls a machine that lost its credentials: a new generation, the old one is dead.
    clock.advance(1)
    again = await credentials.enroll(await credentials.create_enrollment_token(worker_id=wid), wid)
    assert again.generation == 2
    with pytest.raises(Unauthorized) as exc:
        credentials.verify_access(first.access_token)
    assert reason(exc) == "revoked"
    body = b"{}"
    subject = subjects.report_subject(wid)
    old = sign(bytes.fromhex(first.hmac_secret_hex), subject, body, now_ms=clock.now_ms)
    with pytest.raises(Unauthorized) as exc:
        await credentials.verify_report(subject, body, old)
    assert reason(exc) == "bad_signature"


# --- Signed reports ------------------------------------------------------------------------------


async def test_signed_report_is_accepted_once(credentials: Credentials, clock: FakeClock) -> None:
    wid = worker_id()
    creds = await credentials.enroll(await credentials.create_enrollment_token(), wid)
    subject, body = subjects.report_subject(wid), b'{"kind":"started","job_id":"j1","attempt":1}'
    headers = sign(bytes.fromhex(creds.hmac_secret_hex), subject, body, now_ms=clock.now_ms)
    assert headers[WORKER_ID_HEADER] == wid

    assert await credentials.verify_report(subject, body, headers) == wid
    beat_subject = subjects.heartbeat_request_subject(wid)
    beat = sign(bytes.fromhex(creds.hmac_secret_hex), beat_subject, b"{}", now_ms=clock.now_ms)
    assert await credentials.verify_report(beat_subject, b"{}", beat) == wid


async def test_bad_reports_are_refused_with_distinct_reasons(credentials: Credentials, clock: FakeClock) -> None:
    wid = worker_id()
    creds = await credentials.enroll(await credentials.create_enrollment_token(), wid)
    secret = bytes.fromhex(creds.hmac_secret_hex)
    subject, body = subjects.report_subject(wid), b'{"kind":"draining"}'
    now = clock.now_ms

    replayed = sign(secret, subject, body, now_ms=now)
    await credentials.verify_report(subject, body, replayed)
    other = worker_id()
    await credentials.enroll(await credentials.create_enrollment_token(), other)

    cases: list[tuple[str, dict[str, str], bytes, type[PlatformError], str]] = [
        (subject, sign(secrets.token_bytes(32), subject, body, now_ms=now), body, Unauthorized, "bad_signature"),
        (subject, sign(secret, subject, body, now_ms=now), b'{"kind":"started"}', Unauthorized, "bad_signature"),
        (subject, replayed, body, Unauthorized, "replayed_nonce"),
        (subject, sign(secret, subject, body, now_ms=now - 60_001), body, Unauthorized, "stale_timestamp"),
        (subject, sign(secret, subject, body, now_ms=now + 60_001), body, Unauthorized, "stale_timestamp"),
        # Signed correctly, but claiming to be another worker than the subject names.
        (subject, sign(secret, subject, body, worker_id=other, now_ms=now), body, Forbidden, "worker_mismatch"),
        (
            subjects.report_subject(other),
            sign(secret, subjects.report_subject(other), body, worker_id=wid, now_ms=now),
            body,
            Forbidden,
            "worker_mismatch",
        ),
        (
            subjects.report_subject("nobody"),
            sign(secret, subjects.report_subject("nobody"), body, now_ms=now),
            body,
            Unauthorized,
            "unknown",
        ),
        (subject, {}, body, Unauthorized, "missing_header"),
        (subject, {**replayed, TIMESTAMP_HEADER: "soon"}, body, Unauthorized, "malformed"),
    ]
    for subj, headers, payload, error, expected in cases:
        with pytest.raises(error) as exc:
            await credentials.verify_report(subj, payload, headers)
        assert reason(exc) == expected, (subj, headers, expected)

    # The window's edge is inclusive.
    edge = sign(secret, subject, body, now_ms=now - 60_000)
    assert await credentials.verify_report(subject, body, edge) == wid


async def test_revoked_worker_is_refused(credentials: Credentials, clock: FakeClock) -> None:
    wid = worker_id()
    creds = await credentials.enroll(await credentials.create_enrollment_token(), wid)
    await credentials.revoke_worker(wid)
    subject = subjects.report_subject(wid)
    headers = sign(bytes.fromhex(creds.hmac_secret_hex), subject, b"{}", now_ms=clock.now_ms)
    with pytest.raises(Unauthorized) as exc:
        await credentials.verify_report(subject, b"{}", headers)
    assert reason(exc) == "revoked"
    for check in (credentials.worker_secret(wid), credentials.refresh(creds.refresh_token)):
        with pytest.raises(Unauthorized) as exc:
            await check
        assert reason(exc) == "revoked"
    with pytest.raises(Unauthorized) as exc:
        credentials.verify_access(creds.access_token)
    assert reason(exc) == "revoked"
    # The operator's actions on a worker that is not there (or no longer may be) say so: 404, 409; never
    # the 401 of a refused credential, which an SDK would answer by refreshing its own token.
    for action in (credentials.revoke_worker, credentials.request_rotation):
        with pytest.raises(WorkerNotFound) as unknown:
            await action(worker_id())
        assert (HTTP_STATUS[unknown.value.code], reason(unknown)) == (404, "unknown")
    with pytest.raises(Conflict) as revoked:
        await credentials.request_rotation(wid)
    assert (HTTP_STATUS[revoked.value.code], reason(revoked)) == (409, "revoked")


async def test_worker_refreshes_its_tokens(credentials: Credentials) -> None:
    wid = worker_id()
    creds = await credentials.enroll(await credentials.create_enrollment_token(), wid)
    pair = await credentials.refresh(creds.refresh_token)
    assert credentials.verify_access(pair.access_token) == Principal(
        subject=wid, kind="worker", role="worker", family=credentials.verify_access(creds.access_token).family
    )


async def test_rotation_new_secret_verifies_old_one_stops_after_grace(
    credentials: Credentials, clock: FakeClock
) -> None:
    wid = worker_id()
    old = await credentials.enroll(await credentials.create_enrollment_token(), wid)
    clock.advance(10)
    await credentials.request_rotation(wid)
    new = (await credentials.rotate_worker(wid)).credentials
    assert new.generation == old.generation + 1
    assert new.hmac_secret_hex != old.hmac_secret_hex
    subject, body = subjects.report_subject(wid), b"{}"

    def signed_by(creds_hex: str) -> dict[str, str]:
        return sign(bytes.fromhex(creds_hex), subject, body, now_ms=clock.now_ms)

    # The new generation becomes current on its first use; within the grace (60 s by default) both
    # generations verify: reports signed before the switch land.
    assert await credentials.verify_report(subject, body, signed_by(new.hmac_secret_hex)) == wid
    assert await credentials.worker_secret(wid) == bytes.fromhex(new.hmac_secret_hex)
    assert await credentials.verify_report(subject, body, signed_by(old.hmac_secret_hex)) == wid
    assert credentials.verify_access(old.access_token).subject == wid
    # The old refresh token is dead at once.
    with pytest.raises(Unauthorized) as exc:
        await credentials.refresh(old.refresh_token)
    assert reason(exc) == "revoked"

    clock.advance(60.001)
    with pytest.raises(Unauthorized) as exc:
        await credentials.verify_report(subject, body, signed_by(old.hmac_secret_hex))
    assert reason(exc) == "bad_signature"
    with pytest.raises(Unauthorized) as exc:
        credentials.verify_access(old.access_token)
    assert reason(exc) == "revoked"
    assert await credentials.verify_report(subject, body, signed_by(new.hmac_secret_hex)) == wid
    assert credentials.verify_access(new.access_token).subject == wid
    assert credentials.verify_access((await credentials.refresh(new.refresh_token)).access_token).subject == wid


async def test_revoking_during_rotation_grace_stops_the_old_generation_too(
    credentials: Credentials, clock: FakeClock
) -> None:
    wid = worker_id()
    old = await credentials.enroll(await credentials.create_enrollment_token(), wid)
    await credentials.request_rotation(wid)
    new = (await credentials.rotate_worker(wid)).credentials
    subject = subjects.report_subject(wid)
    await credentials.verify_report(subject, b"{}", sign(bytes.fromhex(new.hmac_secret_hex), subject, b"{}", now_ms=clock.now_ms))
    await credentials.revoke_worker(wid)
    with pytest.raises(Unauthorized) as exc:
        credentials.verify_access(old.access_token)
    assert reason(exc) == "revoked"


# --- Credential flows that must neither lock out nor replay (issue 9) ------------------------------


class Enrolled(NamedTuple):
    """A worker enrolled just now: its credentials, its id and the report subject it signs for."""

    creds: WorkerCredentials
    worker_id: str
    report: str


async def enrolled(credentials: Credentials) -> Enrolled:
    creds = await credentials.enroll(await credentials.create_enrollment_token(), worker_id())
    return Enrolled(creds, creds.worker_id, subjects.report_subject(creds.worker_id))


def signed_request(creds: WorkerCredentials, subject: str, body: bytes, clock: FakeClock) -> dict[str, str]:
    return sign(bytes.fromhex(creds.hmac_secret_hex), subject, body, worker_id=creds.worker_id, now_ms=clock.now_ms)


async def test_a_lost_rotate_reply_is_sent_again_and_the_worker_recovers(
    credentials: Credentials, clock: FakeClock
) -> None:
    old, wid, report = await enrolled(credentials)
    await credentials.request_rotation(wid)
    lost = (await credentials.rotate_worker(wid)).credentials  # the reply never reaches the worker

    # Minutes later the worker still signs with the old secret: it verifies, and it is told to rotate.
    clock.advance(300)
    assert await credentials.verify_report(report, b"{}", signed_request(old, report, b"{}", clock)) == wid
    assert await credentials.rotation_due(wid)
    again = await credentials.rotate_worker(wid)
    assert not again.issued
    assert (again.credentials.generation, again.credentials.hmac_secret_hex) == (lost.generation, lost.hmac_secret_hex)

    # Its first request with the new secret makes that generation current; the old one ends after the grace.
    assert await credentials.verify_report(report, b"{}", signed_request(again.credentials, report, b"{}", clock)) == wid
    assert not await credentials.rotation_due(wid)
    assert await credentials.worker_secret(wid) == bytes.fromhex(lost.hmac_secret_hex)
    clock.advance(60.001)
    with pytest.raises(Unauthorized) as exc:
        await credentials.verify_report(report, b"{}", signed_request(old, report, b"{}", clock))
    assert reason(exc) == "bad_signature"
    refreshed = await credentials.refresh(again.credentials.refresh_token)
    assert credentials.verify_access(refreshed.access_token).subject == wid


async def test_rotation_is_refused_unless_due(credentials: Credentials, clock: FakeClock) -> None:
    wid = (await enrolled(credentials)).worker_id
    with pytest.raises(Conflict, match="not due"):
        await credentials.rotate_worker(wid)
    clock.advance(86400)
    assert (await credentials.rotate_worker(wid)).issued


async def test_a_replayed_rotate_or_registration_is_refused_by_another_gateway_and_after_a_restart(
    credentials: Credentials, nc: NatsClient, master_key: bytes, clock: FakeClock
) -> None:
    creds, wid, _ = await enrolled(credentials)
    await credentials.request_rotation(wid)
    rotate, register = subjects.rotate_subject(wid), subjects.API_WORKERS_REGISTER
    signed = {subject: signed_request(creds, subject, b"{}", clock) for subject in (rotate, register)}
    assert await credentials.verify_report(rotate, b"{}", signed[rotate]) == wid
    assert await credentials.verify_signed(register, b"{}", signed[register]) == wid
    async with await Credentials.open(nc.jetstream(), master_key, clock=clock) as replica:
        with pytest.raises(Unauthorized) as exc:
            await replica.verify_report(rotate, b"{}", signed[rotate])
        assert reason(exc) == "replayed_nonce"
    await credentials.close()
    clock.advance(30)
    async with await Credentials.open(nc.jetstream(), master_key, clock=clock) as restarted:
        with pytest.raises(Unauthorized) as exc:
            await restarted.verify_signed(register, b"{}", signed[register])
        assert reason(exc) == "replayed_nonce"


async def test_a_credential_answer_cannot_be_redirected_to_another_inbox(
    credentials: Credentials, clock: FakeClock
) -> None:
    creds = (await enrolled(credentials)).creds
    await credentials.request_rotation(creds.worker_id)
    rotate, register = subjects.rotate_subject(creds.worker_id), subjects.API_WORKERS_REGISTER
    secret = bytes.fromhex(creds.hmac_secret_hex)
    for subject in (rotate, register):
        headers = sign(secret, subject, b"{}", reply="_INBOX.worker.1", worker_id=creds.worker_id, now_ms=clock.now_ms)
        with pytest.raises(Unauthorized) as exc:
            await credentials.verify_signed(subject, b"{}", headers, reply="_INBOX.thief.1")
        assert reason(exc) == "bad_signature"
        assert await credentials.verify_signed(subject, b"{}", headers, reply="_INBOX.worker.1") == creds.worker_id


async def test_a_revocation_stops_tokens_stamped_by_a_gateway_whose_clock_runs_ahead(
    credentials: Credentials, nc: NatsClient, master_key: bytes, clock: FakeClock
) -> None:
    key_id, api_key = await credentials.create_api_key("skewed", "client")
    ahead = FakeClock()
    ahead.now_ms = clock.now_ms + 5_000
    async with await Credentials.open(nc.jetstream(), master_key, clock=ahead) as fast_gateway:
        pair = await fast_gateway.issue_tokens(api_key)  # stamped 5 s "after" the revocation below
        clock.advance(1)
        await credentials.revoke_api_key(key_id)
        with pytest.raises(Unauthorized) as exc:
            credentials.verify_access(pair.access_token)
        assert reason(exc) == "revoked"

        async def refused_there() -> bool:
            try:
                fast_gateway.verify_access(pair.access_token)
            except Unauthorized:
                return True
            return False

        await wait_until(refused_there, 5, "the fast gateway to see the revocation")


async def test_a_revoke_whose_marker_write_failed_is_repaired_by_revoking_again(
    fresh_nats: EmbeddedNats, master_key: bytes, clock: FakeClock
) -> None:
    async with platform_nc(fresh_nats) as nc:
        js = nc.jetstream()
        async with await Credentials.open(js, master_key, clock=clock) as credentials:
            key_id, api_key = await credentials.create_api_key("leaked", "client")
            pair = await credentials.issue_tokens(api_key)
            wid = worker_id()
            worker = await credentials.enroll(await credentials.create_enrollment_token(), wid)
            # The bucket is full: records can still be rewritten, new keys (the markers) are refused.
            stream = await js.stream_info(f"KV_{subjects.AUTH_BUCKET}")
            await js.update_stream(stream.config.evolve(max_msgs=stream.state.messages))
            with pytest.raises(APIError, match="maximum messages exceeded"):
                await credentials.revoke_api_key(key_id)
            with pytest.raises(APIError, match="maximum messages exceeded"):
                await credentials.revoke_worker(wid)
            # The records say revoked; the markers that stop the access tokens were never written.
            assert [key.revoked_at_ms for key in await credentials.list_api_keys()] == [clock.now_ms]
            with pytest.raises(Unauthorized) as exc:
                await credentials.worker_secret(wid)
            assert reason(exc) == "revoked"
            async with await Credentials.open(js, master_key, clock=clock) as other_gateway:
                assert other_gateway.verify_access(pair.access_token).subject == key_id

                # The operator frees space and revokes again: now every gateway refuses the tokens.
                await js.update_stream(stream.config.evolve(max_msgs=-1))
                await credentials.revoke_api_key(key_id)
                await credentials.revoke_worker(wid)
                for token in (pair.access_token, worker.access_token):

                    async def refused(token: str = token) -> bool:
                        try:
                            other_gateway.verify_access(token)
                        except Unauthorized as exc:
                            return exc.details == {"reason": "revoked"}
                        return False

                    await wait_until(refused, 5, "the other gateway to refuse the revoked tokens")


async def test_an_unbound_token_cannot_take_over_a_revoked_worker(credentials: Credentials) -> None:
    wid = (await enrolled(credentials)).worker_id
    await credentials.revoke_worker(wid)
    with pytest.raises(Conflict, match="already enrolled"):
        await credentials.enroll(await credentials.create_enrollment_token(), wid)
    again = await credentials.enroll(await credentials.create_enrollment_token(worker_id=wid), wid)
    assert again.generation == 2


async def test_signature_checks_refuse_the_cheap_cases_before_reading_or_hashing(
    credentials: Credentials, clock: FakeClock
) -> None:
    creds, wid, report = await enrolled(credentials)
    # A stale request about a worker nobody enrolled: refused on its timestamp, before any bucket read.
    stranger = report.replace(wid, worker_id())
    stale = sign(secrets.token_bytes(32), stranger, b"{}", now_ms=clock.now_ms - 61_000)
    with pytest.raises(Unauthorized) as exc:
        await credentials.verify_report(stranger, b"{}", stale)
    assert reason(exc) == "stale_timestamp"
    # A body over 1 MiB is refused unhashed, even when correctly signed.
    big = b"x" * (MAX_SIGNED_BODY_BYTES + 1)
    with pytest.raises(BadRequest, match="at most 1048576 bytes"):
        await credentials.verify_report(report, big, signed_request(creds, report, big, clock))
    fits = b"x" * MAX_SIGNED_BODY_BYTES
    assert await credentials.verify_report(report, fits, signed_request(creds, report, fits, clock)) == wid


async def test_a_timestamp_of_unicode_digits_is_refused_as_malformed(credentials: Credentials, clock: FakeClock) -> None:
    creds, wid, report = await enrolled(credentials)
    for timestamp in ("²", "１７００００００００００００", "-1", " 1", "1" * 17):
        headers = {**signed_request(creds, report, b"{}", clock), TIMESTAMP_HEADER: timestamp}
        with pytest.raises(Unauthorized) as exc:
            await credentials.verify_report(report, b"{}", headers)
        assert reason(exc) == "malformed", timestamp


@pytest.mark.slow
async def test_the_auth_bucket_stays_bounded_under_10000_token_issues(
    fresh_nats: EmbeddedNats, master_key: bytes
) -> None:
    """Every sign-in adds a family record; each expires with its refresh token, so the bucket holds the
    sign-ins of one refresh lifetime, not every one ever made."""
    settings = AuthSettings(access_ttl_s=1, refresh_ttl_s=1, clock_skew_s=1)
    async with platform_nc(fresh_nats) as nc:
        js = nc.jetstream()
        async with await Credentials.open(js, master_key, settings=settings) as credentials:
            key_id, api_key = await credentials.create_api_key("busy", "client")
            pairs = []
            for _ in range(10):
                pairs += await asyncio.gather(*(credentials.issue_tokens(api_key) for _ in range(1_000)))
            assert len({pair.refresh_token for pair in pairs}) == 10_000
            await credentials.revoke_api_key(key_id)
            kv = await js.key_value(subjects.AUTH_BUCKET)

            async def only_the_key_is_left() -> bool:
                # nats-py's `keys()` waits for a "no more pending" marker that never comes when a record
                # expires between the watch's start and its delivery (this test's records do): ask again.
                try:
                    return await asyncio.wait_for(kv.keys(), 5) == [f"apikey.{key_id}"]
                except TimeoutError:
                    return False

            # The family records and the revocation marker expire: a gateway starting now loads no marker.
            await wait_until(only_the_key_is_left, 30, "the family records and the revocation marker to expire")

            async def only_its_record_is_stored() -> bool:
                # The server's markers of expired records go too (`gateway.kv.MARKER_TTL_S`).
                state = (await js.stream_info(f"KV_{subjects.AUTH_BUCKET}")).state
                return (state.messages, state.bytes < 1_000) == (1, True)

            await wait_until(only_its_record_is_stored, 30, "the expiry markers to go")


# --- Secrets stay secret -------------------------------------------------------------------------


async def test_secrets_never_reach_logs_or_the_bucket(
    credentials: Credentials, nc: NatsClient, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key_id, api_key = await credentials.create_api_key("audit", "operator")
    pair = await credentials.issue_tokens(api_key)
    refreshed = await credentials.refresh(pair.refresh_token)
    with pytest.raises(Unauthorized):
        await credentials.refresh(pair.refresh_token)
    enrollment = await credentials.create_enrollment_token()
    wid = worker_id()
    creds = await credentials.enroll(enrollment, wid)
    await credentials.request_rotation(wid)
    rotated = (await credentials.rotate_worker(wid)).credentials
    subject = subjects.report_subject(wid)
    headers = sign(bytes.fromhex(creds.hmac_secret_hex), subject, b"{}", now_ms=clock.now_ms)
    await credentials.verify_report(subject, b"{}", headers)
    with pytest.raises(Unauthorized):
        await credentials.verify_report(subject, b"{}", headers)
    await credentials.revoke_api_key(key_id)

    secrets_issued = [
        api_key,
        api_key.split(".", 1)[1],
        pair.access_token,
        pair.refresh_token,
        refreshed.access_token,
        refreshed.refresh_token,
        enrollment,
        enrollment.split(".", 1)[1],
        creds.access_token,
        creds.refresh_token,
        creds.hmac_secret_hex,
        rotated.hmac_secret_hex,
        rotated.refresh_token,
    ]
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "created API key" in logged and "rotated worker" in logged
    for secret in secrets_issued:
        assert secret not in logged

    # Every message the bucket's stream holds, history included, read to its end by the stream's own count
    # (a KV watcher's "no more pending" marker can come before the first value when the consumer is fast).
    bucket = f"KV_{subjects.AUTH_BUCKET}"
    sub = await nc.jetstream().subscribe(f"$KV.{subjects.AUTH_BUCKET}.>", stream=bucket, ordered_consumer=True)
    stored = b""
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            stored += msg.subject.encode() + b"=" + msg.data + b"\n"
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    assert key_id.encode() in stored and wid.encode() in stored
    for secret in secrets_issued:
        assert secret.encode() not in stored
    for raw in (creds.hmac_secret_hex, rotated.hmac_secret_hex):
        assert bytes.fromhex(raw) not in stored


# --- Building blocks -----------------------------------------------------------------------------


def test_nonce_window_memory_is_bounded() -> None:
    window = NonceWindow(window_s=1)
    now = START_MS
    for i in range(10_000):
        now += 10
        window.check("w1", now, f"n{i}", now)
    # 100 requests a second for a 1 s window: only the last second's nonces are remembered.
    assert len(window) <= 101
    window.check("w2", now, "n9999", now)  # nonces are per worker
    with pytest.raises(Unauthorized) as exc:
        window.check("w1", now, "n9999", now)
    assert exc.value.details == {"reason": "replayed_nonce"}


def test_signature_headers_are_read_case_insensitively() -> None:
    secret = secrets.token_bytes(32)
    headers = sign(secret, "api.workers.report.w1", b"body", now_ms=1234, nonce="abc")
    assert headers[TIMESTAMP_HEADER] == "1234" and headers[NONCE_HEADER] == "abc"
    assert canonical_string("api.workers.report.w1", 1234, "abc", b"body") == (
        b"api.workers.report.w1\n\n1234\nabc\n230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5"
    )
    # The reply subject is signed where the answer carries credentials (rotation, registration) only.
    assert canonical_string("api.workers.rotate.w1", 1234, "abc", b"body", reply="_INBOX.x") == (
        b"api.workers.rotate.w1\n_INBOX.x\n1234\nabc\n230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5"
    )
    assert canonical_string("api.workers.report.w1", 1234, "abc", b"body", reply="_INBOX.x") == (
        canonical_string("api.workers.report.w1", 1234, "abc", b"body")
    )
    verify_signature(secret, "api.workers.report.w1", b"body", {k.lower(): v for k, v in headers.items()})
    for missing in (WORKER_ID_HEADER, SIGNATURE_HEADER):
        partial = {k: v for k, v in headers.items() if k != missing}
        with pytest.raises(Unauthorized, match=f"missing header {missing}"):
            verify_signature(secret, "api.workers.report.w1", b"body", partial)
    with pytest.raises(Unauthorized, match="bad signature"):
        verify_signature(secret, "api.workers.report.w1", b"body", {**headers, SIGNATURE_HEADER: "é" * 64})


def test_master_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "master.key"
    key = load_or_create_master_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_master_key(path) == key
    assert list(path.parent.iterdir()) == [path]
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_master_key(path)

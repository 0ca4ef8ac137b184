"""Direct sessions' pure parts: session tokens as a worker checks them, a session's fold, and the slot a
session holds in the scheduler's view (`sdk.direct`, `scheduler.sessions`)."""

from __future__ import annotations

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scheduler.view import SchedulerView
from sdk.api import convert
from sdk.direct import OpenSession, SessionClaims, apply_session, public_key_hex, sign_token, verify_token
from sdk.errors import BadRequest, InvalidTransition, TokenRefused
from sdk.events import DirectSessionClosed, DirectSessionOpened, Heartbeat, WorkerDraining, WorkerRegistered

KEY = Ed25519PrivateKey.generate()
PUBLIC = public_key_hex(KEY)
CLAIMS = SessionClaims(session_id="s1", worker_id="w1", expires_at_ms=2_000, job_type="echo")


def refusal(token: str, *, public_key: str = PUBLIC, worker_id: str = "w1", now_ms: int = 1_000) -> str:
    with pytest.raises(TokenRefused) as exc:
        verify_token(public_key, token, worker_id=worker_id, now_ms=now_ms)
    assert exc.value.details is not None
    return exc.value.details["reason"]


def test_a_token_binds_session_worker_expiry_and_what_it_runs() -> None:
    token = sign_token(KEY, CLAIMS)
    assert verify_token(PUBLIC, token, worker_id="w1", now_ms=1_999) == CLAIMS
    assert refusal(token, worker_id="w2") == "wrong_worker"
    assert refusal(token, now_ms=2_000) == "expired"
    assert refusal(token, public_key="") == "no_key"


def test_forged_altered_and_malformed_tokens_are_refused() -> None:
    assert refusal(sign_token(Ed25519PrivateKey.generate(), CLAIMS)) == "signature"
    prefix, claims, signature = sign_token(KEY, CLAIMS).split(".")
    longer = sign_token(KEY, msgspec.structs.replace(CLAIMS, expires_at_ms=10**12)).split(".")[1]
    assert refusal(f"{prefix}.{longer}.{signature}") == "signature"
    llm = sign_token(KEY, msgspec.structs.replace(CLAIMS, job_type="llm")).split(".")[1]
    assert refusal(f"{prefix}.{llm}.{signature}") == "signature"
    for junk in ("", "gfs1", "gfs1..", "gfs2.{}.sig", f"{prefix}.{claims}", f"{prefix}.{claims}.%%%", "a.b.c"):
        assert refusal(junk) in ("malformed", "signature"), junk


def test_a_session_opens_once_and_closes_once() -> None:
    opened = DirectSessionOpened(
        session_id="s1", owner="k1", worker_id="w1", region="eu", job_type="echo", expires_at_ms=5
    )
    closed = DirectSessionClosed(session_id="s1", worker_id="w1", reason="closed", requests=3, tokens=0, errors=1)
    with pytest.raises(InvalidTransition):
        apply_session(None, closed, 1)
    session = apply_session(None, opened, 1)
    assert (session.owner, session.worker_id, session.closed, session.seq) == ("k1", "w1", None, 1)
    ended = apply_session(session, closed, 2)
    assert ended.closed_view().requests == 3 and ended.seq == 2
    for again in (opened, closed):
        with pytest.raises(InvalidTransition):
            apply_session(ended, again, 3)


def test_opening_requests_are_checked_like_submissions() -> None:
    for bad in ({"type": "llm"}, {"type": "image", "model": "m"}, {"type": "echo", "region_policy": "strict"},
                {"type": "echo", "ttl_s": 86_401}, {"type": "echo", "max_latency_ms": 5}, {"type": "echo", "x": 1}):
        with pytest.raises(BadRequest):
            convert(bad, OpenSession)
    assert convert({"type": "llm", "model": "m", "region": "eu"}, OpenSession).ttl_s == 600


def test_an_open_session_holds_a_slot_until_it_closes() -> None:
    view = SchedulerView()
    view.apply_worker_event(WorkerRegistered(worker_id="w1", name="w1", region="eu"), 1, 1, 0.0)
    view.apply_heartbeat(Heartbeat(worker_id="w1", region="eu"), 2, 0.0)
    opened = DirectSessionOpened(
        session_id="s1", owner="k1", worker_id="w1", region="eu", job_type="echo", expires_at_ms=5_000
    )
    closed = DirectSessionClosed(session_id="s1", worker_id="w1", reason="closed")
    assert view.candidates()["w1"].in_flight == 0
    view.sessions.apply(opened, 10)
    assert view.candidates()["w1"].in_flight == 1
    assert view.sessions.due(view.workers, 4_999) == []
    assert [reason for _, reason in view.sessions.due(view.workers, 5_000)] == ["expired"]
    view.sessions.apply(closed, 11)
    view.sessions.apply(opened, 10)  # the consumer's late copy of an opening changes nothing
    assert view.candidates()["w1"].in_flight == 0 and view.sessions.open == {}


def test_sessions_end_with_their_worker_draining_or_gone() -> None:
    view = SchedulerView()
    view.apply_worker_event(WorkerRegistered(worker_id="w1", name="w1", region="eu"), 1, 1, 0.0)
    for n, worker_id in enumerate(("w1", "ghost")):
        view.sessions.apply(DirectSessionOpened(
            session_id=f"s{n}", owner="k", worker_id=worker_id, region="eu", job_type="echo", expires_at_ms=10**12,
        ), 10 + n)
    assert {s.id: reason for s, reason in view.sessions.due(view.workers, 0)} == {"s1": "worker_lost"}
    view.apply_worker_event(WorkerDraining(worker_id="w1"), 2, 2, 0.0)
    assert {s.id: reason for s, reason in view.sessions.due(view.workers, 0)} == {
        "s0": "worker_draining", "s1": "worker_lost",
    }

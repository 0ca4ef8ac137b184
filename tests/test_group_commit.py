"""Group commit on JOBS (`sdk.group_commit`): concurrent appends land as atomic batches, each caller is
answered with the sequence its own event was stored at, and every guarantee of a lone append holds:
a stale expected sequence is refused for that event only, an idempotency key still de-duplicates."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.errors import NoStreamResponseError

from sdk import subjects
from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.events import JobAssigned, JobStarted, JobSubmitted, event_type, job_event_decoder
from sdk.group_commit import GroupCommit
from sdk.log import WrongLastSequence, read_job_events


def _submitted(job_id: str) -> JobSubmitted:
    return JobSubmitted(job_id=job_id, job_type="echo", params={"id": job_id})


async def test_concurrent_appends_land_together_each_at_its_own_sequence(nc: NatsClient) -> None:
    js = nc.jetstream()
    log = GroupCommit(js, max_batch=50)
    ids = [f"gc-{secrets.token_hex(6)}" for _ in range(200)]
    acks = await asyncio.gather(*(log.append(subjects.job_subject(i), _submitted(i), expected_seq=0) for i in ids))
    assert log.atomic, "the JOBS stream takes atomic batches"
    assert len({ack.seq for ack in acks}) == len(ids)
    for job_id, ack in zip(ids, acks):
        stored = await js.get_msg(subjects.JOBS_STREAM, seq=ack.seq, direct=True)
        assert stored.subject == subjects.job_subject(job_id)
        event = job_event_decoder.decode(stored.data or b"")
        assert isinstance(event, JobSubmitted) and (event.job_id, event.params) == (job_id, {"id": job_id})
        assert (stored.headers or {}).get(subjects.EVENT_TYPE_HEADER) == "job.submitted"


async def test_a_stale_expected_sequence_refuses_that_event_only(nc: NatsClient) -> None:
    js = nc.jetstream()
    log = GroupCommit(js)
    taken = f"gc-{secrets.token_hex(6)}"
    await log.append(subjects.job_subject(taken), _submitted(taken), expected_seq=0)
    fresh = [f"gc-{secrets.token_hex(6)}" for _ in range(20)]
    appends = [log.append(subjects.job_subject(i), _submitted(i), expected_seq=0) for i in fresh]
    appends.insert(7, log.append(subjects.job_subject(taken), _submitted(taken), expected_seq=0))
    outcomes = await asyncio.gather(*appends, return_exceptions=True)
    refused = outcomes.pop(7)
    assert log.atomic, "a refused batch is not taken for a server without atomic batches"
    assert isinstance(refused, WrongLastSequence)
    assert all(not isinstance(outcome, BaseException) for outcome in outcomes), outcomes
    assert len(await read_job_events(js, taken)) == 1
    for job_id in fresh:
        assert len(await read_job_events(js, job_id)) == 1


async def test_appends_queued_together_are_answered_batch_by_batch_in_their_order(nc: NatsClient) -> None:
    js = nc.jetstream()
    log = GroupCommit(js, max_batch=10)
    taken = f"gc-{secrets.token_hex(6)}"
    await log.append(subjects.job_subject(taken), _submitted(taken), expected_seq=0)
    ids = [f"gc-{secrets.token_hex(6)}" for _ in range(35)]
    appends = [(subjects.job_subject(i), _submitted(i), 0) for i in ids]
    appends.insert(12, (subjects.job_subject(taken), _submitted(taken), 0))  # stale: refused alone

    futures = log.append_many(appends)
    first = await futures[0]
    # The first batch is answered before the rest are stored: its ten events, contiguous.
    assert [f.done() for f in futures[:10]] == [True] * 10 and not futures[-1].done()
    outcomes = await asyncio.gather(*futures, return_exceptions=True)

    refused = outcomes.pop(12)
    assert isinstance(refused, WrongLastSequence)
    assert [ack.seq for ack in outcomes[:10]] == list(range(first.seq, first.seq + 10))  # type: ignore[union-attr]
    for job_id, ack in zip(ids, outcomes):
        assert not isinstance(ack, BaseException), ack
        stored = await js.get_msg(subjects.JOBS_STREAM, seq=ack.seq, direct=True)
        assert stored.subject == subjects.job_subject(job_id)
    assert len(await read_job_events(js, taken)) == 1


async def test_an_idempotency_key_still_deduplicates(nc: NatsClient) -> None:
    log = GroupCommit(nc.jetstream())
    job_id = f"gc-{secrets.token_hex(6)}"
    key = f"key-{secrets.token_hex(6)}"
    first, again = await asyncio.gather(
        log.append(subjects.job_subject(job_id), _submitted(job_id), msg_id=key),
        log.append(subjects.job_subject(job_id), _submitted(job_id), msg_id=key),
    )
    assert first.seq == again.seq and [first.duplicate, again.duplicate].count(True) == 1


@pytest.mark.parametrize("count", [1, 2])
async def test_a_lone_append_needs_no_batch(nc: NatsClient, count: int) -> None:
    log = GroupCommit(nc.jetstream())
    ids = [f"gc-{secrets.token_hex(6)}" for _ in range(count)]
    acks = await asyncio.gather(*(log.append(subjects.job_subject(i), _submitted(i), expected_seq=0) for i in ids))
    assert [len(await read_job_events(nc.jetstream(), i)) for i in ids] == [1] * count
    assert acks[-1].seq >= acks[0].seq


async def test_a_batch_no_stream_answers_is_refused_as_unavailable_like_a_lone_append(fresh_nats: EmbeddedNats) -> None:
    # No JOBS stream at all: what a batch meets while the stream's leader is being elected (no responder).
    nc = await connect(fresh_nats.url, name="test-no-stream")
    try:
        log = GroupCommit(nc.jetstream())
        ids = [f"gc-{secrets.token_hex(6)}" for _ in range(10)]
        outcomes = await asyncio.gather(
            *(log.append(subjects.job_subject(i), _submitted(i), expected_seq=0) for i in ids), return_exceptions=True
        )
    finally:
        await nc.close()
    # The gateway answers this with 503 and the endpoints with `unavailable`; a raw NoRespondersError was a 500.
    assert all(isinstance(outcome, NoStreamResponseError) for outcome in outcomes), outcomes


def _chain(job_id: str) -> tuple[JobSubmitted, JobAssigned, JobStarted]:
    return (
        _submitted(job_id),
        JobAssigned(job_id=job_id, worker_id="w1", region="eu", attempt=1),
        JobStarted(job_id=job_id, worker_id="w1", attempt=1),
    )


async def _kinds(nc: NatsClient, job_id: str) -> list[str]:
    return [event_type(event) for event, _ in await read_job_events(nc.jetstream(), job_id)]


async def test_several_events_of_one_decision_land_in_order_alone_or_among_other_appends(nc: NatsClient) -> None:
    log = GroupCommit(nc.jetstream())
    alone = f"gc-{secrets.token_hex(6)}"
    ack = await log.append(subjects.job_subject(alone), _chain(alone), expected_seq=0)
    assert await _kinds(nc, alone) == ["job.submitted", "job.assigned", "job.started"]
    assert ack.seq == (await read_job_events(nc.jetstream(), alone))[-1][1]  # the ack is the last event's

    chained = [f"gc-{secrets.token_hex(6)}" for _ in range(10)]
    single = [f"gc-{secrets.token_hex(6)}" for _ in range(10)]
    acks = await asyncio.gather(
        *(log.append(subjects.job_subject(i), _chain(i), expected_seq=0) for i in chained),
        *(log.append(subjects.job_subject(i), _submitted(i), expected_seq=0) for i in single),
    )
    assert log.atomic
    for job_id, ack in zip(chained + single, acks):
        records = await read_job_events(nc.jetstream(), job_id)
        assert ack.seq == records[-1][1]
        assert len(records) == (3 if job_id in chained else 1)
        if job_id in chained:
            assert await _kinds(nc, job_id) == ["job.submitted", "job.assigned", "job.started"]


@pytest.mark.parametrize("others", [0, 10])
async def test_events_of_one_decision_at_a_stale_sequence_are_refused_together(nc: NatsClient, others: int) -> None:
    log = GroupCommit(nc.jetstream())
    taken = f"gc-{secrets.token_hex(6)}"
    await log.append(subjects.job_subject(taken), _submitted(taken), expected_seq=0)
    lead = f"gc-{secrets.token_hex(6)}"
    fresh = [f"gc-{secrets.token_hex(6)}" for _ in range(others)]
    # The lead goes alone; the refused chain then goes alone too (no others) or inside an atomic batch.
    lead_ack, *outcomes = await asyncio.gather(
        log.append(subjects.job_subject(lead), _submitted(lead), expected_seq=0),
        log.append(subjects.job_subject(taken), _chain(taken), expected_seq=0),
        *(log.append(subjects.job_subject(i), _chain(i), expected_seq=0) for i in fresh),
        return_exceptions=True,
    )
    assert log.atomic and not isinstance(lead_ack, BaseException)
    assert isinstance(outcomes[0], WrongLastSequence)
    assert await _kinds(nc, taken) == ["job.submitted"]  # not one event of the refused decision
    assert all(not isinstance(outcome, BaseException) for outcome in outcomes[1:]), outcomes
    for job_id in fresh:
        assert await _kinds(nc, job_id) == ["job.submitted", "job.assigned", "job.started"]

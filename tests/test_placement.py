"""Placement is a pure function: which worker takes a job, and why the others refused it."""

from __future__ import annotations

from typing import Any

from scheduler.placement import Candidate, NoPlacement, Placement, choose_worker
from sdk.events import JobSubmitted
from sdk.jobs import Job, apply

GiB = 1024**3


def job(job_type: str = "echo", *, model: str | None = None, region: str | None = None) -> Job:
    return apply(None, JobSubmitted(job_id="j1", job_type=job_type, model=model, region=region), seq=1)


def worker(worker_id: str, region: str = "eu", **fields: Any) -> Candidate:
    return Candidate(worker_id=worker_id, region=region, **fields)


def test_job_with_region_goes_to_a_worker_of_that_region() -> None:
    workers = [worker("a-us", "us", memory_free_bytes=80 * GiB), worker("b-eu", "eu", memory_free_bytes=8 * GiB)]

    assert choose_worker(job(region="eu"), workers, draw=0.5) == Placement(worker_id="b-eu", region="eu", distance_ms=0.0)


def test_job_with_region_falls_back_to_another_region_when_its_region_is_busy() -> None:
    workers = [worker("a-us", "us"), worker("b-eu", "eu", max_concurrency=2, in_flight=2)]

    assert choose_worker(job(region="eu"), workers, draw=0.5) == Placement(worker_id="a-us", region="us")


def test_job_with_region_falls_back_when_no_worker_runs_there() -> None:
    assert choose_worker(job(region="ap"), [worker("a-us", "us")], draw=0.5) == Placement(
        worker_id="a-us", region="us"
    )


def test_full_worker_is_skipped_and_reported_busy() -> None:
    full = worker("w1", max_concurrency=4, in_flight=4)

    assert choose_worker(job(), [full], draw=0.0) == NoPlacement(reasons={"w1": "busy 4/4"})
    assert choose_worker(job(), [full, worker("w2", in_flight=3)], draw=0.0) == Placement(worker_id="w2", region="eu")


def test_acceptance_rate_zero_never_accepts_and_one_always_does() -> None:
    never, always = worker("never", acceptance_rate=0.0), worker("always", acceptance_rate=1.0)

    for draw in (0.0, 0.5, 0.999999):
        assert choose_worker(job(), [never], draw=draw) == NoPlacement(
            reasons={"never": "declined (acceptance rate 0.00)"}
        )
        assert choose_worker(job(), [never, always], draw=draw) == Placement(worker_id="always", region="eu")


def test_acceptance_rate_accepts_when_the_draw_is_below_it() -> None:
    half = worker("half", acceptance_rate=0.5)

    assert choose_worker(job(), [half], draw=0.49) == Placement(worker_id="half", region="eu")
    assert choose_worker(job(), [half], draw=0.5) == NoPlacement(reasons={"half": "declined (acceptance rate 0.50)"})


def test_worker_without_the_capability_is_refused() -> None:
    workers = [worker("cpu", capabilities=("echo",)), worker("gpu", capabilities=("echo", "llm"))]

    assert choose_worker(job("llm", model="gpt2"), workers, draw=0.0) == Placement(worker_id="gpu", region="eu")
    assert choose_worker(job("image", model="sd"), workers, draw=0.0) == NoPlacement(
        reasons={"cpu": "no capability image", "gpu": "no capability image"}
    )


def test_allow_list_limits_models_and_empty_allows_any() -> None:
    llm = job("llm", model="gpt2")
    strict = worker("strict", capabilities=("llm",), allowed_models=("qwen",))
    open_ = worker("open", capabilities=("llm",))

    assert choose_worker(llm, [strict], draw=0.0) == NoPlacement(reasons={"strict": "model gpt2 not allowed"})
    assert choose_worker(llm, [strict, open_], draw=0.0) == Placement(worker_id="open", region="eu")
    assert choose_worker(job("llm", model="qwen"), [strict], draw=0.0) == Placement(worker_id="strict", region="eu")


def test_worker_with_the_model_loaded_is_preferred_over_more_memory_and_less_load() -> None:
    workers = [
        worker("roomy", capabilities=("llm",), memory_free_bytes=80 * GiB),
        worker("loaded", capabilities=("llm",), loaded_models=("gpt2",), memory_free_bytes=2 * GiB, in_flight=3),
    ]

    assert choose_worker(job("llm", model="gpt2"), workers, draw=0.0) == Placement(worker_id="loaded", region="eu")


def test_ranking_then_memory_then_load_then_worker_id() -> None:
    more_memory = [worker("small", memory_free_bytes=GiB), worker("big", memory_free_bytes=2 * GiB)]
    less_load = [worker("busy", in_flight=2), worker("idle", in_flight=0)]
    tie = [worker("w2"), worker("w1")]
    unknown_memory = [worker("unknown"), worker("known", memory_free_bytes=0)]

    assert choose_worker(job(), more_memory, draw=0.0) == Placement(worker_id="big", region="eu")
    assert choose_worker(job(), less_load, draw=0.0) == Placement(worker_id="idle", region="eu")
    assert choose_worker(job(), tie, draw=0.0) == Placement(worker_id="w1", region="eu")
    assert choose_worker(job(), unknown_memory, draw=0.0) == Placement(worker_id="known", region="eu")


def test_no_placement_carries_a_reason_for_every_worker() -> None:
    workers = [
        worker("dead", alive=False),
        worker("leaving", draining=True),
        worker("cpu", capabilities=("echo",)),
        worker("busy", capabilities=("llm",), max_concurrency=1, in_flight=1),
        worker("picky", capabilities=("llm",), allowed_models=("qwen",)),
        worker("shy", capabilities=("llm",), acceptance_rate=0.25),
    ]

    assert choose_worker(job("llm", model="gpt2"), workers, draw=0.5) == NoPlacement(
        reasons={
            "dead": "not alive",
            "leaving": "draining",
            "cpu": "no capability llm",
            "busy": "busy 1/1",
            "picky": "model gpt2 not allowed",
            "shy": "declined (acceptance rate 0.25)",
        }
    )
    assert choose_worker(job(), [], draw=0.5) == NoPlacement(reasons={})

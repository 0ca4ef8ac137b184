"""Geo-aware placement as pure functions: the latency table, region policies, the index that answers
like the reference at fleet scale, fair turns between clients, and explanations."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.fairness import fair_order
from scheduler.index import PlacementIndex, plan
from scheduler.placement import Candidate, NoPlacement, Placement, choose_worker, explain
from sdk.api import SubmitJob, decode
from sdk.errors import BadRequest
from sdk.events import JobSubmitted
from sdk.jobs import Job, apply
from sdk.regions import FAR_MS, LatencyTable, RegionLatencies, validate_latencies

GiB = 1024**3
TABLE = {"latency_ms": {"eu-west": {"us-east": 80, "ap-south": 130}, "us-east": {"ap-south": 210}}}
LATENCIES = validate_latencies(msgspec.convert(TABLE, RegionLatencies))


def job(job_type: str = "echo", *, job_id: str = "j1", seq: int = 1, **fields: Any) -> Job:
    return apply(None, JobSubmitted(job_id=job_id, job_type=job_type, **fields), seq=seq)


def worker(worker_id: str, region: str, **fields: Any) -> Candidate:
    return Candidate(worker_id=worker_id, region=region, **fields)


def choose(j: Job, workers: list[Candidate], draw: float = 0.0) -> Placement | NoPlacement:
    return choose_worker(j, workers, draw=draw, latencies=LATENCIES)


# --- The latency table ------------------------------------------------------------------------------


def test_a_pair_given_once_counts_both_ways_and_a_region_is_zero_from_itself() -> None:
    assert LATENCIES.distance_ms("eu-west", "us-east") == 80
    assert LATENCIES.distance_ms("us-east", "eu-west") == 80
    assert LATENCIES.distance_ms("ap-south", "us-east") == 210
    assert LATENCIES.distance_ms("ap-south", "ap-south") == 0
    assert LATENCIES.distance_ms("eu-west", "sa-east") == FAR_MS


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"latency_ms": {"eu": {"us": -1}}}', "latency_ms"),
        (b'{"latency_ms": {"eu": {"us": "far"}}}', "latency_ms"),
        (b'{"latency_ms": {"e u": {"us": 10}}}', "latency_ms"),
        (b'{"latency_ms": {"eu": {"us": 10}}, "extra": 1}', "extra"),
        (b'{"latency_ms": {"eu": {"eu": 5}}}', "eu.eu"),
        (b'{"latency_ms": {"eu": {"us": 10}, "us": {"eu": 20}}}', "us<->eu is given as both 10 and 20"),
    ],
)
def test_a_malformed_table_is_refused_whole_naming_what_is_wrong(body: bytes, names: str) -> None:
    with pytest.raises(BadRequest, match=names.replace(".", r"\.")):
        validate_latencies(decode(body, RegionLatencies))


def test_the_same_pair_given_both_ways_with_one_figure_is_accepted() -> None:
    table = validate_latencies(decode(b'{"latency_ms": {"eu": {"us": 10}, "us": {"eu": 10}}}', RegionLatencies))
    assert table.distance_ms("us", "eu") == 10


# --- Region policies ----------------------------------------------------------------------------------

FLEET = [
    worker("eu-1", "eu-west", max_concurrency=1, in_flight=1),
    worker("us-1", "us-east"),
    worker("ap-1", "ap-south", memory_free_bytes=80 * GiB),
]


def test_nearest_is_the_default_and_takes_the_nearest_region_with_a_free_worker() -> None:
    placed = choose(job(region="eu-west"), FLEET)
    assert placed == Placement(worker_id="us-1", region="us-east", distance_ms=80)

    free_home = [*FLEET, worker("eu-2", "eu-west")]
    assert choose(job(region="eu-west"), free_home) == Placement(worker_id="eu-2", region="eu-west", distance_ms=0)


def test_nearest_ranks_unknown_regions_last() -> None:
    fleet = [worker("sa-1", "sa-east", memory_free_bytes=80 * GiB), worker("ap-1", "ap-south")]
    assert choose(job(region="eu-west"), fleet) == Placement(worker_id="ap-1", region="ap-south", distance_ms=130)


def test_max_latency_ms_keeps_the_job_within_reach() -> None:
    near_enough = job(region="eu-west", max_latency_ms=100)
    assert choose(near_enough, FLEET) == Placement(worker_id="us-1", region="us-east", distance_ms=80)

    too_near = job(region="eu-west", max_latency_ms=50)
    assert choose(too_near, FLEET) == NoPlacement(
        reasons={
            "eu-1": "busy 1/1",
            "us-1": "region us-east farther than max_latency_ms 50",
            "ap-1": "region ap-south farther than max_latency_ms 50",
        }
    )


def test_strict_waits_for_its_region_rather_than_leave_it() -> None:
    assert choose(job(region="eu-west", region_policy="strict"), FLEET) == NoPlacement(
        reasons={
            "eu-1": "busy 1/1",
            "us-1": "region us-east is not eu-west (strict)",
            "ap-1": "region ap-south is not eu-west (strict)",
        }
    )
    home = [*FLEET, worker("eu-2", "eu-west")]
    assert choose(job(region="eu-west", region_policy="strict"), home) == Placement(
        worker_id="eu-2", region="eu-west", distance_ms=0
    )


def test_any_ignores_distance_and_takes_the_best_worker() -> None:
    assert choose(job(region="eu-west", region_policy="any"), FLEET) == Placement(
        worker_id="ap-1", region="ap-south", distance_ms=130
    )
    assert choose(job(), FLEET) == Placement(worker_id="ap-1", region="ap-south")


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "echo", "region_policy": "strict"}',
        b'{"type": "echo", "region_policy": "nowhere", "region": "eu"}',
        b'{"type": "echo", "max_latency_ms": 10}',
        b'{"type": "echo", "region": "eu", "region_policy": "strict", "max_latency_ms": 10}',
        b'{"type": "echo", "region": "eu", "max_latency_ms": -1}',
    ],
)
def test_a_submission_with_a_policy_that_cannot_hold_is_refused(body: bytes) -> None:
    with pytest.raises(BadRequest):
        decode(body, SubmitJob)


# --- The index answers like the reference -----------------------------------------------------------

REGIONS = ["eu-west", "us-east", "ap-south", "sa-east"]
MODELS = ["gpt2", "qwen"]

candidates = st.builds(
    Candidate,
    worker_id=st.uuids().map(lambda u: u.hex[:8]),
    region=st.sampled_from(REGIONS),
    capabilities=st.sampled_from([("echo",), ("echo", "llm"), ("llm",)]),
    max_concurrency=st.integers(1, 3),
    in_flight=st.integers(0, 3),
    acceptance_rate=st.sampled_from([0.0, 0.5, 1.0]),
    allowed_models=st.sampled_from([(), ("gpt2",), ("qwen",)]),
    loaded_models=st.sampled_from([(), ("gpt2",), ("gpt2", "qwen")]),
    memory_free_bytes=st.one_of(st.none(), st.sampled_from([GiB, 2 * GiB])),
    alive=st.sampled_from([True, True, False]),
    draining=st.sampled_from([False, False, True]),
)
jobs = st.builds(
    lambda job_type, model, region, policy, max_latency_ms: job(
        job_type, model=model if job_type == "llm" else None, region=region,
        region_policy=policy if region else None,
        max_latency_ms=max_latency_ms if region and policy in (None, "nearest") else None,
    ),
    st.sampled_from(["echo", "llm"]),
    st.sampled_from(MODELS),
    st.one_of(st.none(), st.sampled_from(REGIONS)),
    st.sampled_from([None, "nearest", "strict", "any"]),
    st.one_of(st.none(), st.sampled_from([0, 80, 150])),
)


@settings(max_examples=300, deadline=None)
@given(jobs, st.lists(candidates, max_size=12, unique_by=lambda c: c.worker_id), st.sampled_from([0.0, 0.3, 0.7]))
def test_the_index_chooses_what_the_reference_chooses(j: Job, workers: list[Candidate], draw: float) -> None:
    reference = choose(j, workers, draw)
    indexed = PlacementIndex(workers, LATENCIES).choose(j, draw=draw)
    assert indexed == (reference if isinstance(reference, Placement) else None)


@settings(max_examples=100, deadline=None)
@given(st.lists(jobs, max_size=10), st.lists(candidates, max_size=8, unique_by=lambda c: c.worker_id))
def test_a_pass_fills_slots_as_one_decision_after_another_would(queue: list[Job], workers: list[Candidate]) -> None:
    expected: list[tuple[str, str]] = []
    fleet = {w.worker_id: w for w in workers}
    for j in queue:
        placed = choose(j, list(fleet.values()))
        if isinstance(placed, Placement):
            expected.append((j.id, placed.worker_id))
            chosen = fleet[placed.worker_id]
            fleet[placed.worker_id] = msgspec.structs.replace(chosen, in_flight=chosen.in_flight + 1)
    decisions = plan(queue, PlacementIndex(workers, LATENCIES), lambda: 0.0)
    assert [(j.id, p.worker_id) for j, p, _ in decisions] == expected


def test_a_pass_explains_each_choice_in_words() -> None:
    llm = job("llm", model="gpt2", region="eu-west")
    fleet = [worker("us-1", "us-east", capabilities=("llm",), loaded_models=("gpt2",), memory_free_bytes=8 * GiB)]
    [(_, placement, why)] = plan([llm], PlacementIndex(fleet, LATENCIES), lambda: 0.0)
    assert placement == Placement(worker_id="us-1", region="us-east", distance_ms=80)
    assert why == "region us-east (80 ms from eu-west); model gpt2 loaded; 8.0 GiB free; 0/4 in flight"


# --- Fairness -------------------------------------------------------------------------------------------


def test_at_equal_priority_clients_take_turns_whatever_their_backlog() -> None:
    burst = [job(job_id=f"a{n}", seq=n, owner="alice") for n in range(1, 10_001)]
    single = job(job_id="b1", seq=10_001, owner="bob")
    urgent = job(job_id="u1", seq=10_002, owner="alice", priority=5)

    order = [j.id for j in fair_order([*burst, single, urgent])]

    assert order[:4] == ["u1", "a1", "b1", "a2"]
    assert order[4:] == [f"a{n}" for n in range(3, 10_001)]


def test_a_single_job_of_another_client_is_placed_in_the_first_pass_despite_a_burst() -> None:
    burst = [job(job_id=f"a{n}", seq=n, owner="alice") for n in range(1, 101)]
    single = job(job_id="b1", seq=101, owner="bob")
    fleet = [worker("w1", "eu-west", max_concurrency=2)]

    decisions = plan(fair_order([*burst, single]), PlacementIndex(fleet, LATENCIES), lambda: 0.0)

    assert [j.id for j, _, _ in decisions] == ["a1", "b1"]


# --- Explanations ---------------------------------------------------------------------------------------


def test_explain_groups_refusals_by_reason_with_a_sample_and_what_would_change_it() -> None:
    fleet = [worker(f"busy-{n}", "eu-west", max_concurrency=4, in_flight=4) for n in range(7)]
    fleet += [worker(f"far-{n}", "ap-south") for n in range(2)]
    able, reasons = explain(job(region="eu-west", max_latency_ms=100), fleet, LATENCIES)

    assert able == 0
    assert [(r.reason, r.workers, r.sample) for r in reasons] == [
        ("busy 4/4", 7, ["busy-0", "busy-1", "busy-2", "busy-3", "busy-4"]),
        ("region ap-south farther than max_latency_ms 100", 2, ["far-0", "far-1"]),
    ]
    assert reasons[0].change == "one of their jobs finishes"
    assert reasons[1].change == "max_latency_ms of at least 130 (their distance), or a worker within it"


def test_an_empty_table_leaves_every_other_region_equally_far() -> None:
    fleet = [worker("us-1", "us-east"), worker("ap-1", "ap-south", memory_free_bytes=GiB)]
    assert choose_worker(job(region="eu-west"), fleet, draw=0.0, latencies=LatencyTable()) == Placement(
        worker_id="ap-1", region="ap-south"
    )

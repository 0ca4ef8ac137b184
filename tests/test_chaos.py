"""The chaos suite in CI: a few seeded rounds in which a worker and the scheduler leader die together and
the broker dies, under load (`bench.chaos`, `just chaos` runs fifty)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run_chaos

pytestmark = pytest.mark.slow


async def test_killed_components_lose_and_double_no_acknowledged_job(tmp_path: Path) -> None:
    run = await run_chaos(
        tmp_path, rounds=2, seed=11, faults=("worker+scheduler", "nats"),
        workers={"k1": "echo", "k2": "echo"}, rate_per_s=5.0,
    )
    assert sorted(r.fault for r in run.rounds) == ["nats", "worker+scheduler"]
    assert all(r.jobs > 0 for r in run.rounds)
    assert [(len(r.lost), len(r.doubled), r.refused) for r in run.rounds] == [(0, 0, [])] * 2
    assert (run.final_lost, run.final_doubled, run.final_refused) == ([], [], [])
    assert [r.read_model_diffs for r in run.rounds] == [[], []]
    assert [r.verify for r in run.rounds] == [[], []], "gpuctl verify finds the log and the read models sound"
    assert all(r.recovery_s is not None for r in run.rounds), "the platform placed and completed jobs again"
    # The killed worker's jobs were taken back (requeued) rather than left with it.
    killed_worker = next(r for r in run.rounds if r.fault == "worker+scheduler")
    assert killed_worker.taken_back_s is None or killed_worker.taken_back_s < float("inf")
    # The broker's outage is not the workers' silence: none of them is declared lost, and the feeds that
    # died with the broker are made again in about a second, not after nats-py's default 10 to 20 s.
    broker = next(r for r in run.rounds if r.fault == "nats")
    assert broker.live_declared_lost == []
    assert broker.recovery_s is not None and broker.recovery_s < 10.0

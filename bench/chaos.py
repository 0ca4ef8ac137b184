"""The chaos suite: seeded rounds of steady load while components of the platform are SIGKILLed.

    python -m bench.chaos --rounds 50 --seed 1 --report docs/reliability.md     (just chaos)
    just chaos --cluster 3 --seed 1 --rounds 10 --journal chaos-c3.jsonl        (then --start-round 11 ...)

Each round starts a steady load of jobs (`chaos_platform.Load`), kills what the round's fault names
(`chaos_platform.FAULTS`; the faults come in a seeded order, each one every six rounds), lets the
supervisor restart it, stops the load once the platform placed and completed jobs again, waits until
every acknowledged job has ended and the platform is whole again, then checks the log and the read
models (`chaos_check`). The same seed gives the same faults, kill times, victims' choice and jobs;
`--start-round N --rounds 1` repeats round N alone. `--cluster 3` runs the platform on three NATS nodes
with two gateways and two projections replicas, and kills one node, gateway or replica in their rounds.
`--journal` appends each round to a file, so that a long run can be played in several invocations
(`--start-round`); `--report` then writes every round of the journal.

It prints one row per round and the recovery times against their targets; `--report` writes them into
the generated block of docs/reliability.md. Exits non-zero when a job was lost or doubled, an outcome of
a superseded attempt was accepted, or a read model differs from a fresh fold of the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, TypeVar

import nats.errors
import stamina
from cyclopts import Parameter
from nats.js import JetStreamContext
from rich.table import Table

from bench.chaos_check import (
    Audit,
    Entry,
    held_by,
    read_jobs_log,
    read_model_differences,
    recovery_s,
    taken_back_s,
    workers_declared_lost,
)
from bench.chaos_platform import FAULTS, ChaosPlatform, Load, kill
from bench.cli import bench_app
from sdk import subjects
from sdk.errors import PlatformError
from sdk.history import stream_end
from sdk.verify import verify

app, console = bench_app("bench-chaos", __doc__, width=140)
logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The workers of the chaos stack (name -> engines): one runs the tiny LLM too.
WORKERS = {"c1": "echo,llm", "c2": "echo", "c3": "echo"}
HEARTBEAT_INTERVAL_S = 0.5
#: Recovery targets by the kind of component killed (issue 11); a worker's is two heartbeat intervals.
TARGETS_S = {"nats": 5.0, "scheduler": 6.0, "worker": 2 * HEARTBEAT_INTERVAL_S}
#: The load stops this long after the platform recovered, or after this limit without recovery.
AFTER_RECOVERY_S = 1.0
RECOVERY_LIMIT_S = 30.0
#: How long every acknowledged job of a round may take to end once the load stopped.
DRAIN_TIMEOUT_S = 120.0
#: How long the checks after a round retry a JetStream that does not answer (`_checked`).
CHECK_RETRY_S = 60.0
REPORT_BEGIN = "<!-- chaos:begin (written by `just chaos`) -->"
REPORT_END = "<!-- chaos:end -->"


def report_markers(cluster: int) -> tuple[str, str]:
    """The generated block's markers: one block for a single node, one per cluster size."""
    if cluster <= 1:
        return REPORT_BEGIN, REPORT_END
    return f"<!-- chaos-cluster{cluster}:begin (written by `just chaos --cluster {cluster}`) -->", f"<!-- chaos-cluster{cluster}:end -->"


@dataclass
class Round:
    number: int
    seed: str
    fault: str
    killed: list[str]
    jobs: int = 0
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    failed: int = 0
    recovery_s: float | None = None
    taken_back_s: float | None = None
    #: What `gpuctl verify` (`sdk.verify`) finds in the whole log and the read models it serves.
    verify: list[str] = field(default_factory=list)
    #: Workers declared lost that were not killed: names.
    live_declared_lost: list[str] = field(default_factory=list)
    read_model_diffs: list[str] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not (self.lost or self.doubled or self.refused or self.verify or self.read_model_diffs)

    def target_s(self) -> float:
        """The target of the slowest part killed: with the scheduler gone too, nothing is placed before a
        standby leads (none for a gateway or projections: no target was set)."""
        kinds = [part for part in self.fault.split("+") if part in TARGETS_S]
        return max((TARGETS_S[k] for k in kinds), default=float("inf"))


@dataclass
class ChaosRun:
    seed: int
    cluster: int = 1
    rounds: list[Round] = field(default_factory=list)
    #: The whole log, checked once more at the end against every acknowledged job.
    final_lost: list[str] = field(default_factory=list)
    final_doubled: list[str] = field(default_factory=list)
    final_refused: list[str] = field(default_factory=list)
    acknowledged: int = 0

    @property
    def sound(self) -> bool:
        return all(r.sound for r in self.rounds) and not (self.final_lost or self.final_doubled or self.final_refused)


def schedule(seed: int, rounds: int, faults: tuple[str, ...]) -> list[str]:
    """Round n's fault (n from 1): every fault once per block of len(faults) rounds, in a seeded order."""
    order: list[str] = []
    block = 0
    while len(order) < rounds:
        shuffled = list(faults)
        random.Random(f"{seed}:block:{block}").shuffle(shuffled)
        order += shuffled
        block += 1
    return order


async def play_round(platform: ChaosPlatform, number: int, seed: int, fault: str, llm_model: str | None,
                     rate_per_s: float) -> tuple[Round, list[str]]:
    """One round; returns it and the ids of the jobs it acknowledged."""
    assert platform.http is not None and platform.client is not None
    js = platform.client.nc.jetstream()
    round_seed = f"{seed}:{number}"
    rng = random.Random(round_seed)
    start_seq = await _checked(partial(stream_end, js, subjects.JOBS_STREAM))
    workers_start_seq = await _checked(partial(stream_end, js, subjects.WORKERS_STREAM))
    load = Load(platform.http, platform.client, random.Random(f"{round_seed}:load"), rate_per_s, llm_model)
    stop = asyncio.Event()
    loading = asyncio.create_task(load.run(stop))
    try:
        await asyncio.sleep(rng.uniform(1.5, 3.0))
        victims = await platform.victims(fault, rng)
        killed_at_s = kill(victims)
        result = Round(number, round_seed, fault, [v.label for v in victims])
        recovered = asyncio.Event()
        probing = asyncio.create_task(load.probe(recovered))
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if recovery_s(Audit.of(await _read(js, start_seq)), killed_at_s) is not None:
                break
        recovered.set()
        await probing
        await asyncio.sleep(AFTER_RECOVERY_S)
    finally:
        stop.set()
        await loading
    await _drained(js, start_seq, load.acknowledged)
    await platform.whole()
    entries = await _checked(partial(read_jobs_log, js, start_seq))
    audit = Audit.of(entries)
    result.jobs = len(load.acknowledged)
    result.lost = audit.lost(load.acknowledged)
    result.doubled = audit.doubled()
    result.refused = audit.refused()
    result.failed = len(audit.failed())
    result.recovery_s = recovery_s(audit, killed_at_s)
    worker_ids = {v.worker_id for v in victims if v.worker_id is not None}
    names = {w.id: w.name for w in await platform.http.workers()}
    declared = await _checked(partial(workers_declared_lost, js, workers_start_seq))
    result.live_declared_lost = sorted(names.get(w, w) for w in declared.keys() - worker_ids)
    if worker_ids:
        result.taken_back_s = taken_back_s(entries, held_by(entries, worker_ids, killed_at_s), killed_at_s)
    client = platform.client
    violations = await _checked(lambda: verify(client.nc))
    result.verify = [f"{v.kind} {v.subject} #{v.seq}: {v.message}" for v in violations]
    for db in sorted(platform.stack.data_dir.glob("projections*.db")):
        result.read_model_diffs += await _checked(partial(read_model_differences, platform.stack.nats_url, db))
    return result, load.acknowledged


async def _checked(check: Callable[[], Awaitable[T]]) -> T:
    """A check of the log, retried while JetStream does not answer: a restarted cluster node may still be
    catching up (electing, or syncing its copies) when the platform is whole again, and a stream info
    request can time out meanwhile. A check that answers is never retried."""
    async for attempt in stamina.retry_context(on=(nats.errors.TimeoutError, nats.errors.NoRespondersError),
                                                attempts=None, timeout=CHECK_RETRY_S, wait_jitter=0.0):
        with attempt:
            return await check()
    raise AssertionError("stamina ended its retries without an answer or an error")


async def _read(js: JetStreamContext, after_seq: int) -> list[Entry]:
    """The round's log so far; nothing while the broker is down (the next look reads it)."""
    try:
        return await read_jobs_log(js, after_seq)
    except (PlatformError, nats.errors.Error, TimeoutError, OSError) as exc:
        logger.info("log not readable now (%r); looking again", exc)
        return []


async def _drained(js: JetStreamContext, start_seq: int, acknowledged: list[str]) -> None:
    """Wait until every acknowledged job has a terminal event (or the drain times out)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        entries = await _read(js, start_seq)
        if not Audit.of(entries).unfinished(acknowledged) or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)


async def run_chaos(
    data_dir: Path, *, rounds: int, seed: int, start_round: int = 1, faults: tuple[str, ...] = FAULTS,
    workers: dict[str, str] | None = None, llm_model: str | None = None, rate_per_s: float = 6.0,
    on_round: Callable[[Round], None] | None = None, cluster: int = 1,
) -> ChaosRun:
    """Start a chaos stack in `data_dir` (on `cluster` NATS nodes), play `rounds` rounds from
    `start_round`, check the whole log."""
    workers = workers or WORKERS
    order = schedule(seed, start_round + rounds - 1, faults)
    platform = await ChaosPlatform.start(data_dir, workers, HEARTBEAT_INTERVAL_S, cluster=cluster)
    run = ChaosRun(seed, cluster)
    acknowledged: list[str] = []
    try:
        for number in range(start_round, start_round + rounds):
            played, acked = await play_round(platform, number, seed, order[number - 1], llm_model, rate_per_s)
            run.rounds.append(played)
            acknowledged += acked
            if on_round is not None:
                on_round(played)
        assert platform.client is not None
        audit = Audit.of(await read_jobs_log(platform.client.nc.jetstream()))
        run.final_lost, run.final_doubled, run.final_refused = audit.lost(acknowledged), audit.doubled(), audit.refused()
        run.acknowledged = len(acknowledged)
    finally:
        await platform.stop()
    return run


# --- Output ----------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else ("never" if value == float("inf") else f"{value:.2f}")


def round_row(r: Round) -> tuple[str, ...]:
    return (
        str(r.number), r.seed, " + ".join(r.killed), str(r.jobs), str(len(r.lost)), str(len(r.doubled)),
        str(len(r.refused)), str(r.failed), _seconds(r.recovery_s), _seconds(r.taken_back_s),
        ", ".join(r.live_declared_lost) or "-", str(len(r.verify)),
        "yes" if not r.read_model_diffs else f"NO ({len(r.read_model_diffs)})",
    )


ROUND_COLUMNS = ("round", "seed", "killed", "jobs", "lost", "doubled", "stale accepted", "failed",
                 "recovery s", "taken back s", "live declared lost", "verify",
                 "read models = fold")


def recovery_summary(run: ChaosRun) -> list[tuple[str, ...]]:
    """Per fault: rounds, median and worst recovery, the target and whether every round met it."""
    rows = []
    for fault in dict.fromkeys(r.fault for r in run.rounds):
        played = [r for r in run.rounds if r.fault == fault]
        times = [r.recovery_s if r.recovery_s is not None else float("inf") for r in played]
        target = played[0].target_s()
        met = "-" if target == float("inf") else ("yes" if max(times) < target else "NO")
        rows.append((fault, str(len(played)), _seconds(statistics.median(times)), _seconds(max(times)),
                     "-" if target == float("inf") else f"< {target:g}", met))
    return rows


SUMMARY_COLUMNS = ("killed", "rounds", "recovery median s", "recovery worst s", "target s", "met")


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def report_block(run: ChaosRun, command: str) -> str:
    lost = sum(len(r.lost) for r in run.rounds) + len(run.final_lost)
    doubled = sum(len(r.doubled) for r in run.rounds) + len(run.final_doubled)
    begin, end = report_markers(run.cluster)
    return "\n\n".join([
        begin,
        f"{command}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {len(run.rounds)} rounds, "
        f"{run.acknowledged} acknowledged jobs, **{lost} lost, {doubled} doubled**, "
        f"{sum(len(r.refused) for r in run.rounds) + len(run.final_refused)} stale outcomes accepted, "
        f"{sum(len(r.live_declared_lost) for r in run.rounds)} live workers declared lost, "
        f"{sum(len(r.verify) for r in run.rounds)} violations found by `gpuctl verify`, "
        f"read models equal to a fresh fold in {sum(not r.read_model_diffs for r in run.rounds)} of "
        f"{len(run.rounds)} rounds.",
        markdown_table(SUMMARY_COLUMNS, recovery_summary(run)),
        markdown_table(ROUND_COLUMNS, [round_row(r) for r in run.rounds]),
        end,
    ])


def write_report(path: Path, block: str) -> None:
    """Replace the generated block of `path` with the same markers (or append it); the hand-written text
    around it stays."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Reliability\n"
    begin, _, rest = block.partition("\n")
    end = rest.rsplit("\n", 1)[-1]
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")


def append_journal(path: Path, run: ChaosRun, command: str) -> None:
    """Append an invocation's rounds and its whole-log check to `path` (JSON lines)."""
    with open(path, "a", encoding="utf-8") as journal:
        for r in run.rounds:
            journal.write(json.dumps({"round": dataclasses.asdict(r)}) + "\n")
        final = {"command": command, "seed": run.seed, "cluster": run.cluster, "acknowledged": run.acknowledged,
                 "lost": run.final_lost, "doubled": run.final_doubled, "refused": run.final_refused}
        journal.write(json.dumps({"invocation": final}) + "\n")


def read_journal(path: Path) -> tuple[ChaosRun, list[str]]:
    """Every invocation of a journal as one run (rounds by number, a round played again replaces the
    earlier one), and the invocations' commands."""
    rounds: dict[int, Round] = {}
    commands: list[str] = []
    run = ChaosRun(seed=0)
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "round" in record:
            played = Round(**record["round"])
            rounds[played.number] = played
        else:
            final = record["invocation"]
            run.seed, run.cluster = final["seed"], final["cluster"]
            run.acknowledged += final["acknowledged"]
            run.final_lost += final["lost"]
            run.final_doubled += final["doubled"]
            run.final_refused += final["refused"]
            commands.append(final["command"])
    run.rounds = [rounds[n] for n in sorted(rounds)]
    return run, commands


def print_run(run: ChaosRun) -> None:
    table = Table(title=f"chaos: {len(run.rounds)} rounds, seed {run.seed}")
    for column in ROUND_COLUMNS:
        table.add_column(column, justify="left" if column in ("seed", "killed") else "right")
    for r in run.rounds:
        table.add_row(*round_row(r), style=None if r.sound else "red")
    console.print(table)
    summary = Table(title="recovery: kill -> a job placed after the kill completed")
    for column in SUMMARY_COLUMNS:
        summary.add_column(column)
    for row in recovery_summary(run):
        summary.add_row(*row)
    console.print(summary)
    for r in run.rounds:
        for line in [*r.lost, *r.doubled, *r.refused, *r.verify, *r.read_model_diffs][:20]:
            console.print(f"[red]round {r.number}: {line}")
    for what, items in (("lost", run.final_lost), ("doubled", run.final_doubled), ("stale", run.final_refused)):
        if items:
            console.print(f"[red]whole log, {what}: {items[:20]}")


@app.default
def main(
    *,
    rounds: Annotated[int, Parameter(help="how many rounds")] = 50,
    seed: Annotated[int, Parameter(help="the run's seed: faults, kill times, victims and jobs follow from it")] = 1,
    start_round: Annotated[int, Parameter(help="the first round's number (to repeat one round of a run)")] = 1,
    faults: Annotated[str, Parameter(help=f"comma-separated, from: {', '.join(FAULTS)}")] = ",".join(FAULTS),
    rate: Annotated[float, Parameter(help="jobs submitted per second during a round")] = 6.0,
    llm: Annotated[bool, Parameter(help="a few LLM jobs with a tiny random-weight model, built offline")] = True,
    data_dir: Annotated[Path | None, Parameter(help="the stack's data dir (default: a temporary one)")] = None,
    report: Annotated[Path | None, Parameter(help="write the figures into this markdown file")] = None,
    cluster: Annotated[int, Parameter(help="NATS nodes (a cluster of 3: two gateways, two projections)")] = 1,
    journal: Annotated[Path | None, Parameter(help="append the rounds to this file; --report writes all of its rounds")] = None,
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen = tuple(f.strip() for f in faults.split(",") if f.strip())
    if unknown := [f for f in chosen if f not in FAULTS]:
        raise SystemExit(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        root = data_dir or Path(scratch)
        llm_model = None
        if llm:
            from tests.tiny_models import build_tiny_gpt2  # torch and transformers: only when asked for

            llm_model = str(build_tiny_gpt2(root / "models" / "gpt2"))
        run = asyncio.run(run_chaos(
            root / "stack", rounds=rounds, seed=seed, start_round=start_round, faults=chosen, llm_model=llm_model,
            rate_per_s=rate, on_round=lambda r: console.print("  ".join(round_row(r)), style=None if r.sound else "red"),
            cluster=cluster,
        ))
    print_run(run)
    command = "just chaos" + (f" --cluster {cluster}" if cluster > 1 else "") + f" --rounds {rounds} --seed {seed}"
    command += f" --start-round {start_round}" if start_round > 1 else ""
    reported, commands = run, [command]
    if journal is not None:
        append_journal(journal, run, command)
        reported, commands = read_journal(journal)
    if report is not None:
        write_report(report, report_block(reported, ", ".join(f"`{c}`" for c in commands)))
        console.print(f"figures written to {report}")
    if not run.sound:
        raise SystemExit(1)


if __name__ == "__main__":
    app()

"""Checkpoint economics: what each commit interval costs a worker that crashes, in throughput lost
to commits and in work re-read after every crash, against the adaptive policy.

    .venv/bin/python -m bench.economics                  # 4 conditions, ~17 min
    .venv/bin/python -m bench.economics --quick          # the same, short budgets: ~4 min
    .venv/bin/python -m bench.economics --seed 12345     # repeat a run's crash schedule

Each run is real ``streamer run bench.economics_app:app`` worker processes on a pre-filled topic,
in a fresh consumer group, with static membership (``group.instance.id``), so that a restarted
worker gets its partitions back at once instead of after the killed member's session timeout.
The handler burns ``--work-us`` of CPU per record (its thread's CPU time) and counts every
record it handled in a file shared with this script (``bench/economics_app.py``).

**Crashes.** The script SIGKILLs the worker after an up time drawn from an exponential
distribution of mean MTBF (the clock starts when the process handles its first record) and
restarts it at once. The draws come from ``random.Random(f"{seed}/{mtbf}/{work_us}")``: every
configuration of a condition sees the same sequence of up times (common random numbers), so the
rows of a condition differ by their interval, not by their luck. The seed is printed.

**A run** (one configuration of one condition): the first process is a warm-up, outside the
measurement, killed after the first draw, so that the adaptive policy starts the measured window
as in a group that has failed before (it learns the MTBF from the previous run's commit
metadata). The window starts at that kill. Then: restart at once, kill after the next draw,
and so on until ``--budget`` seconds have passed; then the script waits (up to a quarter of the
budget) until the last process has re-read what the last crash left, so that every crash in the
window is paid in full, and stops it with SIGTERM (a clean stop commits everything finished).

**What is measured**, over the window:

- ``P`` records processed (the shared counters), ``G`` durable progress: committed offsets at
  the end minus those at the window's start (read from the broker between the warm-up's kill and
  the restart; a baseline run: the first offsets it handled) (the clean stop committed
  everything processed; the script checks that no record past the committed offsets was
  processed and that none below was skipped). ``R = P - G`` records re-read. ``k`` crashes.
- **restart downtime**: from each SIGKILL to the first record handled by the restarted process.
  It depends on process start-up and the group join, not on the interval, so it is reported on
  its own and left out of the costs: costs are counted over **up time**.
- **available time** ``A``: the up time (first record to kill, per process) minus the time the
  processing thread waited for a core (``/proc/PID/task/TID/schedstat``). Other programs on a
  shared 2-core machine take cores at random moments; that is neither the interval's cost nor
  the crashes', and left in it swamps both (±10 % from run to run here).
- ``r0``, the **baseline**: the same per-record cost with commits off (``every_records = 0``,
  ``every_seconds = 0``) and no crashes, records per available second; the mean of
  ``--baselines`` runs spread over the condition's runs (their spread is printed: a cost
  difference smaller than that is noise).

**Costs**, as fractions of available up time (seconds lost per second of up time; x 3,600 =
seconds lost per hour):

- **commit overhead** ``= 1 - (P / A) / r0``: the processing rate lost to commits (and to
  anything else a commit interval does to the loop: waiting for a commit to land, the records
  a partition may not take meanwhile). Negative values are noise.
- **re-read per crash** ``= R / k`` records, and its time ``(R / k) / r0`` seconds.
- **re-read cost** ``= (R / k) / r0 / MTBF``: the re-read seconds per crash times the crash rate
  per up second (1 / MTBF by construction; the nominal MTBF, not the number of crashes this
  window happened to draw, so that the figure does not carry the draw's noise).
- **total cost** ``= commit overhead + re-read cost``.

**Goodput** (rec/s) is ``G`` / the window's wall time, restarts included: what the run got done.

The goal, checked and printed per condition: the adaptive policy's total cost is within 10 % of
the best fixed interval's (``adaptive <= 1.1 x best``), in each of 4 conditions: two MTBFs times
two per-record costs. The adaptive row runs ``[commit] policy = "adaptive"`` with
``every_records = 0`` (the policy alone picks the interval) and ``adaptive_min_seconds`` lowered
to ``--adaptive-min`` (the default 1 s suits MTBFs of hours; this benchmark compresses them to
seconds); its other settings are the defaults, ``mtbf_seconds`` included (the prior it replaces
by what it observes).
"""

from __future__ import annotations

import argparse
import array
import itertools
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, TopicPartition

from bench._common import (
    BenchTopic,
    Resources,
    create_topic,
    fill_topic,
    print_context,
    print_table,
    unique,
    watermarks,
)

REPO = Path(__file__).resolve().parent.parent
APP = "bench.economics_app:app"
#: The commit intervals of the sweep, in records (``every_seconds = 0``).
INTERVALS = (1, 10, 100, 1_000, 10_000, 100_000)
#: The adaptive policy's total cost may exceed the best fixed interval's by this fraction.
GOAL = 0.10
#: Seconds a worker may take from its start to its first record.
START_TIMEOUT_S = 60.0
#: Seconds a worker may take to exit after SIGTERM.
STOP_TIMEOUT_S = 30.0
#: Slots of a mark file before the per-partition arrays (see bench/economics_app.py).
_FIRST = 2


# -- what runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A crash rate and a per-record cost."""

    mtbf: float
    work_us: float

    @property
    def label(self) -> str:
        return f"MTBF {self.mtbf:g} s, {self.work_us:g} us/record"


@dataclass(frozen=True)
class Config:
    """One row: a commit setting."""

    label: str
    commit: dict[str, str]

    @property
    def adaptive(self) -> bool:
        return self.commit.get("POLICY") == "adaptive"


def configs(adaptive_min: float) -> list[Config]:
    rows = [
        Config(f"every {n:,} record{'s' if n > 1 else ''}", {"EVERY_RECORDS": str(n), "EVERY_SECONDS": "0"})
        for n in INTERVALS
    ]
    rows.append(
        Config(
            "adaptive",
            {
                "POLICY": "adaptive",
                "EVERY_RECORDS": "0",
                "ADAPTIVE_MIN_SECONDS": str(adaptive_min),
            },
        )
    )
    return rows


BASELINE = Config("commits off, no crashes", {"EVERY_RECORDS": "0", "EVERY_SECONDS": "0"})


# -- measured -----------------------------------------------------------------------------------


@dataclass
class Life:
    """One worker process of a run."""

    spawned: float
    up: float = 0.0  # first record handled (monotonic seconds); 0: never
    end: float = 0.0  # killed or stopped
    queued: float = 0.0  # seconds its processing thread waited for a core while up
    killed: bool = False
    log: Path | None = None


class Process:
    """A worker process of a run, up (it handled its first record) until killed or stopped."""

    def __init__(self, proc: subprocess.Popen[bytes], mark: Path, life: Life, partitions: int) -> None:
        self.proc = proc
        self.mark = mark
        self.life = life
        self.partitions = partitions
        self.tid = 0
        self._queued_at_up = 0

    def slots(self) -> array.array[int]:
        values = array.array("q")
        values.frombytes(self.mark.read_bytes())
        return values

    def resumed(self) -> list[int]:
        """Per partition, the first offset it handled (the committed offset it resumed from)."""
        return list(self.slots()[_FIRST : _FIRST + self.partitions])

    def last(self) -> list[int]:
        """Per partition, the last offset it handled (-1: none)."""
        return list(self.slots()[_FIRST + self.partitions :])

    def wait_up(self) -> None:
        """Wait for the first record: the moment this process is up."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            slots = self.slots()
            if slots[0]:
                self.life.up = slots[0] / 1e9
                self.tid = int(slots[1])
                self._queued_at_up = self._queued()
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited {self.proc.returncode} before its first record:\n{tail(self.life.log)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker handled no record within {START_TIMEOUT_S:.0f} s:\n{tail(self.life.log)}"
                )
            time.sleep(0.002)

    def _queued(self) -> int:
        """Nanoseconds the processing thread waited for a core (``/proc/PID/task/TID/schedstat``)."""
        try:
            return int(Path(f"/proc/{self.proc.pid}/task/{self.tid}/schedstat").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return self._queued_at_up

    def _ended(self) -> None:
        self.life.end = time.monotonic()
        self.life.queued = (self._queued() - self._queued_at_up) / 1e9

    def kill(self) -> None:
        """SIGKILL it (a crash), if it still runs."""
        if self.proc.poll() is not None:
            return
        self._ended()
        self.proc.kill()
        self.proc.wait()
        self.life.killed = True

    def stop(self) -> int:
        """SIGTERM it (a clean stop: everything finished is committed); its exit code."""
        self._ended()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT_S)


@dataclass
class Result:
    """What one run measured over its window."""

    config: Config
    wall: float
    available: float
    up: float
    processed: int
    progress: int
    crashes: int
    downtimes: list[float]
    #: The re-read after the last crash was cut short by the catch-up cap.
    cut_short: bool = False
    #: Adaptive: intervals the policy chose (seconds, from its log lines) and MTBFs it learned.
    intervals: list[float] = field(default_factory=list)
    learned_mtbf: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def reread(self) -> int:
        return self.processed - self.progress

    @property
    def rate(self) -> float:
        """Records processed per available second."""
        return self.processed / self.available if self.available > 0 else 0.0

    @property
    def goodput(self) -> float:
        return self.progress / self.wall if self.wall > 0 else 0.0


@dataclass
class Costs:
    """A result's costs against its baseline rate (see the module docstring)."""

    overhead: float
    reread_records: float
    reread_seconds: float
    reread: float

    @property
    def total(self) -> float:
        return self.overhead + self.reread


def costs(result: Result, r0: float, mtbf: float) -> Costs:
    overhead = 1.0 - result.rate / r0
    per_crash = result.reread / result.crashes if result.crashes else 0.0
    seconds = per_crash / r0
    return Costs(overhead, per_crash, seconds, seconds / mtbf)


# -- the worker processes -------------------------------------------------------------------------


class Runner:
    """Starts, kills and measures the worker processes of one run."""

    def __init__(self, args: argparse.Namespace, topic: BenchTopic, work_us: float, workdir: Path) -> None:
        self.bootstrap: str = args.bootstrap
        self.topic = topic
        self.partitions = len(topic.lows)
        self.stride = max(topic.records // self.partitions + 1, 1)
        self.work_us = work_us
        self.workdir = workdir
        self.counts = workdir / "counts"

    # - counters and marks -

    def reset_counts(self) -> None:
        with self.counts.open("wb") as file:
            file.truncate(2 * self.partitions * self.stride)

    def read_counts(self) -> array.array[int]:
        values = array.array("H")
        values.frombytes(self.counts.read_bytes())
        return values

    # - processes -

    def environment(self, group: str, config: Config, mark: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMER_", "ECON_"))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(
            {
                "STREAMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
                "STREAMER_KAFKA__GROUP_ID": group,
                # Static membership: a restarted worker takes the killed one's place at once.
                "STREAMER_KAFKA__CLIENT": json.dumps({"group.instance.id": f"{group}-worker"}),
                "STREAMER_METRICS__ENABLED": "false",
                "STREAMER_LOG_LEVEL": "INFO",
                "STREAMER_LOG_FORMAT": "json",
                "ECON_TOPIC": self.topic.name,
                "ECON_WORK_US": f"{self.work_us:g}",
                "ECON_COUNTS": str(self.counts),
                "ECON_STRIDE": str(self.stride),
                "ECON_MARK": str(mark),
                "ECON_PARTITIONS": str(self.partitions),
            }
        )
        env.update({f"STREAMER_COMMIT__{k}": v for k, v in config.commit.items()})
        return env

    def start(self, group: str, config: Config, index: int) -> Process:
        """Start a worker process and wait for its first record."""
        mark = self.workdir / f"mark-{index}"
        mark.write_bytes(array.array("q", [0, 0] + [-1] * (2 * self.partitions)).tobytes())
        log = self.workdir / f"worker-{index}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamer", "run", APP, "--no-progress"],
                env=self.environment(group, config, mark),
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = Process(proc, mark, Life(spawned=time.monotonic(), log=log), self.partitions)
        try:
            process.wait_up()
        except BaseException:
            process.kill()
            raise
        return process

    def committed(self, group: str) -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, "log_level": 2})
        try:
            parts = consumer.committed(
                [TopicPartition(self.topic.name, p) for p in range(self.partitions)], timeout=10
            )
        finally:
            consumer.close()
        return {tp.partition: max(tp.offset, self.topic.lows.get(tp.partition, 0)) for tp in parts}

    # - one run -

    def run(
        self, group: str, config: Config, draws: Sequence[float], budget: float, *, crashes: bool = True
    ) -> Result:
        """Run ``config``: warm-up, then the window of ``budget`` seconds (see the module docstring)."""
        self.reset_counts()
        draw = iter(draws)
        process = self.start(group, config, 0)
        chain = [process.life]  # the warm-up (with crashes), then the processes of the window
        try:
            if crashes:  # the warm-up process, outside the window
                time.sleep(max(process.life.up + next(draw) - time.monotonic(), 0.0))
                process.kill()
                window_start = process.life.end
                start_counts = self.read_counts()
                start = self.committed(group)  # nothing commits between the kill and the restart
                process = self.start(group, config, len(chain))
                chain.append(process.life)
            else:
                window_start = process.life.up
                start_counts = array.array("H")
                start = dict.fromkeys(range(self.partitions), -1)  # the first offsets it handles
            first = process
            highest = [-1] * self.partitions  # last offset handled by any earlier process
            while True:
                kill_at = process.life.up + next(draw) if crashes else math.inf
                if kill_at >= window_start + budget:
                    break
                time.sleep(max(kill_at - time.monotonic(), 0.0))
                process.kill()
                highest = [max(h, x) for h, x in zip(highest, process.last(), strict=True)]
                process = self.start(group, config, len(chain))
                chain.append(process.life)
            time.sleep(max(window_start + budget - time.monotonic(), 0.0))
            cut_short = not caught_up(process, highest, time.monotonic() + budget / 4)
            code = process.stop()
        finally:
            process.kill()
        counts = self.read_counts()
        committed = self.committed(group)
        resumed = first.resumed()
        for p, offset in start.items():
            if offset < 0:  # a fresh group: the first offset handled (none handled: no progress)
                start[p] = resumed[p] if resumed[p] >= 0 else committed[p]
        measured = chain[1:] if crashes else chain
        up = sum(one.end - one.up for one in measured)
        result = Result(
            config,
            wall=process.life.end - window_start,
            available=up - sum(one.queued for one in measured),
            up=up,
            processed=sum(counts) - sum(start_counts),
            progress=sum(committed[p] - start[p] for p in range(self.partitions)),
            crashes=sum(1 for one in chain if one.killed),
            downtimes=[b.up - a.end for a, b in itertools.pairwise(chain) if a.killed],
            cut_short=cut_short,
            problems=self.check(counts, committed, code, cut_short=cut_short),
        )
        if config.adaptive:
            for one in measured:
                intervals, mtbfs = adaptive_log(one.log)
                result.intervals += intervals
                result.learned_mtbf += mtbfs
        return result

    def check(
        self, counts: array.array[int], committed: dict[int, int], code: int, *, cut_short: bool
    ) -> list[str]:
        """What the clean stop promises: everything processed committed, nothing skipped (when the
        last process did not get back to where the crashes left off, records past the committed
        offsets were processed by the killed ones: expected, and marked * instead)."""
        problems = [] if code == 0 else [f"last worker exited {code}"]
        for p in range(self.partitions):
            low = self.topic.lows.get(p, 0)
            row = counts[p * self.stride : (p + 1) * self.stride]
            upto = committed[p] - low
            if upto > 0 and min(row[:upto]) == 0:
                problems.append(f"partition {p}: a record below the committed offset was never processed")
            if not cut_short and any(row[upto:]):
                problems.append(
                    f"partition {p}: records past the committed offset {committed[p]} were processed"
                )
            if committed[p] >= low + self.stride - 1:
                problems.append(f"partition {p}: the topic ran out (make it larger)")
        return problems


def caught_up(process: Process, highest: list[int], deadline: float) -> bool:
    """Let the last process re-read what the last crash left (up to ``deadline``): whether it did."""
    while not all(x >= h for x, h in zip(process.last(), highest, strict=True)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def adaptive_log(log: Path | None) -> tuple[list[float], list[float]]:
    """The intervals an adaptive worker chose and the MTBFs it learned, from its JSON log."""
    intervals: list[float] = []
    mtbfs: list[float] = []
    if log is None or not log.exists():
        return intervals, mtbfs
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "commit interval changed":
            intervals.append(float(entry["every_seconds"]))
            if "mtbf_seconds" in entry:
                mtbfs.append(float(entry["mtbf_seconds"]))
    return intervals, mtbfs


def tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# -- the script -----------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--mtbf", default="2,6", help="mean up seconds between crashes, two (default 2,6)")
    parser.add_argument("--work-us", default="20,200", help="CPU us per record, two (default 20,200)")
    parser.add_argument("--budget", type=float, default=25.0, help="seconds of window per run (default 25)")
    parser.add_argument(
        "--baseline-budget", type=float, default=12.0, help="seconds of each baseline run (default 12)"
    )
    parser.add_argument(
        "--baselines", type=int, default=3, help="baseline runs per per-record cost (default 3)"
    )
    parser.add_argument("--seed", type=int, help="seed of the crash schedules (default: random, printed)")
    parser.add_argument(
        "--adaptive-min",
        type=float,
        default=0.001,
        help="adaptive_min_seconds of the adaptive row (default 0.001)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=1,
        help=(
            "partitions of the topics (default 1: with more, a restarted worker may read seconds of "
            "one partition's prefetched records before another's first, which no interval causes)"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="short budgets: a smoke run of ~4 minutes")
    parser.add_argument("--keep", action="store_true", help="keep topics, groups and worker logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.baseline_budget, args.baselines = 4.0, 3.0, 1
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    return args


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def topic_records(work_us: float, args: argparse.Namespace) -> int:
    """Records enough for the fastest run at ``work_us``: the baseline's window, or a crash run's
    warm-up, window and catch-up, at 2 us of framework per record (the real figure is ~3.5)."""
    seconds = max(args.baseline_budget, 1.25 * args.budget + 3 * max(numbers(args.mtbf)))
    return int(1.3 * seconds / ((work_us + 2.0) * 1e-6))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print_context(args.bootstrap)
    mtbfs, works = numbers(args.mtbf), numbers(args.work_us)
    rows = configs(args.adaptive_min)
    conditions = [Condition(m, w) for w in works for m in mtbfs]
    print(
        f"seed {args.seed}; {len(conditions)} conditions x {len(rows)} configurations, "
        f"window {args.budget:g} s each (after a warm-up crash), {args.baselines} baseline run(s) of "
        f"{args.baseline_budget:g} s per per-record cost; restarts at once, static membership",
        flush=True,
    )
    resources = Resources(args.bootstrap, keep=args.keep)
    workdir = Path(tempfile.mkdtemp(prefix="bench-economics-"))
    results: dict[Condition, list[Result]] = {}
    baselines: dict[float, list[Result]] = {}
    started = time.monotonic()
    try:
        for work in works:
            topic = make_topic(args, resources, topic_records(work, args))
            runner = Runner(args, topic, work, workdir)
            plan: list[tuple[Condition | None, Config | None]] = []
            blocks = [[(Condition(m, work), row) for row in rows] for m in mtbfs]
            # Baselines before, between and after the blocks of one MTBF each: drift shows.
            for i in range(args.baselines):
                plan.append((None, None))
                if i < len(blocks):
                    plan.extend(blocks[i])
            for block in blocks[args.baselines :]:
                plan.extend(block)
            for condition, row in plan:
                if condition is None or row is None:
                    group = resources.group("bench-economics")
                    result = runner.run(group, BASELINE, [], args.baseline_budget, crashes=False)
                    baselines.setdefault(work, []).append(result)
                    print(
                        f"  [{time.monotonic() - started:5.0f} s] {work:g} us  baseline: "
                        f"{result.rate:,.0f} rec/s available ({result.processed:,} rec in "
                        f"{result.available:.1f} of {result.up:.1f} s up)",
                        flush=True,
                    )
                    continue
                rng = random.Random(f"{args.seed}/{condition.mtbf:g}/{condition.work_us:g}")
                draws = [rng.expovariate(1.0 / condition.mtbf) for _ in range(10_000)]
                group = resources.group("bench-economics")
                result = runner.run(group, row, draws, args.budget)
                results.setdefault(condition, []).append(result)
                note = f"  PROBLEMS: {'; '.join(result.problems)}" if result.problems else ""
                print(
                    f"  [{time.monotonic() - started:5.0f} s] {condition.label}  {row.label:<20} "
                    f"{result.crashes} crashes, processed {result.processed:,}, re-read {result.reread:,}, "
                    f"goodput {result.goodput:,.0f} rec/s{note}",
                    flush=True,
                )
        met = report(args, conditions, results, baselines)
    finally:
        # Static members do not leave the group when they stop: wait out the session of the
        # last one before deleting the groups.
        time.sleep(0 if args.keep else 9)
        resources.cleanup()
        if args.keep:
            print(f"worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if met else 1


def make_topic(args: argparse.Namespace, resources: Resources, records: int) -> BenchTopic:
    name = unique("bench-economics")
    resources.used.append(name)
    create_topic(args.bootstrap, name, args.partitions)
    resources.topics.append(name)
    seconds = fill_topic(args.bootstrap, name, records, args.partitions, 100)
    marks = watermarks(args.bootstrap, name) or {}
    print(
        f"filled topic {name}: {records:,} records, {args.partitions} partitions, in {seconds:.1f} s",
        flush=True,
    )
    return BenchTopic(name, records, created=True, lows={p: low for p, (low, _) in marks.items()})


def report(
    args: argparse.Namespace,
    conditions: list[Condition],
    results: dict[Condition, list[Result]],
    baselines: dict[float, list[Result]],
) -> bool:
    """Print one table per condition and the goal check; True when the goal is met everywhere."""
    verdicts: list[tuple[Condition, float, float, str, bool]] = []
    for condition in conditions:
        base = baselines[condition.work_us]
        rates = [b.rate for b in base]
        r0 = statistics.fmean(rates)
        spread = (max(rates) / min(rates) - 1) if len(rates) > 1 else float("nan")
        table: list[Sequence[object] | str] = []
        fixed: list[tuple[float, str]] = []
        adaptive_total = math.nan
        for result in results[condition]:
            c = costs(result, r0, condition.mtbf)
            if result.config.adaptive:
                adaptive_total = c.total
                interval = adaptive_interval(result, r0)
            else:
                fixed.append((c.total, result.config.label))
                interval = ""
            flags = ("*" if result.cut_short else "") + ("!" if result.problems else "")
            table.append(
                (
                    result.config.label + flags,
                    interval,
                    f"{result.goodput:,.0f}",
                    f"{result.rate:,.0f}",
                    f"{c.overhead * 100:+.1f}",
                    f"{result.crashes}",
                    f"{c.reread_records:,.0f}",
                    f"{c.reread_seconds * 1000:,.0f}",
                    f"{c.reread * 100:.1f}",
                    f"{c.total * 100:.1f}",
                    f"{statistics.fmean(result.downtimes):.2f}" if result.downtimes else "",
                )
            )
        print_table(
            (
                "commit interval",
                "adaptive chose",
                "goodput rec/s",
                "rate rec/s",
                "overhead %",
                "crashes",
                "re-read rec/crash",
                "ms/crash",
                "re-read %",
                "total %",
                "restart s",
            ),
            table,
            title=(
                f"{condition.label}: baseline r0 {r0:,.0f} rec/s per available second "
                f"({len(rates)} run(s), spread {spread * 100:.1f} %), window {args.budget:g} s per row"
            ),
        )
        best_total, best_label = min(fixed)
        ok = adaptive_total <= best_total * (1 + GOAL) if best_total > 0 else adaptive_total <= best_total
        verdicts.append((condition, adaptive_total, best_total, best_label, ok))
    print(
        "\ngoodput: records durably committed per wall second of the window (restarts included); rate: "
        "records processed\nper available up second (up time less the processing thread's wait for a "
        "core); overhead: 1 - rate / r0;\nre-read: records processed again per crash (processed - durable "
        "progress, / crashes), ms/crash: that / r0;\nre-read %: ms/crash / MTBF; total % = overhead + "
        "re-read % (of up time); restart s: SIGKILL to the restarted\nworker's first record (left out of the "
        "costs). * the last crash's re-read was cut short; ! see the problems above."
    )
    all_downtimes = [d for rs in results.values() for r in rs for d in r.downtimes]
    if all_downtimes:
        print(
            f"restart downtime over {len(all_downtimes)} restarts: median "
            f"{statistics.median(all_downtimes):.2f} s, max {max(all_downtimes):.2f} s "
            "(not counted as a cost of any interval)"
        )
    print(f"\ngoal: adaptive total cost <= {1 + GOAL:.1f} x the best fixed interval's (seed {args.seed})")
    for condition, adaptive_total, best_total, best_label, ok in verdicts:
        ratio = adaptive_total / best_total if best_total > 0 else math.nan
        print(
            f"  {condition.label:<28} adaptive {adaptive_total * 100:5.2f} %, "
            f"best fixed {best_total * 100:5.2f} % ({best_label}): ratio {ratio:.2f}  "
            f"{'met' if ok else 'NOT met'}"
        )
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    return all(ok for *_, ok in verdicts)


def adaptive_interval(result: Result, r0: float) -> str:
    """The median interval the adaptive policy chose, in seconds and in records at r0."""
    if not result.intervals:
        return "?"
    seconds = statistics.median(result.intervals)
    return f"{seconds * 1000:,.1f} ms ~{seconds * r0:,.0f} rec"


if __name__ == "__main__":
    sys.exit(main())

"""streamer against its peers: one pre-filled topic read by (a) a bare confluent-kafka loop, (b) the
streamer Worker with a no-op handler and (c) Quix Streams with a no-op per-record function, each at
its shipped settings, each run in a process of its own, interleaved over rounds.

    .venv/bin/python -m bench.peers                        # 1,000,000 records x 100 B, 3 rounds
    .venv/bin/python -m bench.peers --records 100000 --repeat 1
    .venv/bin/python -m bench.peers --work-us 10           # every contestant spins 10 µs per record

Quix Streams pins its own confluent-kafka, so it runs from a venv of its own, ``bench/.venv-peers``
(git-ignored), which this script creates on first use with the newest ``quixstreams`` that
installs; by hand: ``.venv/bin/python -m venv bench/.venv-peers && bench/.venv-peers/bin/pip
install quixstreams``. The contestants, per run (each a fresh consumer group, reading the whole
topic from its start):

- raw: ``bench._common.raw_run`` (``consume(500, 0.5)``, streamer's own librdkafka settings);
- streamer: ``bench._common.worker_run``, no-op handler, shipped settings;
- quix: ``Application(broker_address, consumer_group, auto_offset_reset="earliest")``, its
  defaults otherwise, ``app.topic(name, value_deserializer="bytes")`` (the values are not JSON,
  Quix's default format) and ``sdf.update(f)``, where ``f`` counts the records and calls
  ``app.stop()`` at the last one (the Application then commits and closes its consumer).

rec/s runs from the first record to the last one handled (group join excluded), as in the other
scripts; CPU µs/rec is the child's own process time (every thread) from creating its consumer
(Quix: its Application) to closing it; child CPU s is the whole child process (start-up and
imports included: getrusage(RUSAGE_CHILDREN) deltas). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._common import (
    BenchTopic,
    Resources,
    Run,
    base_parser,
    fmt_rate,
    prepare_topic,
    print_context,
    print_table,
    raw_run,
    worker_run,
)
from streamer.logs import configure_logging

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".venv-peers"
#: issue 14's goal: streamer at its shipped settings reads at least this many times as fast as Quix.
GOAL = 2.0
#: The line a child prints its result on.
RESULT = "RESULT "

#: The Quix Streams contestant, run by the peers venv's Python (it cannot import streamer):
#: argv = bootstrap, topic, records, group, work µs per record.
QUIX_CHILD = '''
import json, sys, time

from quixstreams import Application

bootstrap, name, group = sys.argv[1], sys.argv[2], sys.argv[4]
expected, work_s = int(sys.argv[3]), float(sys.argv[5]) / 1e6
clock = time.perf_counter
seen, first, last, spent = 0, 0.0, 0.0, 0.0


def on_record(value):
    """The no-op per-record function: counts, spins work_s (timed), stops the app at the last record."""
    global seen, first, last, spent
    if not seen:
        first = clock()
    if work_s:
        before = clock()
        deadline = before + work_s
        while clock() < deadline:
            pass
        spent += clock() - before
    seen += 1
    if seen == expected:
        last = clock()
        app.stop()


started, cpu = clock(), time.process_time()
app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest")
sdf = app.dataframe(app.topic(name, value_deserializer="bytes"))
sdf.update(on_record)
app.run()
result = {
    "label": "quix", "records": seen, "seconds": last - first, "wall": clock() - started,
    "cpu": time.process_time() - cpu, "work_seconds": spent, "work_calls": seen if work_s else 0,
}
print("RESULT " + json.dumps(result), flush=True)
'''


@dataclass(frozen=True)
class Contestant:
    """One row: how its child process is started."""

    kind: str  # "raw", "streamer", "quix"
    label: str


@dataclass
class Outcome:
    """A contestant's runs, by round (None: the run failed), the child CPU and the errors."""

    runs: list[Run | None] = field(default_factory=list)
    child_cpu: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r is not None]


# -- the children -------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """``--child raw|streamer``: one measured run in this process; print its result."""
    configure_logging("WARNING")
    lows = {int(p): low for p, low in json.loads(args.lows).items()}
    topic = BenchTopic(args.topic, args.records, created=False, lows=lows)
    work_s = args.work_us / 1e6
    if args.child == "raw":
        run = raw_run(args.bootstrap, topic, args.group, work_s=work_s)
    else:
        run = worker_run(args.bootstrap, topic, args.group, label="streamer", work_s=work_s)
    print(RESULT + json.dumps(asdict(run)), flush=True)
    return 0


def command(kind: str, args: argparse.Namespace, topic: BenchTopic, group: str) -> list[str]:
    """The command line of one contestant's child process."""
    if kind == "quix":
        python = str(VENV / "bin" / "python")
        return [
            python,
            "-c",
            QUIX_CHILD,
            args.bootstrap,
            topic.name,
            str(topic.records),
            group,
            str(args.work_us),
        ]
    return [
        *(sys.executable, "-m", "bench.peers", "--child", kind, "--bootstrap", args.bootstrap),
        *("--topic", topic.name, "--records", str(topic.records), "--group", group),
        *("--lows", json.dumps(topic.lows), "--work-us", str(args.work_us)),
    ]


def measure(cmd: list[str], records: int) -> tuple[Run | None, float, str]:
    """Run one child (killed after a deadline): its run (None if it failed), its process CPU
    seconds and what went wrong."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    deadline = 60 + records / 1000
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch:  # Quix's state dir lands here
        try:
            done = subprocess.run(
                cmd,
                cwd=ROOT if cmd[0] == sys.executable else scratch,
                capture_output=True,
                text=True,
                timeout=deadline,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, 0.0, f"no result after {deadline:.0f} s: killed"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return None, cpu, f"exit code {done.returncode}: {tail}"
    run = Run(**json.loads(lines[-1][len(RESULT) :]))
    if run.records != records:
        return None, cpu, f"read {run.records:,} of {records:,} records"
    return run, cpu, ""


# -- the Quix venv ------------------------------------------------------------------------------


def ensure_venv() -> dict[str, str]:
    """Create ``bench/.venv-peers`` with quixstreams if it is not there; the versions in it."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV.relative_to(ROOT)} with the newest quixstreams (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "quixstreams"], check=True)
    # version() is a string in recent confluent-kafka releases, a (text, int) tuple in older ones.
    probe = (
        "import json, confluent_kafka, quixstreams; text = lambda v: v[0] if isinstance(v, tuple) else v; "
        "print(json.dumps({'quixstreams': quixstreams.__version__, "
        "'confluent-kafka': text(confluent_kafka.version()), "
        "'librdkafka': text(confluent_kafka.libversion())}))"
    )
    shown = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout
    versions: dict[str, str] = json.loads(shown)
    return versions


# -- the table ----------------------------------------------------------------------------------


def ratios(runs: list[Run | None], base: list[Run | None]) -> list[float]:
    """Per round in which both ran: the rate of ``runs`` over the rate of ``base``."""
    return [r.rate / b.rate for r, b in zip(runs, base, strict=True) if r is not None and b is not None]


def report(contestants: list[Contestant], outcomes: dict[str, Outcome], args: argparse.Namespace) -> bool:
    """Print the table and the goal check; True when a run failed."""
    raw = outcomes["raw"].runs
    work = ("work µs/call",) if args.work_us else ()
    rows = []
    for c in contestants:
        out = outcomes[c.kind]
        runs = out.done
        if not runs:
            rows.append((c.label, 0, "failed", "-", "-", "-", "-", "-", *("-" for _ in work)))
            continue
        to_raw = ratios(out.runs, raw)
        rows.append(
            (
                c.label,
                len(runs),
                fmt_rate(statistics.median(r.rate for r in runs)),
                fmt_rate(max(r.rate for r in runs)),
                f"{statistics.median(to_raw):.2f}" if to_raw else "-",
                f"{statistics.median(r.cpu_us for r in runs):.2f}",
                f"{statistics.median(out.child_cpu):.1f}",
                f"{statistics.median(r.wall for r in runs):.2f}",
                *((f"{statistics.median(r.work_us for r in runs):.2f}",) if work else ()),
            )
        )
    handler = f"{args.work_us:g} µs of work per record" if args.work_us else "no-op per record"
    print_table(
        (
            "",
            "runs",
            "median rec/s",
            "best rec/s",
            "x raw",
            "CPU µs/rec",
            "child CPU s",
            "median wall s",
            *work,
        ),
        rows,
        title=(
            f"{args.records:,} records, {handler}; medians over {args.repeat} round(s); x raw: median of the "
            "per-round ratio to the raw loop of the same round;\nCPU µs/rec: the child's process time, "
            "consumer created to closed; child CPU s: the whole child process (start-up and imports included)"
        ),
    )
    if work:
        print(
            f"\nwork µs/call: the measured time inside the spin({args.work_us:g} µs) calls (perf_counter "
            "around each call, summed over the run, / calls)"
        )
    versus = ratios(outcomes["streamer"].runs, outcomes["quix"].runs)
    if versus:
        ratio = statistics.median(versus)
        verdict = "met" if ratio >= GOAL else "NOT met"
        print(
            f"\nstreamer / Quix: {ratio:.2f} (median of the per-round ratios "
            f"{', '.join(f'{x:.2f}' for x in versus)}); goal >= {GOAL:g}: {verdict}"
        )
    failed = False
    for c in contestants:
        for error in outcomes[c.kind].errors:
            failed = True
            print(f"FAILED run of {c.label}: {error}")
    return failed


# -- main ---------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=1_000_000, repeat=3)
    parser.add_argument(
        "--work-us",
        type=float,
        default=0.0,
        help="simulated work per record, in microseconds, in every contestant (default 0: no-op)",
    )
    # A child process of this script (one measured run of raw or streamer): not for direct use.
    parser.add_argument("--child", choices=("raw", "streamer"), help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--lows", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table; 0, or 1 when a run failed."""
    args = parse(argv)
    if args.child:
        return child(args)
    configure_logging("WARNING")
    print_context(args.bootstrap)
    versions = ensure_venv()
    quix = f"Quix Streams {versions['quixstreams']}"
    print(
        f"peers: {quix} in {VENV.relative_to(ROOT)} (confluent-kafka {versions['confluent-kafka']}, "
        f"librdkafka {versions['librdkafka']})"
    )
    work = f"spinning {args.work_us:g} µs" if args.work_us else "no-op"
    contestants = [
        Contestant("raw", "(a) raw confluent-kafka loop" + (f", {work}" if args.work_us else "")),
        Contestant("streamer", f"(b) streamer Worker, {work} handler"),
        Contestant("quix", f"(c) {quix}, {work} update()"),
    ]
    outcomes = {c.kind: Outcome() for c in contestants}
    resources = Resources(args.bootstrap, keep=args.keep)
    try:
        topic = prepare_topic(args, resources, args.records)
        args.records = topic.records
        print(
            f"\n{args.repeat} round(s) over {len(contestants)} contestants, rotating the order, each run "
            "in a fresh group and a process of its own:",
            flush=True,
        )
        for i in range(1, args.repeat + 1):
            shift = (i - 1) % len(contestants)
            for c in contestants[shift:] + contestants[:shift]:
                group = resources.group(f"bench-peers-{c.kind}")
                started = time.perf_counter()
                run, cpu, error = measure(command(c.kind, args, topic, group), topic.records)
                out = outcomes[c.kind]
                out.runs.append(run)
                if run is None:
                    out.errors.append(f"#{i} {error}")
                    print(f"  #{i} {c.kind:<9} FAILED after {time.perf_counter() - started:.0f} s: {error}")
                    continue
                out.child_cpu.append(cpu)
                print(
                    f"  #{i} {c.kind:<9} {run.records:>9,} rec  {run.seconds:7.3f} s  "
                    f"{fmt_rate(run.rate):>9} rec/s  wall {run.wall:6.2f} s  CPU {run.cpu_us:5.2f} µs/rec  "
                    f"child CPU {cpu:5.1f} s",
                    flush=True,
                )
        failed = report(contestants, outcomes, args)
    finally:
        resources.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the streamer Worker (no-op handler, default commits) against a bare
confluent-kafka loop over the same pre-filled topic, measured in the same run.

    .venv/bin/python -m bench.throughput                 # 1,000,000 records x 100 B, 3 partitions
    .venv/bin/python -m bench.throughput --records 50000 --repeat 2
    .venv/bin/python -m bench.throughput --topic bench-1m --keep   # fill once, reuse afterwards

See bench/README.md for what the columns mean.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._common import (
    BenchTopic,
    Resources,
    Run,
    base_parser,
    best,
    busy_handler,
    fmt_rate,
    median,
    prepare_topic,
    print_context,
    print_table,
    progress,
    raw_run,
    worker_run,
)
from streamer.logs import configure_logging
from streamer.message import Message

GOAL = 0.8


def main(argv: list[str] | None = None) -> int:
    configure_logging("WARNING")
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=1_000_000, repeat=3)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the measurements, run the worker once more under cProfile and print the top N "
        "functions by own time (the profiler slows Python code several-fold; read proportions only)",
    )
    parser.add_argument(
        "--work-us",
        type=float,
        default=0.0,
        help="simulated handler work per record, in microseconds, in both loops (default 0: no-op)",
    )
    args = parser.parse_args(argv)
    work_s = args.work_us / 1e6
    print_context(args.bootstrap)
    resources = Resources(args.bootstrap, keep=args.keep)
    try:
        topic = prepare_topic(args, resources, args.records)
        runs: dict[str, list[Run]] = {"raw": [], "worker": []}
        print(f"\n{args.repeat} x (raw, worker), alternating, each in a fresh consumer group:")
        for i in range(1, args.repeat + 1):
            # Alternate which goes first, so that a drift in machine load favours neither.
            order = ("raw", "worker") if i % 2 else ("worker", "raw")
            for kind in order:
                group = resources.group(f"bench-tp-{kind}")
                run = (
                    raw_run(args.bootstrap, topic, group, work_s=work_s)
                    if kind == "raw"
                    else worker_run(args.bootstrap, topic, group, handler=busy_handler(work_s))
                )
                runs[kind].append(run)
                progress(run, i)
        report(runs, topic.records, args.work_us)
        if args.profile:
            profile_worker(args.bootstrap, topic, resources, args.profile, busy_handler(work_s))
    finally:
        resources.cleanup()
    return 0


def report(runs: dict[str, list[Run]], records: int, work_us: float) -> None:
    raw, worker = runs["raw"], runs["worker"]
    rows = []
    handler = f"{work_us:g} us of work per record" if work_us else "no-op handler"
    for name, kind in (("raw confluent-kafka loop", raw), (f"streamer Worker, {handler}", worker)):
        rows.append(
            (
                name,
                len(kind),
                fmt_rate(best(kind)),
                fmt_rate(median(kind)),
                f"{min(r.seconds for r in kind):.2f}",
                f"{min(r.wall for r in kind):.2f}",
                f"{sorted(r.wall for r in kind)[len(kind) // 2]:.2f}",
                f"{statistics.median(r.cpu_us for r in kind):.2f}",
            )
        )
    ratio_best, ratio_median = best(worker) / best(raw), median(worker) / median(raw)
    rows.append(("worker / raw", "", f"{ratio_best:.2f}", f"{ratio_median:.2f}", "", "", "", ""))
    print_table(
        ("", "runs", "best rec/s", "median rec/s", "best s", "best wall s", "median wall s", "CPU µs/rec"),
        rows,
        title=f"{records:,} records; rec/s from the first record received to the last (group join excluded)",
    )
    commits = [r.commits for r in worker]
    drains = [r.settled - r.seconds for r in worker]
    print(
        f"\nworker, default commits (every 1,000 records / 5 s): {min(commits):,}-{max(commits):,} commits "
        "per run (incl. the final synchronous ones);\n"
        f"after the last record, {min(drains):.2f}-{max(drains):.2f} s "
        f"waiting for queued commits; up to {max(r.max_unacked for r in worker):,} records processed "
        "but not yet acknowledged as committed"
    )
    verdict = "met" if ratio_median >= GOAL else "NOT met"
    print(
        f"goal worker/raw >= {GOAL:.2f}: {verdict} (median ratio {ratio_median:.2f}, best {ratio_best:.2f})"
    )


def profile_worker(
    bootstrap: str, topic: BenchTopic, resources: Resources, top: int, handler: Callable[[Message], None]
) -> None:
    profiler = cProfile.Profile()

    def profiled(run: Callable[[], int]) -> int:
        profiler.enable()
        try:
            return run()
        finally:
            profiler.disable()

    started = time.perf_counter()
    run = worker_run(bootstrap, topic, resources.group("bench-tp-profile"), handler=handler, wrap=profiled)
    print(
        f"\ncProfile of one worker run ({run.records:,} records, {time.perf_counter() - started:.1f} s "
        f"under the profiler), top {top} by own time:\n"
    )
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    print(text[text.find("   ncalls") :].rstrip())


if __name__ == "__main__":
    sys.exit(main())

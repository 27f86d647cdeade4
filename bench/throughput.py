"""Throughput of the streamer Worker (no-op handler, default commits) against a bare
confluent-kafka loop over the same pre-filled topic, measured in the same run.

Each pass also runs the raw loop at ``fetch.queue.backoff.ms`` = 1,000 ms (librdkafka's own
default) and 10 ms, next to the raw loop at streamer's shipped settings: the throttle check, which
shows whether the baseline itself is held back by a client setting.

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
    LIBRDKAFKA_BACKOFF_MS,
    BenchTopic,
    Resources,
    Run,
    base_parser,
    best,
    fmt_rate,
    kafka_settings,
    median,
    prepare_topic,
    print_context,
    print_table,
    progress,
    raw_run,
    worker_run,
)
from streamer.logs import configure_logging
from streamer.settings import CommitSettings
from streamer.source import consumer_config

GOAL = 0.8
#: The throttle check: the raw loop again at these fetch.queue.backoff.ms (librdkafka's default, 10).
BACKOFFS_MS = (LIBRDKAFKA_BACKOFF_MS, 10)
#: A raw loop this much faster at 10 ms than at the shipped settings is called throttled.
THROTTLED = 1.2


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
        throttle: dict[int, list[Run]] = {ms: [] for ms in BACKOFFS_MS}
        print(
            f"\n{args.repeat} x (raw, worker), alternating, then the raw loop at fetch.queue.backoff.ms "
            f"{' and '.join(f'{ms:,}' for ms in BACKOFFS_MS)} ms (the throttle check), each in a fresh "
            "consumer group:"
        )
        for i in range(1, args.repeat + 1):
            # Alternate which goes first, so that a drift in machine load favours neither.
            order = ("raw", "worker") if i % 2 else ("worker", "raw")
            for kind in order:
                group = resources.group(f"bench-tp-{kind}")
                run = (
                    raw_run(args.bootstrap, topic, group, work_s=work_s)
                    if kind == "raw"
                    else worker_run(args.bootstrap, topic, group, work_s=work_s)
                )
                runs[kind].append(run)
                progress(run, i)
            for ms in BACKOFFS_MS if i % 2 else reversed(BACKOFFS_MS):
                group = resources.group("bench-tp-raw")
                client = {"fetch.queue.backoff.ms": ms}
                run = raw_run(
                    args.bootstrap, topic, group, work_s=work_s, client=client, label=f"raw {ms} ms"
                )
                throttle[ms].append(run)
                progress(run, i)
        report(runs, topic.records, args.work_us)
        report_throttle(runs["raw"], throttle, args.bootstrap)
        if args.profile:
            profile_worker(args.bootstrap, topic, resources, args.profile, work_s)
    finally:
        resources.cleanup()
    return 0


def report(runs: dict[str, list[Run]], records: int, work_us: float) -> None:
    raw, worker = runs["raw"], runs["worker"]
    rows = []
    handler = f"{work_us:g} us of work per record" if work_us else "no-op handler"
    # With simulated work, the measured time per spin call in each loop: the same handler code
    # should take as long inside the worker as outside it.
    work = ("work µs/call",) if work_us else ()
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
                *((f"{statistics.median(r.work_us for r in kind):.2f}",) if work_us else ()),
            )
        )
    ratio_best, ratio_median = best(worker) / best(raw), median(worker) / median(raw)
    rows.append(
        ("worker / raw", "", f"{ratio_best:.2f}", f"{ratio_median:.2f}", "", "", "", "", *("" for _ in work))
    )
    print_table(
        (
            "",
            "runs",
            "best rec/s",
            "median rec/s",
            "best s",
            "best wall s",
            "median wall s",
            "CPU µs/rec",
            *work,
        ),
        rows,
        title=f"{records:,} records; rec/s from the first record received to the last (group join excluded)",
    )
    if work_us:
        print(
            f"\nwork µs/call: the median over runs of the time inside the spin({work_us:g} µs) calls "
            "(perf_counter around each call, summed over the run, / calls)"
        )
    commits = [r.commits for r in worker]
    shipped = CommitSettings()
    drains = [r.settled - r.seconds for r in worker]
    print(
        f"\nworker, shipped commits (every {shipped.every_records:,} records / {shipped.every_seconds:g} s): "
        f"{min(commits):,}-{max(commits):,} commits "
        "per run (incl. the final synchronous ones);\n"
        f"after the last record, {min(drains):.2f}-{max(drains):.2f} s "
        f"waiting for queued commits; up to {max(r.max_unacked for r in worker):,} records processed "
        "but not yet acknowledged as committed"
    )
    verdict = "met" if ratio_median >= GOAL else "NOT met"
    print(
        f"goal worker/raw >= {GOAL:.2f}: {verdict} (median ratio {ratio_median:.2f}, best {ratio_best:.2f})"
    )


def report_throttle(raw: list[Run], throttle: dict[int, list[Run]], bootstrap: str) -> None:
    """The raw loop at the shipped settings next to the same loop at each fetch.queue.backoff.ms,
    and whether the shipped baseline looks throttled by it."""
    shipped = consumer_config(kafka_settings(bootstrap, "bench-tp-shown"))
    backoff = shipped.get("fetch.queue.backoff.ms")

    def row(name: str, ms: str, runs: list[Run], ratio: float) -> tuple[object, ...]:
        cpu = statistics.median(r.cpu_us for r in runs)
        return (
            name,
            ms,
            len(runs),
            fmt_rate(median(runs)),
            fmt_rate(best(runs)),
            f"{ratio:.2f}",
            f"{cpu:.2f}",
        )

    shown = f"{backoff} ms" if backoff is not None else f"(unset) {LIBRDKAFKA_BACKOFF_MS:,} ms"
    rows = [row("streamer's shipped settings", shown, raw, 1.0)]
    ratios: dict[int, float] = {}
    for ms, runs in throttle.items():
        ratios[ms] = statistics.median(t.rate / r.rate for t, r in zip(runs, raw, strict=True))
        name = "librdkafka's default" if ms == LIBRDKAFKA_BACKOFF_MS else "short backoff"
        rows.append(row(name, f"{ms:,} ms", runs, ratios[ms]))
    fetch = {k: v for k, v in shipped.items() if k.startswith(("fetch.", "queued."))}
    print_table(
        (
            "raw loop",
            "fetch.queue.backoff.ms",
            "runs",
            "median rec/s",
            "best rec/s",
            "x shipped",
            "CPU µs/rec",
        ),
        rows,
        title=(
            "throttle check: the raw loop at streamer's shipped librdkafka settings and at other "
            "fetch.queue.backoff.ms\n(x shipped: median over passes of its rate / the shipped raw loop's "
            "rate in the same pass; shipped fetch settings: "
            f"{', '.join(f'{k} = {v}' for k, v in fetch.items()) or 'none'})"
        ),
    )
    short = min(ratios)
    verdict = (
        f"throttled: the raw loop runs {ratios[short]:.2f}x as fast at {short} ms, so worker / raw compares "
        "against a baseline held back by a client setting (compare CPU µs/rec)"
        if round(ratios[short], 2) >= THROTTLED
        else f"not throttled: at {short} ms the raw loop runs {ratios[short]:.2f}x as fast (< {THROTTLED}x)"
    )
    print(f"\nbaseline {verdict}")


def profile_worker(bootstrap: str, topic: BenchTopic, resources: Resources, top: int, work_s: float) -> None:
    profiler = cProfile.Profile()

    def profiled(run: Callable[[], int]) -> int:
        profiler.enable()
        try:
            return run()
        finally:
            profiler.disable()

    started = time.perf_counter()
    run = worker_run(bootstrap, topic, resources.group("bench-tp-profile"), work_s=work_s, wrap=profiled)
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

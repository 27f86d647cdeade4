"""What checkpointing costs: the streamer Worker (no-op handler) at a range of commit intervals,
against the same worker with no commits until the end, and a bare confluent-kafka loop.

    .venv/bin/python -m bench.commit_sweep                    # 300,000 records, 3 passes
    .venv/bin/python -m bench.commit_sweep --records 50000 --repeat 1

Each broker acknowledges a group's commits one at a time (Kafka 4.x's group coordinator waits
``group.coordinator.append.linger.ms``, 5 ms by default, per commit), so a small interval is
bounded by commits/s, not by the loop. Rows that would send more than --max-commits commits
(default 2,000) read a smaller topic of interval x max-commits records instead, next to their own
no-commit row. See bench/README.md for the columns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
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
    progress,
    raw_run,
    worker_run,
)
from streamer.logs import configure_logging

#: The cost the default interval may have, against no commits at all.
GOAL_PERCENT = 2.0
DEFAULT = (1000, 5.0)
COUNTS = (1, 10, 100, 1000, 10_000)
SECONDS = (1.0, 5.0)


@dataclass
class Config:
    """One row of the sweep: a commit setting and the number of records it reads."""

    label: str
    every_records: int | None  # None: the raw loop
    every_seconds: float
    records: int
    runs: list[Run] = field(default_factory=list)

    @property
    def raw(self) -> bool:
        return self.every_records is None

    @property
    def no_commits(self) -> bool:
        return self.every_records == 0 and self.every_seconds == 0

    def best(self) -> Run:
        """The run that was fastest until everything was committed (the loop's rate for raw)."""
        return max(self.runs, key=lambda r: r.rate if self.raw else r.settled_rate)


def configs(records: int, max_commits: int) -> list[Config]:
    """The rows, grouped by the number of records they read (largest first)."""
    rows = [Config("raw confluent-kafka loop", None, 0.0, records)]
    for n in COUNTS:
        size = min(records, n * max_commits) if max_commits else records
        rows.append(Config(f"every {n:,} record{'s' if n > 1 else ''}", n, 0.0, size))
    rows.append(Config("default: 1,000 records / 5 s", *DEFAULT, records))
    rows += [Config(f"every {s:g} s", 0, s, records) for s in SECONDS]
    for size in sorted({row.records for row in rows}, reverse=True):
        rows.append(Config("no commits until the end", 0, 0.0, size))
    # Largest topic first; within a topic: raw, no commits, then by interval as listed above.
    return sorted(rows, key=lambda r: (-r.records, not r.raw, not r.no_commits))


def main(argv: list[str] | None = None) -> int:
    configure_logging("WARNING")
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=300_000, repeat=3)
    parser.add_argument(
        "--max-commits",
        type=int,
        default=2_000,
        help="rows with an interval of N records read at most N x this many records "
        "(default 2,000; 0: every row reads --records)",
    )
    args = parser.parse_args(argv)
    print_context(args.bootstrap)
    rows = configs(args.records, args.max_commits)
    resources = Resources(args.bootstrap, keep=args.keep)
    try:
        topics: dict[int, BenchTopic] = {}
        for size in sorted({row.records for row in rows}, reverse=True):
            suffix = "" if size == args.records else f"-{size}"
            topics[size] = prepare_topic(args, resources, size, suffix=suffix)
        print(
            f"\n{args.repeat} pass(es) over {len(rows)} configurations, each run in a fresh consumer group:"
        )
        for i in range(1, args.repeat + 1):
            # Rotate the order each pass, so that a drift in machine load does not favour one row.
            shift = (i - 1) * len(rows) // args.repeat
            for row in rows[shift:] + rows[:shift]:
                run = measure(row, args.bootstrap, topics[row.records], resources)
                row.runs.append(run)
                progress(run, i)
        report(rows, topics, args.repeat)
    finally:
        resources.cleanup()
    return 0


def measure(row: Config, bootstrap: str, topic: BenchTopic, resources: Resources) -> Run:
    group = resources.group("bench-sweep")
    if row.every_records is None:
        return raw_run(bootstrap, topic, group)
    return worker_run(
        bootstrap,
        topic,
        group,
        every_records=row.every_records,
        every_seconds=row.every_seconds,
        label=f"{row.label} [{row.records:,}]",
    )


def reread_bound(row: Config, rate: float) -> str:
    """Most records a crash right before a commit makes the next run read again, by configuration."""
    if row.raw or row.no_commits:
        return "whole run"
    by_count = row.every_records or float("inf")
    by_time = rate * row.every_seconds if row.every_seconds else float("inf")
    bound = min(by_count, by_time)
    return f"{bound:,.0f}" if bound == by_count else f"~{bound:,.0f}"


def report(rows: list[Config], topics: dict[int, BenchTopic], repeat: int) -> None:
    table: list[tuple[object, ...] | str] = []
    default_cost = None
    size = None
    for row in rows:
        if row.records != size:
            size = row.records
            table.append(f"[{topics[size].name}: {size:,} records]")
            base = next(r for r in rows if r.no_commits and r.records == size).best().settled_rate
        top = row.best()
        if row.raw:
            table.append((row.label, fmt_rate(top.rate), "", "", "", "", "", "", "whole run", ""))
            continue
        cost = (1 - top.settled_rate / base) * 100
        if (row.every_records, row.every_seconds) == DEFAULT:
            default_cost = cost
        settled = sorted(r.settled_rate for r in row.runs)
        table.append(
            (
                row.label,
                fmt_rate(top.rate),
                fmt_rate(top.settled_rate),
                fmt_rate(settled[len(settled) // 2]),
                "" if row.no_commits else f"{cost:+.1f}%",
                f"{top.commits:,}",
                f"{top.commits / top.settled:,.1f}",
                f"{top.settled - top.seconds:.2f}",
                reread_bound(row, top.settled_rate),
                f"{top.max_unacked:,}",
            )
        )
    print_table(
        (
            "commit interval",
            "loop rec/s",
            "rec/s",
            "median",
            "cost",
            "commits",
            "commits/s",
            "drain s",
            "re-read bound",
            "max unacked",
        ),
        table,
        title=(
            f"best of {repeat}, by rec/s from the first record until everything is committed; "
            "each topic section against its own no-commit row"
        ),
    )
    print(
        "\nloop rec/s: first record to last record processed; rec/s and median: first record to the "
        "final commit acknowledged;\ncost: rec/s lost against the no-commit row of the same topic "
        "(negative = noise); commits: acknowledged, including the\nsynchronous one(s) at the end; "
        "drain s: waiting at the end for the commits still queued; re-read bound: the interval in\n"
        "records, or rate x seconds (~) for a timer, which a crash re-reads half of on average; "
        "max unacked: most records\nprocessed but not yet acknowledged as "
        "committed at any poll, about what a crash then would have re-read (acknowledgements\nreach "
        "the worker behind records already fetched: the broker may have committed a little more)."
    )
    raw = next(r for r in rows if r.raw)
    none = next(r for r in rows if r.no_commits and r.records == raw.records)
    print(f"\nworker with no commits / raw loop: {none.best().rate / raw.best().rate:.2f} (loop rec/s)")
    if default_cost is not None:
        verdict = "met" if default_cost <= GOAL_PERCENT else "NOT met"
        rates = [r.settled_rate for r in none.runs]
        spread = (
            f"run-to-run spread of the no-commit row: {(max(rates) / min(rates) - 1) * 100:.0f}% "
            "(a cost smaller than that is noise)"
            if len(rates) > 1
            else "one run per row: no noise estimate (use --repeat 3 or more)"
        )
        print(
            f"goal: the default interval (1,000 records / 5 s) costs <= {GOAL_PERCENT:.0f}% against "
            f"no commits: {verdict} ({default_cost:+.1f}%); {spread}"
        )
    errors = sum(r.commit_errors for row in rows for r in row.runs)
    if errors:
        print(f"commit errors during the sweep: {errors}")
    lost = [r.label for row in rows for r in row.runs if r.lost]
    if lost:
        print(f"runs that lost their partitions (session timeout, heartbeats behind commits?): {lost}")


if __name__ == "__main__":
    sys.exit(main())

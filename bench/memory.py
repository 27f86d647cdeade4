"""Memory of a long run: the resident set size (RSS) of this process while the streamer Worker
(no-op handler, shipped settings) reads 10,000,000 records; it should stay flat after a warm-up.

    .venv/bin/python -m bench.memory                       # 10,000,000 records x 100 B, 3 partitions
    .venv/bin/python -m bench.memory --records 100000      # a quick check
    .venv/bin/python -m bench.memory --topic bench-10m --keep   # fill once, reuse afterwards

The topic is filled (or found, with ``--topic``) by a child process, so that the producer's
buffers (up to 1 GB) never count in this process's RSS; the worker then runs here, via
``bench._common.worker_run``, while a sampler thread reads VmRSS from /proc/self/status every
``--interval`` seconds, together with the records the worker has processed so far. The table
shows RSS at the start (before the worker is built), at the end of the warm-up (the first
``--warmup`` of the records, 10 %), at 25/50/75 %, at the end (the last sample before the last
record) and after the worker closed, and the largest deviation from the median of the samples
after the warm-up while records came (goal: within 10 %). Linux
only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench._common import (
    BenchTopic,
    Resources,
    Run,
    base_parser,
    fmt_rate,
    kafka_settings,
    prepare_topic,
    print_context,
    print_table,
    progress,
    worker_run,
)
from streamer.logs import configure_logging
from streamer.source import consumer_config
from streamer.worker import Worker

#: The largest deviation from the post-warm-up median RSS the goal allows, in %.
GOAL_PCT = 10.0
#: Where the table reads RSS, as shares of the records (then at the end, and after the close).
MILESTONES = (0.25, 0.5, 0.75)


def status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in kB."""
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


@dataclass(frozen=True)
class Sample:
    """One reading: seconds since the sampler started, records processed by then, RSS in kB."""

    seconds: float
    records: int
    rss_kb: int


class RssSampler:
    """Reads VmRSS every ``interval`` seconds on a thread of its own, with the worker's progress."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: list[Sample] = []
        self._worker: Worker | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = time.perf_counter()

    def watch(self, worker: Worker) -> None:
        """Count the records of ``worker`` from now on (``worker_run``'s watch hook)."""
        self._worker = worker

    def sample(self) -> Sample:
        """Take one reading now."""
        worker = self._worker
        records = worker.stats.processed + worker.stats.dropped if worker is not None else 0
        taken = Sample(time.perf_counter() - self._started, records, status_kb("VmRSS"))
        self.samples.append(taken)
        return taken

    def start(self) -> None:
        self._started = time.perf_counter()
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then take the last reading."""
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def _prepare(args: argparse.Namespace) -> BenchTopic:
    """In a child process: find or fill the topic (``prepare_topic``), its output flushed."""
    topic = prepare_topic(args, Resources(args.bootstrap, keep=True), args.records)
    sys.stdout.flush()
    return topic


def prepare_elsewhere(args: argparse.Namespace, resources: Resources) -> BenchTopic:
    """``prepare_topic`` in a spawned child process; the topic is this run's to delete if the child
    created it."""
    sys.stdout.flush()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        topic: BenchTopic = pool.apply(_prepare, (args,))
    resources.used.append(topic.name)
    if topic.created:
        resources.topics.append(topic.name)
    return topic


def first_at(samples: Sequence[Sample], records: int) -> Sample:
    """The first sample taken once ``records`` were processed (the last reading comes after the
    run, so there is always one)."""
    return next(s for s in samples if s.records >= records)


def report(samples: list[Sample], run: Run, records: int, warmup: float, peak_kb: int) -> None:
    """The RSS table, the statistics after the warm-up and the goal check."""
    warm = max(int(records * warmup), 1)
    # The steady state: after the warm-up, while records were still coming (closing the consumer
    # frees librdkafka's fetch queue; that drop is no part of it).
    after = [s for s in samples if warm <= s.records < records] or [s for s in samples if s.records >= warm]
    running = [s for s in samples if s.records < records]
    middle = statistics.median(s.rss_kb for s in after)

    def row(name: str, sample: Sample) -> tuple[object, ...]:
        delta = (sample.rss_kb - middle) / middle * 100
        return (
            name,
            f"{sample.records:,}",
            f"{sample.seconds:.1f}",
            f"{sample.rss_kb / 1024:,.1f}",
            f"{delta:+.1f}",
        )

    rows = [row("start (before the worker is built)", samples[0])]
    rows.append(row(f"end of warm-up ({warmup:.0%} of the records)", first_at(samples, warm)))
    rows += [row(f"{share:.0%}", first_at(samples, int(records * share))) for share in MILESTONES]
    rows.append(row("100% (the last sample before the last record)", running[-1]))
    rows.append(row("after the worker closed", samples[-1]))
    print_table(
        ("", "records processed", "s", "RSS MB", "vs median %"),
        rows,
        title=(
            f"RSS (VmRSS) of this process, {len(samples)} samples; each row is the first sample taken once "
            "that many records were processed (100 %: the last one before);\n"
            f"vs median: against the median of the {len(after)} samples after the warm-up while records "
            "came (the statistics below)"
        ),
    )
    low, high = min(s.rss_kb for s in after), max(s.rss_kb for s in after)
    deviation = max(abs(s.rss_kb - middle) for s in after) / middle * 100
    verdict = "met" if deviation <= GOAL_PCT else "NOT met"
    print(
        f"\nafter the warm-up: min {low / 1024:,.1f} MB, median {middle / 1024:,.1f} MB, "
        f"max {high / 1024:,.1f} MB; peak RSS of the process (VmHWM) {peak_kb / 1024:,.1f} MB"
    )
    print(
        f"goal: max deviation from the post-warm-up median within ±{GOAL_PCT:g} %: {verdict} "
        f"({deviation:.1f} %)"
    )
    print(
        f"worker: {fmt_rate(run.rate)} rec/s (first record to last), {run.cpu_us:.2f} CPU µs/rec (this "
        f"process, every thread, consumer created to closed), {run.commits:,} commits"
    )


def main(argv: list[str] | None = None) -> int:
    configure_logging("WARNING")
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=10_000_000, repeat=None)
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between RSS samples (default 0.5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="share of the records that is warm-up (default 0.1)"
    )
    args = parser.parse_args(argv)
    print_context(args.bootstrap)
    shipped = consumer_config(kafka_settings(args.bootstrap, "bench-mem-shown"))
    queues = {k: v for k, v in shipped.items() if k.startswith(("queued.", "fetch."))}
    print(
        "worker: no-op handler, shipped settings (librdkafka: "
        f"{', '.join(f'{k} = {v}' for k, v in queues.items()) or 'no fetch or queue settings'}; "
        "the rest librdkafka's defaults)"
    )
    resources = Resources(args.bootstrap, keep=args.keep)
    try:
        topic = prepare_elsewhere(args, resources)
        sampler = RssSampler(args.interval)
        print(
            f"\none worker run over {topic.records:,} records, RSS sampled every {args.interval:g} s:",
            flush=True,
        )
        sampler.start()
        try:
            run = worker_run(args.bootstrap, topic, resources.group("bench-mem"), watch=sampler.watch)
        finally:
            sampler.stop()
        progress(run, 1)
        report(sampler.samples, run, topic.records, args.warmup, status_kb("VmHWM"))
    finally:
        resources.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

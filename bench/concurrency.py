"""Concurrent dispatch: handlers that wait 10 ms per record, run by the streamer Worker at
several ``[processing] concurrency`` settings, against raw confluent-kafka loops, in the same run.

    .venv/bin/python -m bench.concurrency                  # 100,000 records for the big rows
    .venv/bin/python -m bench.concurrency --records 30000  # a shorter check

Rows: (a) an ``async def`` handler awaiting ``asyncio.sleep(0.01)``, ordering "key", concurrency
1, 100 and 1,000 (goal: >= 20,000 records/s per worker process at 1,000); (b) a ``def`` handler
calling ``time.sleep(0.01)`` on a thread pool of 64 (goal: >= 0.8 x 6,400 records/s) and
serially; (c) a raw ``consume(500)`` loop without handler work, and a raw loop that awaits an
``asyncio.gather`` of 10 ms sleeps per chunk of 1,000 records (the ideal reference for (a)).
Each worker row reads a topic of its own, produced by this run with 10,000 keys over 6
partitions; the raw loops read the topic of the concurrency-1,000 row. Every measured run
happens in a child process of its own (spawned), so that no run inherits threads, event loops or
garbage of another, and a run that hangs is killed after a deadline. See bench/README.md.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer

from bench._common import (
    RUN_DEADLINE_S,
    BenchTopic,
    Resources,
    Run,
    base_parser,
    fmt_rate,
    prepare_keyed_topic,
    print_context,
    print_table,
    progress,
    raw_run,
    worker_run,
)
from streamer.engine.batches import BatchChain
from streamer.logs import configure_logging
from streamer.message import Message
from streamer.middleware.retry import RetryPolicy
from streamer.settings import KafkaSettings
from streamer.source import consumer_config

#: What every handler (and the reference loop) waits per record, in seconds.
DELAY = 0.01
#: (a): records/s one worker process must reach at concurrency 1,000.
ASYNC_GOAL = 20_000
#: (b): the thread pool of this size must reach this share of its ideal rate (64 / 10 ms).
SYNC_POOL, SYNC_SHARE = 64, 0.8
#: The reference loop awaits its sleeps in chunks of this many records.
GATHER_CHUNK = 1000
#: (c): a no-op batch handler may cost at most this multiple of the raw loop's CPU per record.
BATCH_CPU_SHARE = 1.2
BATCH_LABEL = "(c) no-op batch handler (max_records 500)"


# -- handlers that check what they were promised ----------------------------------------------


@dataclass
class Check:
    """What the handler saw: records handled, and breaches of ordering "key".

    Ordering "key" promises that two records with the same key never run at the same time and run
    in offset order. Each key of the benchmark topics lives in one partition, so a per-key offset
    that does not grow is a reordering or a record handled twice; with ``handled`` equal to the
    records produced, no breach means every record was handled exactly once, in order per key.
    """

    handled: int = 0
    overlaps: int = 0
    reordered: int = 0
    last: dict[bytes | None, int] = field(default_factory=dict)
    running: set[bytes | None] = field(default_factory=set)

    def verdict(self, produced: int) -> str:
        ok = self.handled == produced and not self.overlaps and not self.reordered
        return (
            f"{'ok' if ok else 'FAILED'}: {self.handled:,} handled of {produced:,} produced, "
            f"{self.overlaps} overlaps of one key, {self.reordered} out of key order or repeated"
        )


def async_handler(check: Check) -> Callable[[Message], Any]:
    """``async def``: await 10 ms, keeping ``check`` (the event loop is one thread: no lock)."""
    last, running, sleep = check.last, check.running, asyncio.sleep

    async def handler(msg: Message) -> None:
        key, offset = msg[3], msg[2]
        if key in running:
            check.overlaps += 1
        running.add(key)
        if offset <= last.get(key, -1):
            check.reordered += 1
        last[key] = offset
        await sleep(DELAY)
        running.discard(key)
        check.handled += 1

    return handler


def sync_handler(check: Check) -> Callable[[Message], None]:
    """``def``: sleep 10 ms, keeping ``check`` under a lock (pool threads run it)."""
    last, running, lock, sleep = check.last, check.running, threading.Lock(), time.sleep

    def handler(msg: Message) -> None:
        key, offset = msg[3], msg[2]
        with lock:
            if key in running:
                check.overlaps += 1
            running.add(key)
            if offset <= last.get(key, -1):
                check.reordered += 1
            last[key] = offset
        sleep(DELAY)
        with lock:
            running.discard(key)
            check.handled += 1

    return handler


# -- raw loops --------------------------------------------------------------------------------


def raw_loop(
    bootstrap: str,
    topic: BenchTopic,
    group: str,
    *,
    label: str,
    chunk: int = 0,
    client: dict[str, Any] | None = None,
) -> Run:
    """``_common.raw_run``'s loop (``consume(500, 0.5)``, streamer's librdkafka configuration, plus
    ``client``), touching each value; with ``chunk``, every ``chunk`` records are handed to one
    ``asyncio.gather`` of coroutines that touch the value and await 10 ms (what a hand-written
    asyncio consumer does; its ideal is ``chunk`` records per 10 ms)."""

    async def handle(msg: Any) -> None:
        msg.value()
        await asyncio.sleep(DELAY)

    async def gather(msgs: list[Any]) -> None:
        await asyncio.gather(*map(handle, msgs))

    expected = topic.records
    aloop = asyncio.new_event_loop()
    started, cpu = time.perf_counter(), time.process_time()
    settings = KafkaSettings(bootstrap_servers=bootstrap, group_id=group, client=client or {})
    consumer = Consumer(consumer_config(settings))
    consumer.subscribe([topic.name])
    consume = consumer.consume
    seen = 0
    first = 0.0
    pending: list[Any] = []
    while seen < expected:
        msgs = consume(500, 0.5)
        if not msgs:
            if time.perf_counter() - started > RUN_DEADLINE_S:
                raise RuntimeError(f"{label} read {seen} of {expected} records in {RUN_DEADLINE_S} s")
            continue
        if not first:
            first = time.perf_counter()
        seen += len(msgs)
        if chunk:
            pending.extend(msgs)
            while len(pending) >= chunk or (pending and seen >= expected):
                aloop.run_until_complete(gather(pending[:chunk]))
                del pending[:chunk]
        else:
            for msg in msgs:
                msg.value()
    last = time.perf_counter()
    consumer.close()
    aloop.close()
    return Run(label, seen, last - first, time.perf_counter() - started, cpu=time.process_time() - cpu)


# -- one measured run, in a child process ------------------------------------------------


@dataclass
class Spec:
    """What a child process measures: a worker row (``handler`` and ``concurrency``) or a raw loop."""

    kind: str  # "worker", "raw", "gather", "raw-backoff"
    bootstrap: str
    topic: BenchTopic
    group: str
    label: str
    handler: str = ""  # worker rows: "async" or "sync"
    concurrency: int = 1


@dataclass
class Outcome:
    """What a child process reports: the run (None if it failed), the handler check, what went wrong."""

    run: Run | None
    verdict: str = ""
    error: str = ""
    #: asyncio's "Task was destroyed but it is pending!" errors logged in the child (counted, not
    #: printed: a closed event loop with pending tasks logs one per task when collected).
    destroyed: int = 0


class _CountDestroyed(logging.Filter):
    """Counts (and swallows) asyncio's "Task was destroyed but it is pending!" errors."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Task was destroyed but it is pending"):
            _CountDestroyed.count += 1
            return False
        return True


def _measure(spec: Spec) -> Outcome:
    if spec.kind == "raw":
        return Outcome(raw_run(spec.bootstrap, spec.topic, spec.group))
    if spec.kind == "gather":
        return Outcome(raw_loop(spec.bootstrap, spec.topic, spec.group, label=spec.label, chunk=GATHER_CHUNK))
    if spec.kind == "batch":
        batches = Check()

        def store(msgs: list[Message]) -> None:
            batches.handled += len(msgs)

        chain = BatchChain(
            store, max_records=500, max_wait=0.1, decoder=None, policy=RetryPolicy(max_attempts=1)
        )
        run = worker_run(
            spec.bootstrap,
            spec.topic,
            spec.group,
            label=spec.label,
            handler=chain,
            extra={"metrics": {"enabled": False}},
        )
        verdict = "ok" if batches.handled == spec.topic.records else f"{batches.handled} handled"
        return Outcome(run, f"{verdict}: {batches.handled:,} handled of {spec.topic.records:,} produced")
    if spec.kind == "raw-backoff":
        client = {"fetch.queue.backoff.ms": 1000}  # librdkafka's default, over streamer's 10 ms
        return Outcome(raw_loop(spec.bootstrap, spec.topic, spec.group, label=spec.label, client=client))
    check = Check()
    run = worker_run(
        spec.bootstrap,
        spec.topic,
        spec.group,
        label=spec.label,
        handler=(async_handler if spec.handler == "async" else sync_handler)(check),
        extra={
            "processing": {"concurrency": spec.concurrency, "ordering": "key"},
            "metrics": {"enabled": False},
        },
    )
    return Outcome(run, check.verdict(spec.topic.records))


def _child(conn: Any, spec: Spec) -> None:
    """The child process: measure, collect the garbage (its asyncio errors counted), report."""
    configure_logging("WARNING")
    logging.getLogger("asyncio").addFilter(_CountDestroyed())
    try:
        outcome = _measure(spec)
    except Exception as exc:  # noqa: BLE001 - reported as the row's failure
        outcome = Outcome(None, error=f"{type(exc).__name__}: {exc}")
    gc.collect()
    outcome.destroyed = _CountDestroyed.count
    conn.send(outcome)
    conn.close()


def measure(spec: Spec) -> Outcome:
    """Run ``spec`` in a spawned child process; kill it after a deadline."""
    deadline = 60 + spec.topic.records / 1000
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, spec), name=f"bench-{spec.kind}", daemon=True)
    child.start()
    sender.close()
    try:
        if receiver.poll(deadline):
            outcome: Outcome = receiver.recv()
        else:
            child.kill()
            outcome = Outcome(None, error=f"no result after {deadline:.0f} s: killed")
    except EOFError:
        outcome = Outcome(None, error="the child process died without a result")
    finally:
        receiver.close()
        child.join(30)
    if child.exitcode not in (0, None) and outcome.run is not None:
        outcome.error = f"child exit code {child.exitcode}"
    return outcome


# -- the rows ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One row of the table: what to measure, its goal, and its runs."""

    scenario: str
    concurrency: str
    spec: Spec
    goal: float = 0.0  # records/s; 0: none
    checks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    destroyed: int = 0

    def typical(self) -> Run | None:
        """The run with the median rate (the lower middle one of an even number)."""
        ordered = sorted(self.runs, key=lambda r: r.rate)
        return ordered[(len(ordered) - 1) // 2] if ordered else None


def show(run: Run, repeat: int) -> None:
    """``progress``, without the commit columns for the raw loops (which never commit)."""
    if run.label.startswith("raw"):
        print(
            f"  #{repeat} {run.label:<30} {run.records:>9,} rec  {run.seconds:7.3f} s  "
            f"{fmt_rate(run.rate):>9} rec/s  wall {run.wall:6.2f} s",
            flush=True,
        )
    else:
        progress(run, repeat)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, return 0 (1 when a run or a handler check failed)."""
    configure_logging("WARNING")
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=100_000, repeat=3)
    parser.set_defaults(partitions=6)
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys per topic (default 10,000)")
    parser.add_argument(
        "--serial-records",
        type=int,
        default=300,
        help="records of the concurrency-1 rows, which run at ~100 rec/s (default 300)",
    )
    args = parser.parse_args(argv)
    big = args.records
    print_context(args.bootstrap)
    resources = Resources(args.bootstrap, keep=args.keep)
    try:

        def topic(records: int, suffix: str) -> BenchTopic:
            return prepare_keyed_topic(args, resources, records, keys=args.keys, suffix=suffix)

        a1, a100 = topic(args.serial_records, "-a1"), topic(big * 3 // 10, "-a100")
        a1000, b1, b64 = topic(big, "-a1000"), topic(args.serial_records, "-b1"), topic(big // 5, "-b64")

        def spec(kind: str, on: BenchTopic, label: str, handler: str = "", concurrency: int = 1) -> Spec:
            return Spec(kind, args.bootstrap, on, "", label, handler, concurrency)

        def worker(scenario: str, handler: str, n: int, on: BenchTopic, goal: float = 0.0) -> Row:
            label = f"{scenario[:3]} worker, concurrency {n}"
            return Row(scenario, f"{n:,}", spec("worker", on, label, handler, n), goal=goal)

        async_label, sync_label = "(a) async, await sleep(10 ms)", "(b) sync, time.sleep(10 ms)"
        rows = [
            worker(async_label, "async", 1, a1),
            worker(async_label, "async", 100, a100),
            worker(async_label, "async", 1000, a1000, goal=ASYNC_GOAL),
            worker(sync_label, "sync", 1, b1),
            worker(sync_label, "sync", SYNC_POOL, b64, goal=SYNC_SHARE * SYNC_POOL / DELAY),
            Row(BATCH_LABEL, "1", spec("batch", a1000, "batch worker")),
            Row("(c) raw consume(500), no handler work", "-", spec("raw", a1000, "raw")),
            Row(
                f"(c) raw consume(500) + gather of 10 ms sleeps per {GATHER_CHUNK:,}",
                f"{GATHER_CHUNK:,}",
                spec("gather", a1000, "raw + gather"),
            ),
        ]
        # Would the raw baseline be held back by librdkafka's fetch queue backoff (1 s by default;
        # streamer ships 10 ms)?
        throttle = [
            Row("raw, backoff 1,000 ms", "-", spec("raw-backoff", a1000, "raw (backoff 1000 ms)")),
            Row("raw, shipped backoff 10 ms", "-", spec("raw", a1000, "raw")),
        ]
        print(
            f"\n{args.repeat} pass(es) over {len(rows)} rows, rotating the order, each run in a fresh "
            "group and a child process of its own:"
        )
        for i in range(1, args.repeat + 1):
            shift = (i - 1) % len(rows)
            for row in rows[shift:] + rows[:shift] + throttle:
                row.spec.group = resources.group("bench-conc")
                outcome = measure(row.spec)
                row.destroyed += outcome.destroyed
                if outcome.verdict:
                    row.checks.append(outcome.verdict)
                if outcome.error:
                    row.errors.append(f"#{i} {outcome.error}")
                    print(f"  #{i} {row.spec.label:<30} FAILED: {outcome.error}", flush=True)
                if outcome.run is not None:
                    row.runs.append(outcome.run)
                    show(outcome.run, i)
        failed = report(rows, throttle, args)
    finally:
        resources.cleanup()
    return 1 if failed else 0


def report(rows: list[Row], throttle: list[Row], args: Any) -> bool:
    """Print the table and what goes with it; True when a run or a check failed."""
    table = []
    raw = next((r.typical() for r in rows if r.spec.kind == "raw"), None)
    for row in rows:
        run = row.typical()
        goal = f">= {fmt_rate(row.goal)} rec/s" if row.goal else ""
        if row.spec.kind == "batch":
            goal = f"<= {BATCH_CPU_SHARE}x raw CPU"
            if run is not None and raw is not None:
                met = "yes" if run.cpu_us <= BATCH_CPU_SHARE * raw.cpu_us else "NO"
                table.append(
                    (
                        row.scenario,
                        row.concurrency,
                        f"{run.records:,}",
                        f"{run.seconds:.2f}",
                        fmt_rate(run.rate),
                        f"{run.cpu_us:.1f}",
                        goal,
                        f"{met} ({run.cpu_us / raw.cpu_us:.1f}x)",
                    )
                )
                continue
        if run is None:
            table.append((row.scenario, row.concurrency, "-", "-", "failed", "-", goal, "NO" if goal else ""))
            continue
        met = ("yes" if run.rate >= row.goal else "NO") if row.goal else ""
        table.append(
            (
                row.scenario,
                row.concurrency,
                f"{run.records:,}",
                f"{run.seconds:.2f}",
                fmt_rate(run.rate),
                f"{run.cpu_us:.1f}",
                goal,
                met,
            )
        )
    many = "median run of " if args.repeat > 1 else ""
    print_table(
        ("scenario", "concurrency", "records", "seconds", "records/s", "CPU µs/rec", "goal", "met?"),
        table,
        title=(
            f"{args.partitions} partitions, {args.keys:,} keys, {args.value_size}-byte values, ordering "
            f'"key"; {many}{args.repeat} pass(es).\n'
            "seconds: from the first record received to the last one handled (group join excluded);\n"
            "CPU µs/rec: CPU time of the run's process (every thread), consumer created to closed, "
            f"per record (the {args.serial_records}-record rows carry the start-up and join in it)"
        ),
    )
    reference, top = rows[-1].typical(), rows[2].typical()
    print("\nideal (concurrency / 10 ms): 100, 10,000, 100,000 rec/s for (a); 100 and 6,400 for (b).")
    if reference is not None and top is not None:
        print(
            f"(a) at 1,000: {top.rate / reference.rate:.2f}x the gather reference "
            f"({fmt_rate(reference.rate)} rec/s), {top.rate / 100_000:.2f}x its ideal."
        )
    failed = False
    print('handler checks (every record handled once; ordering "key": no key overlapping, in offset order):')
    for row in rows:
        if row.checks:
            bad = [f"#{i} {v}" for i, v in enumerate(row.checks, 1) if not v.startswith("ok")]
            failed = failed or bool(bad)
            summary = (
                "; ".join(bad) if bad else f"{len(row.checks)} of {len(row.checks)} runs {row.checks[-1]}"
            )
            print(f"  {row.scenario}, concurrency {row.concurrency}: {summary}")
    for row in rows + throttle:
        for error in row.errors:
            failed = True
            print(f"FAILED run of {row.scenario}, concurrency {row.concurrency}: {error}")
    destroyed = {f"{r.scenario[:3]} c={r.concurrency}": r.destroyed for r in rows if r.destroyed}
    if destroyed:
        print(
            'asyncio "Task was destroyed but it is pending!" errors (not printed, logged when the '
            "worker's event loop is collected after the run): "
            + ", ".join(f"{k}: {v:,}" for k, v in destroyed.items())
        )
    pairs = list(zip(throttle[0].runs, throttle[1].runs, strict=False))
    if pairs:
        print(
            "raw loop, librdkafka's default fetch.queue.backoff.ms (1,000 ms) against 10 ms, "
            f"{pairs[0][0].records:,} records (throttle check): "
            + "; ".join(f"{fmt_rate(d.rate)} vs {fmt_rate(q.rate)} rec/s" for d, q in pairs)
            + f" (median ratio {statistics.median(d.rate / q.rate for d, q in pairs):.2f})"
        )
    return failed


if __name__ == "__main__":
    sys.exit(main())

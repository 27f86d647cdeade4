"""Consume-transform-produce: a pass-through handler returning ``streamer.Record``, run by the
streamer Worker at-least-once and exactly-once at several commit intervals, against a raw
confluent-kafka consume-and-produce loop measured in the same run.

    .venv/bin/python -m bench.transform                   # 200,000 records of 100 bytes
    .venv/bin/python -m bench.transform --records 50000   # a shorter check

Rows: (a) a raw loop, ``consume(500, 0.5)`` and one ``produce`` per record through a producer
configured like streamer's (idempotent, acks=all, linger.ms=5), no commits; (b) the Worker with
the default commit policy and ``guarantee = "at_least_once"``; (c) ``guarantee =
"exactly_once"`` with ``[commit] every_seconds`` 0.1, 1 and 5 (``every_records = 0``): one
transaction per interval. Every run reads the same pre-filled input topic in a fresh group and
writes a fresh output topic, in a spawned child process of its own (no run inherits another's
threads or garbage; a run that hangs is killed after a deadline). See bench/README.md.
"""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer

from bench._common import (
    RUN_DEADLINE_S,
    BenchTopic,
    Resources,
    Run,
    SourceProbe,
    base_parser,
    create_topic,
    fmt_rate,
    prepare_topic,
    print_context,
    print_table,
    unique,
    watermarks,
)
from streamer import Record
from streamer.exitcodes import EXIT_OK
from streamer.logs import configure_logging
from streamer.message import Message
from streamer.settings import KafkaSettings, load_settings
from streamer.source import consumer_config
from streamer.worker import Worker

#: Exactly-once rows: seconds between transactions.
EOS_INTERVALS = (0.1, 1.0, 5.0)
#: The raw loop's producer: the settings streamer's output producer runs with.
RAW_PRODUCER = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "queue.buffering.max.messages": 100_000,
}


@dataclass
class Spec:
    """What a child process measures."""

    kind: str  # "raw", "raw-backoff", "no_output", "at_least_once", "exactly_once"
    bootstrap: str
    topic: BenchTopic
    label: str
    every_seconds: float = 0.0
    group: str = ""
    out: str = ""


@dataclass
class Outcome:
    """What a child process reports: the run (None if it failed), its output figures, its error."""

    run: Run | None
    outputs: int = 0
    transactions: int = 0
    aborted: int = 0
    error: str = ""


# -- the runs ---------------------------------------------------------------------------------


def raw_transform(spec: Spec, client: dict[str, Any] | None = None) -> Outcome:
    """The baseline: consume 500 at a time, produce each value (and key) to the output topic;
    ``seconds`` runs from the first non-empty batch until ``flush`` saw every output acknowledged.
    The consumer gets streamer's librdkafka configuration (plus ``client``)."""
    topic, out, expected = spec.topic, spec.out, spec.topic.records
    started, cpu = time.perf_counter(), time.process_time()
    settings = KafkaSettings(bootstrap_servers=spec.bootstrap, group_id=spec.group, client=client or {})
    consumer = Consumer(consumer_config(settings))
    producer = Producer({"bootstrap.servers": spec.bootstrap, **RAW_PRODUCER})
    consumer.subscribe([topic.name])
    consume, produce, poll = consumer.consume, producer.produce, producer.poll
    seen = 0
    first = 0.0
    while seen < expected:
        msgs = consume(500, 0.5)
        if not msgs:
            if time.perf_counter() - started > RUN_DEADLINE_S:
                raise RuntimeError(f"raw loop read {seen} of {expected} records in {RUN_DEADLINE_S} s")
            continue
        if not first:
            first = time.perf_counter()
        for msg in msgs:
            while True:
                try:
                    produce(out, msg.value(), msg.key())
                    break
                except BufferError:
                    poll(0.05)  # the producer's queue is full: serve acknowledgements, then retry
        poll(0)
        seen += len(msgs)
    left = producer.flush(60)
    last = time.perf_counter()
    consumer.close()
    if left:
        raise RuntimeError(f"{left} outputs still unacknowledged after 60 s")
    run = Run(spec.label, seen, last - first, time.perf_counter() - started, cpu=time.process_time() - cpu)
    return Outcome(run, outputs=seen)


def streamer_transform(spec: Spec) -> Outcome:
    """The Worker over the input topic (bounded run), its handler returning one Record per input;
    ``seconds`` runs from the first non-empty batch until the final commit returned (every output
    acknowledged and, exactly-once, committed in a transaction)."""
    topic, out = spec.topic, spec.out
    started, cpu = time.perf_counter(), time.process_time()
    if spec.kind == "exactly_once":
        commit: dict[str, object] = {"every_records": 0, "every_seconds": spec.every_seconds}
    else:
        commit = {}  # streamer's defaults: every 1,000 records or 5 s
    settings = load_settings(
        kafka={"bootstrap_servers": spec.bootstrap, "group_id": spec.group},
        commit=commit,
        processing={"guarantee": "at_least_once" if spec.kind == "no_output" else spec.kind},
        metrics={"enabled": False},
    )

    def transform(msg: Message) -> Record | None:
        # "no_output": the same worker and handler call, nothing emitted (the output path's cost).
        return None if spec.kind == "no_output" else Record(out, msg.value, msg.key)

    worker = Worker(settings, {topic.name: transform}, until_end=True)
    probe = SourceProbe(worker, topic.lows)
    code = worker.run()
    wall = time.perf_counter() - started
    stats = worker.stats
    done = stats.processed + stats.dropped
    if code != EXIT_OK or done != topic.records:
        raise RuntimeError(f"worker exited {code} after {done} of {topic.records} records")
    run = Run(
        spec.label,
        done,
        probe.closing - probe.first,
        wall,
        commits=stats.commits,
        commit_errors=stats.commit_errors,
        cpu=time.process_time() - cpu,
    )
    return Outcome(run, sum(stats.outputs.values()), stats.transactions, stats.transactions_aborted)


def _child(conn: Any, spec: Spec) -> None:
    """The child process: measure, report."""
    configure_logging("WARNING")
    try:
        if spec.kind == "raw":
            outcome = raw_transform(spec)
        elif spec.kind == "raw-backoff":
            outcome = raw_transform(spec, {"fetch.queue.backoff.ms": 10})
        else:
            outcome = streamer_transform(spec)
    except Exception as exc:  # noqa: BLE001 - reported as the row's failure
        outcome = Outcome(None, error=f"{type(exc).__name__}: {exc}")
    gc.collect()
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
    """One row of the table: what to measure and its outcomes."""

    scenario: str
    spec: Spec
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def typical(self) -> Outcome | None:
        """The outcome with the median rate (the lower middle one of an even number)."""
        ran = sorted(
            (o for o in self.outcomes if o.run is not None), key=lambda o: o.run.rate if o.run else 0
        )
        return ran[(len(ran) - 1) // 2] if ran else None


def show(outcome: Outcome, repeat: int) -> None:
    """One line per measured run, as it finishes."""
    run = outcome.run
    assert run is not None
    extra = (
        f"  transactions {outcome.transactions:,} (aborted {outcome.aborted})"
        if outcome.transactions or outcome.aborted
        else (f"  commits {run.commits:,}" if run.commits else "")
    )
    print(
        f"  #{repeat} {run.label:<32} {run.records:>9,} rec  {run.seconds:7.3f} s  "
        f"{fmt_rate(run.rate):>9} rec/s  {run.cpu_us:6.1f} CPU µs/rec  wall {run.wall:6.2f} s{extra}",
        flush=True,
    )


def output_count(bootstrap: str, topic: str) -> int:
    """Records on the output topic (high watermarks; exactly-once adds one marker per
    transaction and partition written)."""
    marks = watermarks(bootstrap, topic) or {}
    return sum(high - low for low, high in marks.values())


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, return 0 (1 when a run failed or lost outputs)."""
    configure_logging("WARNING")
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=200_000, repeat=3)
    args = parser.parse_args(argv)
    print_context(args.bootstrap)
    resources = Resources(args.bootstrap, keep=args.keep)
    try:
        source = prepare_topic(args, resources, args.records)

        def spec(kind: str, label: str, every_seconds: float = 0.0) -> Spec:
            return Spec(kind, args.bootstrap, source, label, every_seconds)

        rows = [
            Row("(a) raw consume(500) + produce, no commits", spec("raw", "raw")),
            Row(
                "(b) streamer, at-least-once (every 1,000 rec / 5 s)", spec("at_least_once", "at-least-once")
            ),
            Row("(b0) the same worker, handler returns None (no output)", spec("no_output", "no output")),
            *(
                Row(
                    f"(c) streamer, exactly-once, every_seconds {s:g}",
                    spec("exactly_once", f"exactly-once {s:g} s", every_seconds=s),
                )
                for s in EOS_INTERVALS
            ),
        ]
        # Is the raw baseline held back by librdkafka's fetch queue backoff (1 s by default)?
        throttle = [
            Row("raw, default backoff", spec("raw", "raw (default backoff)")),
            Row("raw, backoff 10 ms", spec("raw-backoff", "raw (fetch.queue.backoff.ms=10)")),
        ]
        print(
            f"\n{args.repeat} pass(es) over {len(rows)} rows, rotating the order, each run in a fresh "
            "group, a fresh output topic and a child process of its own:"
        )
        for i in range(1, args.repeat + 1):
            shift = (i - 1) % len(rows)
            for row in rows[shift:] + rows[:shift] + throttle:
                row.spec.group = resources.group("bench-transform")
                row.spec.out = unique("bench-transform-out")
                create_topic(args.bootstrap, row.spec.out, args.partitions)
                resources.topics.append(row.spec.out)
                outcome = measure(row.spec)
                if outcome.run is not None:
                    on_topic = output_count(args.bootstrap, row.spec.out)
                    expected = 0 if row.spec.kind == "no_output" else source.records
                    if outcome.outputs != expected or on_topic < expected:
                        outcome.error = (
                            f"{outcome.outputs:,} outputs acknowledged, {on_topic:,} on the output "
                            f"topic, for {source.records:,} inputs"
                        )
                if outcome.error:
                    row.errors.append(f"#{i} {outcome.error}")
                    print(f"  #{i} {row.spec.label:<32} FAILED: {outcome.error}", flush=True)
                if outcome.run is not None:
                    row.outcomes.append(outcome)
                    show(outcome, i)
        failed = report(rows, throttle, args)
    finally:
        resources.cleanup()
    return 1 if failed else 0


def report(rows: list[Row], throttle: list[Row], args: Any) -> bool:
    """Print the table and what goes with it; True when a run failed."""
    raw = rows[0].typical()
    table = []
    for row in rows:
        outcome = row.typical()
        run = outcome.run if outcome is not None else None
        if outcome is None or run is None:
            table.append((row.scenario, "-", "-", "failed", "-", "-", "-"))
            continue
        ratio = f"{run.cpu_us / raw.run.cpu_us:.1f}x" if raw is not None and raw.run is not None else "-"
        txns = f"{outcome.transactions:,}" if row.spec.kind == "exactly_once" else "-"
        table.append(
            (
                row.scenario,
                f"{run.records:,}",
                f"{run.seconds:.2f}",
                fmt_rate(run.rate),
                f"{run.cpu_us:.1f}",
                ratio,
                txns,
            )
        )
    many = "median run of " if args.repeat > 1 else ""
    print_table(
        ("scenario", "records", "seconds", "records/s", "CPU µs/rec", "CPU vs raw", "transactions"),
        table,
        title=(
            f"{args.partitions} partitions, {args.value_size}-byte values, one output per input; "
            f"{many}{args.repeat} pass(es).\n"
            "seconds: from the first record received until every output was acknowledged (raw, "
            "at-least-once) or committed (exactly-once);\n"
            "CPU µs/rec: CPU time of the run's process (every thread, librdkafka's included), "
            "consumer created to closed, per record;\n"
            "transactions: committed by the run (the final one included)"
        ),
    )
    failed = False
    for row in rows + throttle:
        for error in row.errors:
            failed = True
            print(f"FAILED run of {row.scenario}: {error}")
    aborted = {
        r.scenario: sum(o.aborted for o in r.outcomes) for r in rows if any(o.aborted for o in r.outcomes)
    }
    if aborted:
        print(f"transactions aborted: {aborted}")
    pairs = [
        (d.run, q.run)
        for d, q in zip(throttle[0].outcomes, throttle[1].outcomes, strict=False)
        if d.run is not None and q.run is not None
    ]
    if pairs:
        print(
            "raw loop, librdkafka's default fetch.queue.backoff.ms (1,000 ms) against 10 ms, "
            f"{pairs[0][0].records:,} records (throttle check): "
            + "; ".join(f"{fmt_rate(d.rate)} vs {fmt_rate(q.rate)} rec/s" for d, q in pairs)
            + f" (median ratio {statistics.median(d.rate / q.rate for d, q in pairs):.2f}); the table's "
            "raw row and the streamer rows all run with the default: a ratio well below 1 means the "
            "backoff caps the raw loop's rate, and CPU µs/rec is the figure to compare"
        )
    return failed


if __name__ == "__main__":
    sys.exit(main())

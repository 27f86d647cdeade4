"""Shared pieces of the benchmarks: machine context, topic fill, the raw baseline loop, the timed
worker run and table printing.

The scripts import this module as ``bench._common`` (run them from the repository root with
``.venv/bin/python -m bench.throughput`` or ``.venv/bin/python bench/throughput.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import streamer
from streamer.exitcodes import EXIT_OK
from streamer.message import Message
from streamer.settings import KafkaSettings, load_settings
from streamer.source import consumer_config
from streamer.worker import Worker

#: Safety net: a single measured run that takes longer than this is aborted.
RUN_DEADLINE_S = 600.0
#: librdkafka's own defaults (2.x) of fetch.queue.backoff.ms and queued.min.messages: once a
#: partition's fetch queue holds queued.min.messages, its next fetch waits out the backoff.
LIBRDKAFKA_BACKOFF_MS, LIBRDKAFKA_QUEUED_MIN = 1000, 100_000


# -- command line and context -----------------------------------------------------------------


def base_parser(description: str, *, records: int, repeat: int | None) -> argparse.ArgumentParser:
    """The options the scripts share (``repeat`` None: a script that measures once has no --repeat)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument(
        "--records", type=int, default=records, help=f"records to pre-fill (default {records:,})"
    )
    if repeat is not None:
        parser.add_argument(
            "--repeat", type=int, default=repeat, help=f"measurements per configuration (default {repeat})"
        )
    parser.add_argument("--partitions", type=int, default=3, help="partitions of a new topic (default 3)")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per record value (default 100)")
    parser.add_argument(
        "--topic",
        help="use this topic: reused as is if it exists (skipping the fill), else created and filled; "
        "an existing topic is never deleted",
    )
    parser.add_argument("--keep", action="store_true", help="keep the topics and consumer groups created")
    return parser


def print_context(bootstrap: str) -> None:
    """Print what the figures depend on: cores, load, Python, client library versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [
        ("machine", f"{platform.machine()}, {platform.platform(terse=True)}"),
        ("cores", f"{os.cpu_count()} ({usable} usable by this process)"),
        ("load average", f"{load} (1, 5, 15 min) at start"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("confluent-kafka", _version_text(confluent_kafka.version())),
        ("librdkafka", _version_text(confluent_kafka.libversion())),
        ("streamer", _streamer_version()),
        ("broker", bootstrap),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    print()


def _streamer_version() -> str:
    """Where streamer was imported from, and its git commit (noting local changes)."""
    package = Path(streamer.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return str(package)
    changed = [line[3:] for line in dirty if line.strip()]
    note = f", with local changes to {len(changed)} file(s)" if changed else ""
    return f"{package} (git {sha}{note})"


def _version_text(version: object) -> str:
    # version() is a plain string in recent confluent-kafka releases, a (text, int) tuple in older ones.
    return str(version[0] if isinstance(version, tuple) else version)


def unique(prefix: str) -> str:
    """A name no earlier run used."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# -- topics -----------------------------------------------------------------------------------


@dataclass
class BenchTopic:
    """A pre-filled topic and whether this run created it (and so may delete it)."""

    name: str
    records: int
    created: bool
    #: Low watermark per partition: the first offset a fresh group reads.
    lows: dict[int, int] = field(default_factory=dict)


class Resources:
    """Topics and consumer groups this run created, removed at the end unless kept.

    Topics the worker itself creates for a benchmark topic T (its dead-letter topic, "T.dlq" by
    default) count as created by this run when they did not exist at its start.
    """

    def __init__(self, bootstrap: str, *, keep: bool) -> None:
        self.bootstrap = bootstrap
        self.keep = keep
        self.topics: list[str] = []
        self.groups: list[str] = []
        #: Every benchmark topic of this run, created or reused.
        self.used: list[str] = []
        self._before = self._all_topics()

    def _all_topics(self) -> set[str]:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return set(admin.list_topics(timeout=10).topics)

    def _side_topics(self) -> list[str]:
        """Topics that appeared during this run, named after one of its benchmark topics."""
        new = self._all_topics() - self._before
        return sorted(t for t in new if any(t.startswith(f"{used}.") for used in self.used))

    def group(self, prefix: str) -> str:
        """A fresh consumer group name, remembered for deletion."""
        name = unique(prefix)
        self.groups.append(name)
        return name

    def cleanup(self) -> None:
        """Delete the groups, then the topics, best effort; say what was kept or failed."""
        side = self._side_topics()
        if self.keep:
            if self.topics:
                print(f"\nkept topics: {', '.join(self.topics)} (reuse with --topic NAME)")
            if side:
                print(f"kept topics the worker created: {', '.join(side)}")
            return
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 4})
        failures: list[str] = []
        if self.groups:
            for name, future in admin.delete_consumer_groups(self.groups, request_timeout=30).items():
                try:
                    future.result(timeout=30)
                except KafkaException as exc:
                    # A group that never committed (the raw loop's) is gone once its member left.
                    if exc.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:
                        failures.append(f"group {name}: {exc}")
                except TimeoutError as exc:
                    failures.append(f"group {name}: {exc}")
        if self.topics or side:
            for name, future in admin.delete_topics([*self.topics, *side], operation_timeout=30).items():
                try:
                    future.result(timeout=30)
                except (KafkaException, TimeoutError) as exc:
                    failures.append(f"topic {name}: {exc}")
        for failure in failures:
            print(f"cleanup: could not delete {failure}", file=sys.stderr)


def watermarks(bootstrap: str, topic: str) -> dict[int, tuple[int, int]] | None:
    """Low and high watermark per partition of ``topic``, or None when it does not exist."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entry = admin.list_topics(topic=topic, timeout=10).topics.get(topic)
    if entry is None or entry.error is not None:
        return None
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("bench-watermarks")})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            for p in entry.partitions
        }
    finally:
        consumer.close()


def prepare_topic(
    args: argparse.Namespace, resources: Resources, records: int, *, suffix: str = ""
) -> BenchTopic:
    """Reuse ``--topic`` (plus ``suffix``) if it exists, else create and fill a topic."""
    name = f"{args.topic}{suffix}" if args.topic else unique(f"bench{suffix}")
    resources.used.append(name)
    marks = watermarks(args.bootstrap, name) if args.topic else None
    if marks is not None:
        existing = sum(high - low for low, high in marks.values())
        note = "" if existing == records else f" (not {records:,}: --records does not apply to it)"
        print(f"reusing topic {name}: {existing:,} records{note}")
        return BenchTopic(name, existing, created=False, lows={p: low for p, (low, _) in marks.items()})
    create_topic(args.bootstrap, name, args.partitions)
    resources.topics.append(name)
    seconds = fill_topic(args.bootstrap, name, records, args.partitions, args.value_size)
    print(
        f"filled topic {name}: {records:,} records of {args.value_size} bytes, {args.partitions} "
        f"partitions, in {seconds:.1f} s ({records / seconds:,.0f} rec/s)"
    )
    marks = watermarks(args.bootstrap, name) or {}
    filled = sum(high - low for low, high in marks.values())
    if filled != records:
        raise RuntimeError(f"topic {name} holds {filled} records after the fill, expected {records}")
    return BenchTopic(name, records, created=True, lows={p: low for p, (low, _) in marks.items()})


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create ``topic`` and wait until every partition has a leader."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(
        timeout=30
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entry = admin.list_topics(topic=topic, timeout=10).topics.get(topic)
        if (
            entry is not None
            and entry.error is None
            and len(entry.partitions) == partitions
            and all(p.leader >= 0 for p in entry.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no leader for all {partitions} partitions after 30 s")


def fill_producer(bootstrap: str) -> Producer:
    """The producer that fills benchmark topics: large batches, acks=1, no compression."""
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": 1,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "batch.num.messages": 10_000,
            "compression.type": "none",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )


def fill_topic(bootstrap: str, topic: str, records: int, partitions: int, value_size: int) -> float:
    """Produce ``records`` values of ``value_size`` bytes round-robin over the partitions; seconds."""
    producer = fill_producer(bootstrap)
    value = (b"0123456789" * (value_size // 10 + 1))[:value_size]
    produce = producer.produce
    started = time.perf_counter()
    for i in range(records):
        try:
            produce(topic, value, partition=i % partitions)
        except BufferError:
            producer.poll(0.1)
            produce(topic, value, partition=i % partitions)
        if i % 50_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError(f"could not deliver every record to {topic}")
    return time.perf_counter() - started


# -- measured runs ----------------------------------------------------------------------------


@dataclass
class Run:
    """One measured pass over a topic."""

    label: str
    records: int
    #: From the first non-empty batch to the last record processed (group join excluded).
    seconds: float
    #: From creating the consumer to closing it (join, final commits and leaving included).
    wall: float
    #: Worker runs: from the first non-empty batch until the final synchronous commit returned,
    #: i.e. until everything processed is also committed (0 for the raw loop).
    settled: float = 0.0
    commits: int = 0
    commit_errors: int = 0
    commits_sent: int = 0
    #: Most records processed but not yet acknowledged (to the worker) as committed, at any poll:
    #: about what a crash then would have re-read. Acknowledgements reach the worker inside poll,
    #: behind records already fetched, so the broker may have committed somewhat more by then.
    max_unacked: int = 0
    #: Times the run lost its partitions (a session timeout: heartbeats stuck behind commits).
    lost: int = 0
    #: CPU seconds of this process (every thread) from creating the consumer to closing it.
    cpu: float = 0.0
    #: Runs with simulated work (``work_s``): seconds inside the ``spin`` calls, each call timed
    #: with perf_counter around it, summed; and how many calls.
    work_seconds: float = 0.0
    work_calls: int = 0

    @property
    def cpu_us(self) -> float:
        """CPU microseconds per record: the most stable figure on a noisy machine."""
        return self.cpu / self.records * 1e6 if self.records else 0.0

    @property
    def work_us(self) -> float:
        """Measured microseconds per call of the work function (0 without simulated work)."""
        return self.work_seconds / self.work_calls * 1e6 if self.work_calls else 0.0

    @property
    def rate(self) -> float:
        """Records per second over the processing window."""
        return self.records / self.seconds if self.seconds > 0 else float("inf")

    @property
    def settled_rate(self) -> float:
        """Records per second until everything was committed (worker runs)."""
        return self.records / self.settled if self.settled > 0 else float("inf")


def kafka_settings(bootstrap: str, group: str, client: Mapping[str, object] | None = None) -> KafkaSettings:
    """The streamer Kafka settings of a benchmark run: defaults but for the broker and group, plus
    ``client`` as ``[kafka.client]`` (extra librdkafka settings, over streamer's own)."""
    return KafkaSettings(bootstrap_servers=bootstrap, group_id=group, client=dict(client or {}))


def raw_run(
    bootstrap: str,
    topic: BenchTopic,
    group: str,
    batch: int = 500,
    timeout: float = 0.5,
    work_s: float = 0.0,
    *,
    client: Mapping[str, object] | None = None,
    label: str = "raw",
) -> Run:
    """The baseline: a bare confluent-kafka loop, ``consume(batch, timeout)``, touching each value
    (and, with ``work_s``, spinning that long per record, like ``busy_handler``, each spin timed).

    The consumer gets streamer's own librdkafka configuration (auto-commit off, the same fetch
    settings and assignment strategy), so that the ratio worker/raw measures streamer's Python
    overhead and not a client setting; ``client`` goes over it the way ``[kafka.client]`` goes
    over a worker's (``worker_run(client=...)``).
    """
    expected = topic.records
    clock = time.perf_counter
    started, cpu = clock(), time.process_time()
    consumer = Consumer(consumer_config(kafka_settings(bootstrap, group, client)))
    consumer.subscribe([topic.name])
    consume = consumer.consume
    seen = 0
    first = 0.0
    spent = 0.0
    while seen < expected:
        msgs = consume(batch, timeout)
        if not msgs:
            if clock() - started > RUN_DEADLINE_S:
                raise RuntimeError(f"{label} loop read {seen} of {expected} records in {RUN_DEADLINE_S} s")
            continue
        if not first:
            first = clock()
        if work_s:
            for msg in msgs:
                msg.value()
                before = clock()
                spin(work_s)
                spent += clock() - before
        else:
            for msg in msgs:
                msg.value()
        seen += len(msgs)
    last = clock()
    consumer.close()
    return Run(
        label,
        seen,
        last - first,
        clock() - started,
        cpu=time.process_time() - cpu,
        work_seconds=spent,
        work_calls=seen if work_s else 0,
    )


class SourceProbe:
    """Times a worker's run from the outside, per batch and per commit, never per record.

    It wraps four methods of the source the worker built for itself (so the worker runs with its
    production wiring: commit and statistics callbacks included):

    - ``poll``: ``first`` is when the first non-empty batch came back;
    - ``pause``: ``done`` is the last call, which a bounded (``until_end``) run makes right after
      the last record of each partition;
    - ``commit``: counts commits and keeps the offsets of each asynchronous one, in order;
    - ``close``: ``closing`` is when the worker closed the source, after its final synchronous
      commit returned, i.e. when everything processed was also committed.

    Asynchronous commits are acknowledged in the order they were sent (one coordinator
    connection), so the worker's own counters tell how many have been acknowledged; the probe
    then knows the committed position and, at every poll, how many processed records a crash at
    that moment would make the next run read again (``max_unacked``).
    """

    def __init__(self, worker: Worker, lows: dict[int, int]) -> None:
        self._worker = worker
        self._lows = lows
        source = worker._source  # the one private attribute the benchmarks reach into
        self._poll, self._pause, self._commit, self._close = (
            source.poll,
            source.pause,
            source.commit,
            source.close,
        )
        source.poll, source.pause, source.commit, source.close = (  # type: ignore[method-assign]  # timing wrappers, bench only
            self.poll,
            self.pause,
            self.commit,
            self.close,
        )
        self.first = 0.0
        self.done = 0.0
        self.closing = 0.0
        self.commits_sent = 0
        self.max_unacked = 0
        self._sent: deque[dict[int, int]] = deque()  # asynchronous commits not yet acknowledged
        self._sync_ok = 0
        self._send_failed = 0
        self._folded = 0
        self._position: dict[int, int] = {}

    def _fold(self, offsets: Iterable[tuple[int, int]]) -> None:
        for partition, offset in offsets:
            if offset > self._position.get(partition, -1):
                self._position[partition] = offset

    def _note_unacked(self) -> None:
        stats = self._worker.stats
        acknowledged = stats.commits + stats.commit_errors - self._sync_ok - self._send_failed
        while self._folded < acknowledged and self._sent:
            self._fold(self._sent.popleft().items())
            self._folded += 1
        committed = sum(offset - self._lows.get(p, 0) for p, offset in self._position.items())
        self.max_unacked = max(self.max_unacked, stats.processed + stats.dropped - committed)

    def poll(self, max_records: int, timeout: float) -> list[Any]:
        if self.first:
            self._note_unacked()  # acknowledgements arrive inside poll: this is the worst moment
        batch: list[Any] = self._poll(max_records, timeout)
        if batch and not self.first:
            self.first = time.perf_counter()
        return batch

    def pause(self, partitions: list[tuple[str, int]]) -> None:
        self.done = time.perf_counter()
        self._pause(partitions)

    def commit(
        self,
        offsets: dict[tuple[str, int], int],
        metadata: Mapping[tuple[str, int], str],
        *,
        asynchronous: bool,
    ) -> None:
        self.commits_sent += 1
        by_partition = {p: o for (_, p), o in offsets.items()}
        if not asynchronous:
            self._note_unacked()
        try:
            self._commit(offsets, metadata, asynchronous=asynchronous)
        except KafkaException:
            if asynchronous:
                self._send_failed += 1
            raise
        if asynchronous:
            self._sent.append(by_partition)
        else:
            self._sync_ok += 1
            self._fold(by_partition.items())

    def close(self) -> None:
        if not self.closing:
            self.closing = time.perf_counter()
        self._close()


def noop(_msg: Message) -> None:
    """The benchmark handler: does nothing, so that only the framework is measured."""


def spin(seconds: float) -> None:
    """Keep the CPU busy for ``seconds``: simulated per-record work."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


@dataclass
class WorkTime:
    """Time spent in a busy handler's ``spin`` calls (perf_counter around each call, summed)."""

    seconds: float = 0.0
    calls: int = 0


def busy_handler(work_s: float, timing: WorkTime | None = None) -> Callable[[Message], None]:
    """A handler that touches the value and spins ``work_s`` per record (``noop`` when 0), adding
    the time of each spin to ``timing``."""
    if not work_s:
        return noop
    clock, spent = time.perf_counter, timing if timing is not None else WorkTime()

    def handler(msg: Message) -> None:
        _ = msg.value
        before = clock()
        spin(work_s)
        spent.seconds += clock() - before
        spent.calls += 1

    return handler


def worker_run(
    bootstrap: str,
    topic: BenchTopic,
    group: str,
    *,
    every_records: int | None = None,
    every_seconds: float | None = None,
    label: str = "worker",
    handler: Callable[[Message], None] = noop,
    work_s: float = 0.0,
    client: Mapping[str, object] | None = None,
    wrap: Callable[[Callable[[], int]], int] | None = None,
    watch: Callable[[Worker], None] | None = None,
    extra: dict[str, dict[str, object]] | None = None,
) -> Run:
    """Run a bounded streamer Worker over ``topic`` in a fresh group, in this process.

    ``every_records`` and ``every_seconds`` set ``[commit]`` (None: streamer's shipped default);
    ``work_s`` runs ``busy_handler(work_s)`` instead of ``handler`` (its spins timed in the run);
    ``client`` is the worker's ``[kafka.client]`` (extra librdkafka settings); ``extra`` holds
    further settings sections. ``wrap`` (optional) calls ``worker.run`` itself, e.g. under a
    profiler; ``watch`` (optional) gets the worker just before it runs, e.g. to sample its stats.
    """
    if work_s and handler is not noop:
        raise ValueError("worker_run: pass a handler or work_s, not both")
    timing = WorkTime()
    if work_s:
        handler = busy_handler(work_s, timing)
    started, cpu = time.perf_counter(), time.process_time()
    kafka: dict[str, object] = {"bootstrap_servers": bootstrap, "group_id": group}
    if client:
        kafka["client"] = dict(client)
    commit = {"every_records": every_records, "every_seconds": every_seconds}
    settings = load_settings(
        kafka=kafka,
        commit={key: value for key, value in commit.items() if value is not None},
        **(extra or {}),
    )
    worker = Worker(settings, {topic.name: handler}, until_end=True)
    probe = SourceProbe(worker, topic.lows)
    if watch is not None:
        watch(worker)
    code = wrap(worker.run) if wrap is not None else worker.run()
    wall = time.perf_counter() - started
    done = worker.stats.processed + worker.stats.dropped
    if code != EXIT_OK or done != topic.records:
        prefix = "" if label == "worker" else f"{label}: "
        raise RuntimeError(f"{prefix}worker exited {code} after {done} of {topic.records} records")
    return Run(
        label,
        done,
        probe.done - probe.first,
        wall,
        settled=probe.closing - probe.first,
        commits=worker.stats.commits,
        commit_errors=worker.stats.commit_errors,
        commits_sent=probe.commits_sent,
        max_unacked=probe.max_unacked,
        # WorkerStats.lost counts lost-partition events; older versions only count all callbacks.
        lost=getattr(worker.stats, "lost", max(worker.stats.rebalances - 2, 0)),
        cpu=time.process_time() - cpu,
        work_seconds=timing.seconds,
        work_calls=timing.calls,
    )


# -- statistics and tables --------------------------------------------------------------------


def best(runs: Iterable[Run]) -> float:
    """Highest records/s of ``runs``."""
    return max(r.rate for r in runs)


def median(runs: Iterable[Run]) -> float:
    """Median records/s of ``runs``."""
    return statistics.median(r.rate for r in runs)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object] | str], *, title: str = "") -> None:
    """Print rows under headers: the first column left-aligned, the others right-aligned.

    A row that is a plain string is printed as it is (a section heading).
    """
    cells = [[str(c) for c in row] if not isinstance(row, str) else row for row in rows]
    grid = [r for r in cells if not isinstance(r, str)]
    widths = [max(len(h), *(len(r[i]) for r in grid)) if grid else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        return "  ".join(
            [first.ljust(widths[0]), *(v.rjust(w) for v, w in zip(rest, widths[1:], strict=True))]
        )

    if title:
        print(f"\n{title}\n")
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(row if isinstance(row, str) else line(row))


def fmt_rate(rate: float) -> str:
    """Records per second with thousands separators."""
    return f"{rate:,.0f}"


def progress(run: Run, repeat: int) -> None:
    """One line per measured run, as it finishes, so that a slow run is visible."""
    extra = (
        f"  settled {run.settled:6.2f} s  commits {run.commits:,}  max unacked {run.max_unacked:,}"
        if not run.label.startswith("raw")
        else ""
    )
    print(
        f"  #{repeat} {run.label:<30} {run.records:>9,} rec  {run.seconds:7.3f} s  "
        f"{fmt_rate(run.rate):>9} rec/s  wall {run.wall:6.2f} s{extra}",
        flush=True,
    )


# -- keyed topics (bench.concurrency) ---------------------------------------------------------


def record_key(index: int) -> bytes:
    """The Kafka key number ``index`` of a keyed benchmark topic."""
    return b"key-%06d" % index


def fill_keyed_topic(
    bootstrap: str, topic: str, records: int, partitions: int, value_size: int, keys: int
) -> float:
    """Produce ``records`` values with ``keys`` distinct keys; seconds.

    Record i has key ``i % keys``, and key k always goes to partition ``k % partitions`` (like a
    hash partitioner: a key lives in one partition), so each partition cycles through its keys and
    consecutive records of a partition have different keys. Producer settings as ``fill_topic``.
    """
    producer = fill_producer(bootstrap)
    value = (b"0123456789" * (value_size // 10 + 1))[:value_size]
    names = [record_key(k) for k in range(min(keys, records) or 1)]
    produce = producer.produce
    started = time.perf_counter()
    for i in range(records):
        k = i % len(names)
        try:
            produce(topic, value, names[k], partition=k % partitions)
        except BufferError:
            producer.poll(0.1)
            produce(topic, value, names[k], partition=k % partitions)
        if i % 50_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError(f"could not deliver every record to {topic}")
    return time.perf_counter() - started


def prepare_keyed_topic(
    args: argparse.Namespace, resources: Resources, records: int, *, keys: int, suffix: str = ""
) -> BenchTopic:
    """``prepare_topic`` with ``fill_keyed_topic``: reuse ``--topic`` plus ``suffix`` if it
    exists (as it is: its keys are not checked), else create and fill a keyed topic."""
    name = f"{args.topic}{suffix}" if args.topic else unique(f"bench{suffix}")
    resources.used.append(name)
    marks = watermarks(args.bootstrap, name) if args.topic else None
    if marks is not None:
        existing = sum(high - low for low, high in marks.values())
        note = "" if existing == records else f" (not {records:,}: --records does not apply to it)"
        print(f"reusing topic {name}: {existing:,} records{note}")
        return BenchTopic(name, existing, created=False, lows={p: low for p, (low, _) in marks.items()})
    create_topic(args.bootstrap, name, args.partitions)
    resources.topics.append(name)
    seconds = fill_keyed_topic(args.bootstrap, name, records, args.partitions, args.value_size, keys)
    print(
        f"filled topic {name}: {records:,} records of {args.value_size} bytes, "
        f"{min(keys, records):,} keys, {args.partitions} partitions, in {seconds:.1f} s "
        f"({records / seconds:,.0f} rec/s)"
    )
    marks = watermarks(args.bootstrap, name) or {}
    filled = sum(high - low for low, high in marks.values())
    if filled != records:
        raise RuntimeError(f"topic {name} holds {filled} records after the fill, expected {records}")
    return BenchTopic(name, records, created=True, lows={p: low for p, (low, _) in marks.items()})

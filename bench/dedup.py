"""Dedup cost (store format 2): the Worker with dedup on in each mark mode, against dedup off and a
raw confluent-kafka loop over one pre-filled topic, measured in the same run; and Redis memory per
done mark, format 1 (one string per key) against format 2 (hash shards, bitmaps).

    .venv/bin/python -m bench.dedup                                       # defaults, ~7-9 min
    .venv/bin/python -m bench.dedup --quick                               # small sizes, ~20 s
    .venv/bin/python -m bench.dedup --records 50000 --keys 100000 --repeat 1
    .venv/bin/python -m bench.dedup --skip-memory                         # the throughput table only
    .venv/bin/python -m bench.dedup --skip-throughput --keys 1000000      # the memory table only

Defaults: 300,000 records of 100 B over 3 partitions, each carrying a UUID in the ``message-id``
header; 3 passes (alternately in the order of the table and in reverse); memory at 1,000,000 and
10,000,000 keys (the 10,000,000 keys of format 1 take ~1.3 GB of Redis memory for a minute).
``--quick`` is ``--records 50000 --repeat 1 --keys 100000`` (explicit options win).

Throughput rows: ``raw`` (a bare ``consume(500)`` loop), ``dedup off``, and dedup on with
mark_mode "pipelined" (the default, mark_every 8), "batch" and "per_record", pipelined with
``partition_local_ids = true``, and pipelined with ``key_header = ""`` (records keyed by their
position: bitmaps). Every row (the raw loop too) runs with ``fetch.queue.backoff.ms`` =
``--fetch-queue-backoff-ms`` (10 by default; librdkafka's default of 1,000 ms holds a fast
loop back once a partition's fetch queue reached ``queued.min.messages``); each pass also runs the
raw loop once at librdkafka's default and prints the ratio (the throttle check). Each dedup run
uses a namespace of its own (removed afterwards), so no record is a dedup hit. Redis CPU per record
is the ``INFO cpu`` delta (used_cpu_user + used_cpu_sys) of the Redis at ``--redis-url`` over the
run, group join and final commit included.

Memory rows: ``INFO memory`` used_memory delta in database 15 of ``--redis-url`` (FLUSHDB before
and after each measurement): format 1 (``SET <ns>:{g}:<id> 1 PX <window>``, pipelined), format 2
id-keyed (``RedisDedupStore.send_marks``/``wait_marks``, shard bits = ``shard_bits_for(n)`` as
``[dedup] expected_keys = n`` gives) and format 2 position-keyed (bitmaps, consecutive offsets over
4 partitions). Needs the dev services (Kafka and Redis); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import redis
from confluent_kafka import Consumer, TopicPartition

from bench._common import (
    LIBRDKAFKA_BACKOFF_MS,
    LIBRDKAFKA_QUEUED_MIN,
    BenchTopic,
    Resources,
    Run,
    base_parser,
    create_topic,
    fill_producer,
    fmt_rate,
    kafka_settings,
    print_context,
    print_table,
    progress,
    raw_run,
    unique,
    watermarks,
    worker_run,
)
from streamer.dedup import DedupKey, KeyLayout, RedisDedupStore, shard_bits_for
from streamer.logs import configure_logging
from streamer.settings import DedupSettings
from streamer.source import consumer_config
from streamer.stats import WorkerStats
from streamer.worker import Worker

ID_HEADER = "message-id"
#: Goals of format 2: bytes of Redis memory per done mark.
ID_BYTES_GOAL, POSITION_BYTES_GOAL = 32.0, 1.0
#: Keys per pipeline round trip in the memory measurement.
PIPELINE_KEYS = 10_000
#: Partitions the position-keyed marks of the memory measurement spread over.
MEMORY_PARTITIONS = 4

DEFAULTS = DedupSettings()
WINDOW_MS = int(DEFAULTS.window_seconds * 1000)


class QuietPersistence(logging.Filter):
    """Counts the worker's error about a Redis without persistence instead of printing it each run
    (the dev Redis may run without; the context line says so once)."""

    EVENT = "dedup Redis has no persistence"
    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, dict) and msg.get("event") == self.EVENT:
            QuietPersistence.count += 1
            return False
        return True


def log(text: str) -> None:
    """A progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


# -- the rows of the throughput table ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A configuration of the throughput table: the raw loop (dedup None) or a worker."""

    label: str
    #: None: the raw loop; else the worker's [dedup] section (empty: dedup off).
    dedup: dict[str, object] | None


ROWS = (
    Row("raw", None),
    Row("dedup off", {}),
    Row("dedup on (pipelined)", {"mark_mode": "pipelined", "mark_every": 8}),
    Row("dedup on (batch)", {"mark_mode": "batch"}),
    Row("dedup on (per_record)", {"mark_mode": "per_record"}),
    Row(
        "dedup on (partition_local_ids)",
        {"mark_mode": "pipelined", "mark_every": 8, "partition_local_ids": True},
    ),
    Row("dedup on (no ids: bitmaps)", {"mark_mode": "pipelined", "mark_every": 8, "key_header": ""}),
)
RAW, OFF = ROWS[0].label, ROWS[1].label


@dataclass
class Measured:
    """One measured run of a row, with the Redis CPU it cost."""

    run: Run
    redis_cpu: float  # seconds of Redis CPU (user + sys) over the run
    stats: WorkerStats | None = None

    @property
    def redis_us(self) -> float:
        """Redis CPU microseconds per record."""
        return self.redis_cpu / self.run.records * 1e6 if self.run.records else 0.0


@dataclass
class Results:
    """Measurements per row, by pass (index = pass - 1)."""

    runs: dict[str, list[Measured]] = field(default_factory=lambda: {r.label: [] for r in ROWS})
    throttled: list[Run] = field(default_factory=list)  # raw at librdkafka's default backoff

    def ratios(self, label: str, base: str) -> list[float]:
        """Per pass, the rate of ``label`` over the rate of ``base`` in the same pass."""
        return [m.run.rate / b.run.rate for m, b in zip(self.runs[label], self.runs[base], strict=True)]


# -- topic with idempotency keys ---------------------------------------------------------------


def fill_id_topic(bootstrap: str, topic: str, records: int, partitions: int, value_size: int) -> float:
    """Produce ``records`` values round-robin over the partitions, each with a UUID of its own in
    the ``message-id`` header; seconds. The producer of ``bench._common.fill_topic``."""
    producer = fill_producer(bootstrap)
    value = (b"0123456789" * (value_size // 10 + 1))[:value_size]
    produce = producer.produce
    started = time.perf_counter()
    for i in range(records):
        headers: list[tuple[str, str | bytes | None]] = [(ID_HEADER, str(uuid.uuid4()).encode())]
        try:
            produce(topic, value, partition=i % partitions, headers=headers)
        except BufferError:
            producer.poll(0.1)
            produce(topic, value, partition=i % partitions, headers=headers)
        if i % 50_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError(f"could not deliver every record to {topic}")
    return time.perf_counter() - started


def first_headers(bootstrap: str, topic: str, partition: int, offset: int) -> list[str]:
    """The header names of the record at ``offset`` of a partition (none if it does not come in 10 s)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("bench-peek"), "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                headers = msg.headers() or []
                return list(headers) if isinstance(headers, dict) else [k for k, _ in headers]
        return []
    finally:
        consumer.close()


def prepare_id_topic(args: argparse.Namespace, resources: Resources) -> BenchTopic:
    """``bench._common.prepare_topic`` with ``fill_id_topic``: reuse ``--topic`` if it exists
    (its first record must carry a ``message-id`` header), else create and fill a topic."""
    name = args.topic or unique("bench-dedup")
    resources.used.append(name)
    marks = watermarks(args.bootstrap, name) if args.topic else None
    if marks is not None:
        existing = sum(high - low for low, high in marks.values())
        partition, (low, _) = min(marks.items())
        if ID_HEADER not in first_headers(args.bootstrap, name, partition, low):
            raise SystemExit(f"topic {name} exists but its records carry no {ID_HEADER!r} header")
        note = "" if existing == args.records else f" (not {args.records:,}: --records does not apply to it)"
        print(f"reusing topic {name}: {existing:,} records{note}")
        return BenchTopic(name, existing, created=False, lows={p: low for p, (low, _) in marks.items()})
    create_topic(args.bootstrap, name, args.partitions)
    resources.topics.append(name)
    seconds = fill_id_topic(args.bootstrap, name, args.records, args.partitions, args.value_size)
    print(
        f"filled topic {name}: {args.records:,} records of {args.value_size} bytes with a UUID in the "
        f"{ID_HEADER!r} header, {args.partitions} partitions, in {seconds:.1f} s "
        f"({args.records / seconds:,.0f} rec/s)"
    )
    marks = watermarks(args.bootstrap, name) or {}
    filled = sum(high - low for low, high in marks.values())
    if filled != args.records:
        raise RuntimeError(f"topic {name} holds {filled} records after the fill, expected {args.records}")
    return BenchTopic(name, args.records, created=True, lows={p: low for p, (low, _) in marks.items()})


def redis_cpu(client: redis.Redis) -> float:
    """Seconds of CPU the Redis server used so far (user + system, every thread)."""
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def forget(client: redis.Redis, namespace: str) -> None:
    """Remove every key of ``namespace``."""
    names = list(client.scan_iter(match=f"{namespace}:*", count=10_000))
    for start in range(0, len(names), 1000):
        client.unlink(*names[start : start + 1000])


def measure_row(
    row: Row, args: argparse.Namespace, topic: BenchTopic, resources: Resources, client: dict[str, int]
) -> Measured:
    """Run ``row`` once in a fresh group (and, with dedup, a fresh namespace)."""
    db = redis.Redis.from_url(args.redis_url)
    group = resources.group("bench-dedup")
    before = redis_cpu(db)
    if row.dedup is None:
        run = raw_run(args.bootstrap, topic, group, client=client, label=RAW)
        return Measured(run, redis_cpu(db) - before)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    dedup: dict[str, object] = {
        "enabled": bool(row.dedup),
        "redis_url": args.redis_url,
        "namespace": namespace,
        **row.dedup,
    }
    workers: list[Worker] = []
    try:
        run = worker_run(
            args.bootstrap,
            topic,
            group,
            every_records=1000,
            every_seconds=5.0,
            label=row.label,
            client=client,
            watch=workers.append,
            extra={"dedup": dedup, "dead_letter": {"enabled": False}, "metrics": {"enabled": False}},
        )
        spent = redis_cpu(db) - before
    finally:
        forget(db, namespace)
    stats = workers[0].stats
    if stats.dedup_hits or stats.dedup_errors or stats.processed_without_dedup or stats.dedup_contested:
        raise RuntimeError(
            f"{row.label}: {stats.dedup_hits} dedup hits, {stats.dedup_errors} errors, "
            f"{stats.dedup_contested} contested, {stats.processed_without_dedup} without dedup (expected 0)"
        )
    return Measured(run, spent, stats)


def throughput(args: argparse.Namespace) -> None:
    """Measure every row ``--repeat`` times over one topic and print the table."""
    backoff = args.fetch_queue_backoff_ms
    # Explicit in every row, also librdkafka's default: streamer's shipped settings may set their own.
    client = {"fetch.queue.backoff.ms": backoff if backoff >= 0 else LIBRDKAFKA_BACKOFF_MS}
    resources = Resources(args.bootstrap, keep=args.keep)
    results = Results()
    try:
        topic = prepare_id_topic(args, resources)
        for i in range(1, args.repeat + 1):
            order = ROWS if i % 2 else tuple(reversed(ROWS))
            log(f"pass {i} of {args.repeat}: {', '.join(r.label for r in order)}")
            for row in order:
                done = measure_row(row, args, topic, resources, client)
                results.runs[row.label].append(done)
                progress(done.run, i)
                if row.dedup is None and backoff >= 0:  # the throttle check, next to the raw run it checks
                    group = resources.group("bench-dedup")
                    default = {"fetch.queue.backoff.ms": LIBRDKAFKA_BACKOFF_MS}
                    check = raw_run(
                        args.bootstrap, topic, group, client=default, label="raw (default backoff)"
                    )
                    results.throttled.append(check)
                    progress(check, i)
    finally:
        resources.cleanup()
    print_throughput(args, topic, results, backoff)


def print_throughput(args: argparse.Namespace, topic: BenchTopic, results: Results, backoff: int) -> None:
    """The throughput table and the checks below it."""
    rows = []
    for row in ROWS:
        runs = results.runs[row.label]
        rates = [m.run.rate for m in runs]
        rows.append(
            (
                row.label,
                len(runs),
                fmt_rate(statistics.median(rates)),
                fmt_rate(max(rates)),
                f"{statistics.median(results.ratios(row.label, RAW)):.2f}",
                "-" if row.dedup is None else f"{statistics.median(results.ratios(row.label, OFF)):.2f}",
                f"{statistics.median(m.run.cpu_us for m in runs):.2f}",
                f"{statistics.median(m.redis_us for m in runs):.2f}",
                fmt_rate(statistics.median(m.run.settled_rate for m in runs))
                if row.dedup is not None
                else "-",
            )
        )
    used = f"{backoff} ms" if backoff >= 0 else f"librdkafka's default ({LIBRDKAFKA_BACKOFF_MS} ms)"
    print_table(
        (
            "",
            "runs",
            "median rec/s",
            "best rec/s",
            "ratio to raw",
            "ratio to dedup off",
            "worker CPU µs/rec",
            "Redis CPU µs/rec",
            "settled rec/s",
        ),
        rows,
        title=(
            f"{topic.records:,} records of {args.value_size} B with a UUID in {ID_HEADER!r}, "
            f"{len(topic.lows)} partitions; poll batch 500; fetch.queue.backoff.ms = {used} in every row; "
            f"medians over passes (ratios: per pass, against the row of the same pass)"
        ),
    )
    print(
        "\nrec/s: first record received to last processed; settled: until the final commit returned. "
        "worker CPU: this process, every thread, consumer created to closed (raw: the raw loop's); "
        "Redis CPU: INFO cpu delta over the run."
    )
    print(
        f"dedup settings: defaults (window {DEFAULTS.window_seconds / 86_400:g} days, expected_keys "
        f"{DEFAULTS.expected_keys:,} -> shard bits {shard_bits_for(DEFAULTS.expected_keys)}, lease "
        f"{DEFAULTS.lease_seconds:g} s, track_reprocessed auto: high-water marks on), a fresh namespace per "
        "run; metrics and dead letters off; commit every 1,000 records / 5 s"
    )
    checked = [m for r in ROWS[2:] for m in results.runs[r.label]]
    print(
        f"checked: each of the {len(checked)} dedup-on runs processed every record with 0 dedup hits, "
        "0 store errors, 0 contested records"
    )
    if results.throttled:
        shipped = consumer_config(kafka_settings(args.bootstrap, "bench-dedup-shown"))
        queued_min = shipped.get("queued.min.messages", LIBRDKAFKA_QUEUED_MIN)
        raw_rates = [m.run.rate for m in results.runs[RAW]]
        ratios = [t.rate / r for t, r in zip(results.throttled, raw_rates, strict=True)]
        print(
            f"throttle check: the raw loop at librdkafka's default fetch.queue.backoff.ms "
            f"({LIBRDKAFKA_BACKOFF_MS} ms) ran at {', '.join(fmt_rate(t.rate) for t in results.throttled)} "
            f"rec/s, {', '.join(f'{x:.2f}' for x in ratios)} x the raw row's rate at {backoff} ms in the "
            f"same pass (the backoff applies once a partition's fetch queue holds queued.min.messages = "
            f"{queued_min:,}; here {topic.records // max(len(topic.lows), 1):,} records per "
            "partition)"
        )
    else:
        print("throttle check: off (every row at librdkafka's default fetch.queue.backoff.ms)")


# -- Redis memory per mark ---------------------------------------------------------------------


def uuids(count: int, seed: int) -> Iterator[bytes]:
    """``count`` distinct UUID strings (36 bytes, the common message id), reproducible per seed."""
    for i in range(count):
        yield str(uuid.UUID(bytes=hashlib.blake2b(b"%d:%d" % (seed, i), digest_size=16).digest())).encode()


def chunks(items: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    """``items`` in lists of ``size``."""
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Progress:
    """A progress line on stderr about every million keys."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.started = time.perf_counter()
        self._next = 1_000_000

    def note(self, done: int) -> None:
        if done >= self._next or done == self.total:
            seconds = time.perf_counter() - self.started
            log(
                f"  {self.what}: {done:,} of {self.total:,} keys, {seconds:.1f} s "
                f"({done / seconds:,.0f} keys/s)"
            )
            while self._next <= done:
                self._next += 1_000_000

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def write_format1(client: redis.Redis, layout: KeyLayout, n: int) -> None:
    """Format 1: one string per key, ``SET <ns>:{g}:<id> 1 PX <window>``, pipelined as the old
    store did (its ids longer than 32 bytes stored as a 16-byte digest: ``KeyLayout.legacy``)."""
    conn: Any = client.connection_pool.get_connection()
    window = b"%d" % WINDOW_MS
    done = unread = 0
    bar = Progress("format 1", n)
    try:
        for batch in chunks(uuids(n, 1), PIPELINE_KEYS):
            commands = [
                (b"SET", layout.legacy(DedupKey(raw, None, "t", 0, 0)), b"1", b"PX", window) for raw in batch
            ]
            packed = conn.pack_commands(commands)
            for _ in range(unread):  # the previous round trip's replies: Redis worked meanwhile
                conn.read_response(disable_decoding=True)
            conn.send_packed_command(packed, check_health=False)
            unread = len(commands)
            done += len(batch)
            bar.note(done)
        for _ in range(unread):
            conn.read_response(disable_decoding=True)
    finally:
        client.connection_pool.release(conn)


def write_ids(store: RedisDedupStore, n: int) -> None:
    """Format 2, id-keyed: the store's own pipelined marks (HSET into bucket shards)."""
    done = 0
    bar = Progress("format 2 id-keyed", n)
    for batch in chunks(uuids(n, 2), PIPELINE_KEYS):
        keys = [DedupKey(raw, hashlib.blake2b(raw, digest_size=16).digest(), "t", 0, 0) for raw in batch]
        store.wait_marks()  # the previous round trip's replies: Redis worked meanwhile
        store.send_marks(keys)
        done += len(batch)
        bar.note(done)
    store.wait_marks()


def write_positions(store: RedisDedupStore, n: int) -> None:
    """Format 2, position-keyed: consecutive offsets round-robin over a few partitions (bitmaps)."""
    done = 0
    bar = Progress("format 2 position-keyed", n)
    while done < n:
        count = min(PIPELINE_KEYS, n - done)
        keys = [
            DedupKey(b"", None, "orders", i % MEMORY_PARTITIONS, i // MEMORY_PARTITIONS)
            for i in range(done, done + count)
        ]
        store.wait_marks()
        store.send_marks(keys)
        done += count
        bar.note(done)
    store.wait_marks()


@dataclass
class MemoryRow:
    """One memory measurement."""

    label: str
    keys: int
    layout: str
    used: int  # used_memory delta, bytes
    seconds: float
    goal: float | None

    @property
    def per_key(self) -> float:
        return self.used / self.keys


def used_memory(client: redis.Redis) -> int:
    """Redis' used_memory, bytes."""
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def clients(client: redis.Redis) -> int:
    """Connections Redis has open."""
    info: dict[str, Any] = client.info("clients")
    return int(info["connected_clients"])


def measured(
    client: redis.Redis,
    url: str,
    write: Callable[[redis.Redis], None],
    inspect: Callable[[], None] | None = None,
) -> tuple[int, float]:
    """used_memory delta (bytes) and seconds of ``write`` on an empty database, emptied after.

    ``write`` gets a client of its own, whose connections are closed (and gone from Redis) before
    the second reading: a writer's query and reply buffers are no part of the marks. ``inspect``
    runs after the reading, before the database is emptied.
    """
    client.flushdb()
    open_before = clients(client)
    before = used_memory(client)
    writer = redis.Redis.from_url(url, socket_timeout=120)
    started = time.perf_counter()
    write(writer)
    seconds = time.perf_counter() - started
    writer.connection_pool.disconnect()
    deadline = time.monotonic() + 10
    while clients(client) > open_before and time.monotonic() < deadline:
        time.sleep(0.05)
    used = used_memory(client) - before
    if inspect is not None:
        inspect()
    client.flushdb()
    return used, seconds


def memory_rows(client: redis.Redis, url: str, n: int, rows: list[MemoryRow]) -> str:
    """Measure format 1, format 2 id-keyed and position-keyed at ``n`` keys into ``rows``; the
    shard report of the id-keyed run."""
    bits = shard_bits_for(n)
    log(f"memory at {n:,} keys (shard bits {bits})")
    layout = KeyLayout("streamer", "orders", bits)
    notes: list[str] = []

    def format1(writer: redis.Redis) -> None:
        write_format1(writer, layout, n)

    def ids(writer: redis.Redis) -> None:
        write_ids(RedisDedupStore(writer, layout, window_ms=WINDOW_MS), n)

    def positions(writer: redis.Redis) -> None:
        write_positions(RedisDedupStore(writer, layout, window_ms=WINDOW_MS), n)

    def report() -> None:
        notes.append(shard_report(client, layout, n))

    used, seconds = measured(client, url, format1)
    rows.append(MemoryRow("format 1 (SET ... PX)", n, "one string per key", used, seconds, None))
    used, seconds = measured(client, url, ids, report)
    rows.append(MemoryRow("format 2 id-keyed", n, f"{1 << bits:,} shards", used, seconds, ID_BYTES_GOAL))
    used, seconds = measured(client, url, positions)
    maps = MEMORY_PARTITIONS * -(-(n // MEMORY_PARTITIONS) // (1 << 16))
    rows.append(
        MemoryRow("format 2 position-keyed", n, f"{maps:,} bitmaps", used, seconds, POSITION_BYTES_GOAL)
    )
    return notes[0]


def memory(args: argparse.Namespace) -> None:
    """Bytes per done mark at each ``--keys`` count, format 1 against format 2; print the table."""
    url = args.redis_url.rsplit("/", 1)[0] + "/15"
    client = redis.Redis.from_url(url, socket_timeout=120)
    listpack = client.config_get("hash-max-listpack-*")
    rows: list[MemoryRow] = []
    notes: list[str] = []
    for n in args.keys:
        notes.append(memory_rows(client, url, n, rows))
    print_table(
        ("", "keys", "layout", "used_memory", "bytes/key", "goal", "", "write s", "keys/s"),
        [
            (
                r.label,
                f"{r.keys:,}",
                r.layout,
                f"{r.used / 1e6:,.1f} MB",
                f"{r.per_key:.2f}",
                "-" if r.goal is None else f"<= {r.goal:g}",
                "" if r.goal is None else ("met" if r.per_key <= r.goal else "NOT met"),
                f"{r.seconds:.1f}",
                fmt_rate(r.keys / r.seconds),
            )
            for r in rows
        ],
        title=(
            f"Redis memory per done mark (INFO memory used_memory delta, db 15 of {url}; group 'orders', "
            f"window {DEFAULTS.window_seconds / 86_400:g} days; ids are 36-byte UUIDs; "
            f"{PIPELINE_KEYS:,} keys per pipeline round trip)"
        ),
    )
    print()
    print(
        "hash-max-listpack-entries = "
        f"{listpack.get('hash-max-listpack-entries')}, hash-max-listpack-value = "
        f"{listpack.get('hash-max-listpack-value')} (Redis' default: 128 and 64)"
    )
    for note in notes:
        print(note)


def shard_report(client: redis.Redis, layout: KeyLayout, n: int) -> str:
    """The encoding of one id shard key and a sample of shards' encodings and sizes."""
    bucket = int(time.time() * 1000) // WINDOW_MS
    first = next(uuids(1, 2))
    name = layout.shard(bucket, hashlib.blake2b(first, digest_size=16).digest())
    encoding = client.object("encoding", name)
    count = 1 << layout.shard_bits
    step = max(count // 512, 1)
    pipe = client.pipeline(transaction=False)
    sample = [layout.shard(bucket, i.to_bytes(4, "big")) for i in range(0, count, step)]
    for shard in sample:
        pipe.object("encoding", shard)
        pipe.hlen(shard)
    replies = pipe.execute()
    encodings = {e.decode() if isinstance(e, bytes) else str(e) for e in replies[0::2]}
    sizes: list[int] = replies[1::2]
    text = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    verdict = "ok" if text == "listpack" else "NOT listpack"
    return (
        f"{n:,} keys: OBJECT ENCODING {name.decode()} = {text} ({verdict}), "
        f"{client.hlen(name)} entries; {len(sample)} shards sampled: encodings {sorted(encodings)}, "
        f"entries min {min(sizes)} / median {statistics.median(sizes):g} / max {max(sizes)}"
    )


# -- command line ------------------------------------------------------------------------------


def key_counts(text: str) -> list[int]:
    """``--keys``: comma-separated counts."""
    counts = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < MEMORY_PARTITIONS:
        raise argparse.ArgumentTypeError(f"expected counts >= {MEMORY_PARTITIONS}, comma-separated")
    return counts


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options; ``--quick`` fills in the small sizes not given explicitly."""
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=300_000, repeat=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the dedup Redis")
    parser.add_argument(
        "--keys",
        type=key_counts,
        default=None,
        help="keys of the memory measurement, comma-separated (default 1000000,10000000)",
    )
    parser.add_argument(
        "--fetch-queue-backoff-ms",
        type=int,
        default=10,
        help="librdkafka fetch.queue.backoff.ms of every row (default 10; -1: librdkafka's default, "
        "and no throttle check)",
    )
    parser.add_argument("--quick", action="store_true", help="--records 50000 --repeat 1 --keys 100000")
    parser.add_argument("--skip-throughput", action="store_true", help="only the memory table")
    parser.add_argument("--skip-memory", action="store_true", help="only the throughput table")
    given = set(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(argv)
    if args.quick:
        if not any(a.startswith("--records") for a in given):
            args.records = 50_000
        if not any(a.startswith("--repeat") for a in given):
            args.repeat = 1
        if args.keys is None:
            args.keys = [100_000]
    if args.keys is None:
        args.keys = [1_000_000, 10_000_000]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the tables, return 0."""
    configure_logging("WARNING")
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietPersistence())
    args = parse(argv)
    started = time.perf_counter()
    print_context(args.bootstrap)
    db = redis.Redis.from_url(args.redis_url)
    info: dict[str, Any] = db.info("server")
    config = db.config_get("appendonly")
    config.update(db.config_get("save"))
    print(
        f"redis            {args.redis_url}: Redis {info.get('redis_version')}, appendonly "
        f"{config.get('appendonly')}, save {config.get('save')!r}"
    )
    backoff = args.fetch_queue_backoff_ms
    print(
        "fetch.queue.backoff.ms "
        + (
            f"{backoff} ms in every row, the raw loop and the workers ([kafka.client]); librdkafka's default "
            f"({LIBRDKAFKA_BACKOFF_MS} ms) is measured on the raw loop once per pass (the throttle check)"
            if backoff >= 0
            else f"librdkafka's default ({LIBRDKAFKA_BACKOFF_MS} ms) in every row, no throttle check"
        )
    )
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_memory:
        memory(args)
    if QuietPersistence.count:
        print(
            f"\n(the worker logged {QuietPersistence.count} time(s) {QuietPersistence.EVENT!r}: counted, not "
            "printed)"
        )
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

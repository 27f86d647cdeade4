"""Consume-transform-produce against the real broker: outputs across SIGKILLs, SIGTERMs,
rebalances and a zombie, at-least-once and exactly-once.

Workers run the app of ``tests/support/transform_app.py`` as real processes: each input record
becomes one output record on the output topic (same key and value), and streamer copies the
input's ``message-id`` header onto it, so reading the output topic back tells which inputs have
an output and how many.

- At-least-once (the default): every input has an output; an input whose offset is committed
  has its output on the broker (checked against samples of the group's commits taken while the
  workers ran); a SIGKILL makes the next owner re-run at most the re-read bound per partition,
  so the duplicates on the output topic stay within it.
- Exactly-once (``[processing] guarantee = "exactly_once"``): a ``read_committed`` reader sees
  each input's output exactly once across a SIGKILL storm, a SIGTERM and restart, a rebalance
  between two workers, and a zombie (a worker frozen past its session timeout while another
  takes over, then resumed: its transaction is aborted); a dead-lettered input is in the
  dead-letter topic exactly once and never in the output.

Kill points come from a seed printed at the start of each test; ``TRANSFORM_SEED=<seed>``
replays it (the points, not the timing of the machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest
from confluent_kafka import Consumer, ConsumerGroupState, IsolationLevel, KafkaError, TopicPartition
from confluent_kafka.admin import OffsetSpec

from streamer.exitcodes import EXIT_FAILED
from tests.conftest import TopicFactory, make_unique_name
from tests.integration.test_concurrency import Committed, committed_maps
from tests.integration.test_engine_defects import FAST_GROUP, describe_group
from tests.integration.workers import (
    REPO,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Effect,
    Worker,
    clean_env,
    read_effects,
    streamer_command,
)
from tests.support import wait_for
from tests.support.kafka import REQUEST_TIMEOUT_S, admin, committed_offsets, end_offsets, produce_records
from tests.support.transform_app import Behaviour

APP = "tests.support.transform_app:app"
PARTITIONS = 6
EVERY_RECORDS = 500
POLL_BATCH_SIZE = 100
#: Records one SIGKILL may make the next owner re-run, per partition: every_records since the
#: last acknowledged commit plus the two poll batches in flight (README, "Bounded re-reading").
REREAD_BOUND = EVERY_RECORDS + 2 * POLL_BATCH_SIZE
#: Concurrent dispatch: records in flight per worker (they add to the re-read bound).
CONCURRENCY = 64
#: A killed or frozen member leaves the group after 6 s; heartbeats tell of a rebalance within 0.5 s.
CLIENT: Mapping[str, Any] = FAST_GROUP
#: Exactly-once: the broker aborts a killed worker's open transaction after this many seconds,
#: which is how long it may hold back a read_committed reader of the output topic.
TXN_TIMEOUT_S = 10.0
#: Seconds a bounded run, or a run to a given commit, may take (start-up and group joins included).
RUN_TIMEOUT_S = 120.0
#: Seconds between two samples of the group's commits while workers run.
SAMPLE_EVERY_S = 0.5

Guarantee = Literal["at_least_once", "exactly_once"]


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The test's random seed (``TRANSFORM_SEED``, else random), printed."""
    fixed = os.environ.get("TRANSFORM_SEED")
    value = int(fixed) if fixed else random.SystemRandom().randrange(2**32)
    print(f"\nseed of {request.node.name}: {value} (rerun with TRANSFORM_SEED={value})")
    return value


def record_key(record: int) -> bytes:
    """The Kafka key of id ``record`` in the keyed tests: one of 128 keys, from a hash of the id."""
    digest = hashlib.blake2b(b"%d" % record, digest_size=4).digest()
    return b"k%d" % (int.from_bytes(digest, "big") % 128)


# -- workers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The settings and handler behaviour of a test's workers."""

    guarantee: Guarantee = "at_least_once"
    every_records: int = EVERY_RECORDS
    every_seconds: float = 0.0
    concurrency: int = 1
    ordering: str = "partition"
    async_handler: bool = False
    #: Per-record sleep while the test's slow file exists (the chaos phase).
    sleep_us: int = 300
    dead_letter: bool = False
    poison: frozenset[int] = frozenset()
    transaction_timeout_s: float = TXN_TIMEOUT_S
    #: librdkafka settings of the consumer and the producer.
    client: Mapping[str, Any] = field(default_factory=lambda: dict(CLIENT))

    def env(self, bootstrap: str, group: str) -> dict[str, str]:
        """The ``STREAMER_*`` variables of these settings."""
        return {
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "STREAMER_KAFKA__GROUP_ID": group,
            "STREAMER_KAFKA__POLL_BATCH_SIZE": str(POLL_BATCH_SIZE),
            "STREAMER_KAFKA__CLIENT": json.dumps(dict(self.client)),
            "STREAMER_COMMIT__EVERY_RECORDS": str(self.every_records),
            "STREAMER_COMMIT__EVERY_SECONDS": str(self.every_seconds),
            "STREAMER_PROCESSING__GUARANTEE": self.guarantee,
            "STREAMER_PROCESSING__CONCURRENCY": str(self.concurrency),
            "STREAMER_PROCESSING__ORDERING": self.ordering,
            "STREAMER_PROCESSING__TRANSACTION_TIMEOUT_SECONDS": str(self.transaction_timeout_s),
            "STREAMER_DEAD_LETTER__ENABLED": "true" if self.dead_letter else "false",
            "STREAMER_LOG_LEVEL": "INFO",
            "STREAMER_LOG_FORMAT": "json",
            # No HTTP endpoint: concurrent workers would race for its port.
            "STREAMER_METRICS__ENABLED": "false",
        }


class Transformers:
    """Starts transform workers on one input topic, output topic and group; kills the ones left.

    ``slow`` is a file that exists from the start: the workers sleep ``Setup.sleep_us`` per
    record while it does. ``hold`` is the hold file of ``start(hold_id=...)``.
    """

    def __init__(
        self, directory: Path, bootstrap: str, group: str, topic: str, out: str, setup: Setup
    ) -> None:
        self.directory = directory
        self.bootstrap = bootstrap
        self.group = group
        self.topic = topic
        self.out = out
        self.setup = setup
        self.slow = directory / "slow"
        self.slow.touch()
        self.hold = directory / "hold"
        self.workers: list[Worker] = []

    def kill_all(self) -> None:
        """SIGKILL every worker still running (a frozen one too) and reap all of them."""
        for worker in self.workers:
            if worker.running:
                worker.proc.send_signal(signal.SIGCONT)  # a frozen worker must be able to die
            worker.kill()

    def start(
        self, name: str, *, until_end: bool = False, hold_id: int | None = None, setup: Setup | None = None
    ) -> Worker:
        """Start a worker; its effects go to ``<directory>/<name>.effects``, its output to ``<name>.log``."""
        setup = setup or self.setup
        effects = self.directory / f"{name}.effects"
        log = self.directory / f"{name}.log"
        assert not log.exists(), f"{log} exists: use a new worker name"
        behaviour = Behaviour(
            out_topic=self.out,
            effects=effects,
            async_handler=setup.async_handler,
            sleep_us=setup.sleep_us,
            slow_while=self.slow,
            poison=setup.poison,
            hold_id=hold_id,
            hold_file=self.hold if hold_id is not None else None,
        )
        env = {k: v for k, v in clean_env().items() if not k.startswith("TRANSFORM_")}
        env.update(setup.env(self.bootstrap, self.group))
        env.update(behaviour.env(self.topic))
        args = ["run", APP, "--no-progress", *(["--until-end"] if until_end else [])]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                streamer_command(*args), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        worker = Worker(name, proc, effects, log)
        self.workers.append(worker)
        return worker

    def effects(self) -> list[Effect]:
        """Every worker's effects, worker after worker."""
        return [effect for worker in self.workers for effect in read_effects(worker.effects)]

    def describe(self) -> str:
        """Every worker's state and log tail, for failure messages."""
        return "\n".join(worker.describe() for worker in self.workers)


@pytest.fixture
def transformers(
    tmp_path: Path, kafka_bootstrap: str, group_id: str
) -> Iterator[Callable[[str, str, Setup], Transformers]]:
    """``transformers(topic, out, setup)``: a Transformers; every worker killed at teardown."""
    made: list[Transformers] = []

    def make(topic: str, out: str, setup: Setup) -> Transformers:
        made.append(Transformers(tmp_path, kafka_bootstrap, group_id, topic, out, setup))
        return made[-1]

    yield make
    for pool in made:
        pool.kill_all()


def log_events(worker: Worker) -> list[dict[str, Any]]:
    """The worker's complete JSON log lines (plain ones, such as librdkafka's, are left out)."""
    events = []
    for line in worker.log.read_text(errors="replace").split("\n")[:-1]:
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def wait_exit(worker: Worker, timeout: float, *, also: Callable[[], object] = lambda: None) -> int:
    """Wait for ``worker`` to exit (calling ``also`` meanwhile) and return its exit code."""

    def exited() -> bool:
        also()
        return not worker.running

    wait_for(exited, timeout, interval=0.05, message=lambda: f"still running: {worker.describe()}")
    return worker.proc.returncode


def wait_handled(worker: Worker, at_least: int, timeout: float, *, also: Callable[[], object]) -> bool:
    """Wait until ``worker`` handled ``at_least`` records (True) or exited 0 first (False)."""

    def reached() -> bool:
        also()
        if worker.handled() >= at_least:
            return True
        if not worker.running:
            assert worker.proc.returncode == 0, f"exited before {at_least} records: {worker.describe()}"
            return True
        return False

    wait_for(reached, timeout, interval=0.01, message=lambda: f"waiting for {at_least}: {worker.describe()}")
    return worker.running


def stop(worker: Worker) -> int:
    """SIGTERM ``worker`` and return its exit code."""
    worker.send(signal.SIGTERM)
    return worker.wait(STOP_TIMEOUT_S)


# -- what the broker holds ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One record read back: where it is, its id, key and value."""

    partition: int
    offset: int
    id: int
    key: bytes | None
    value: bytes | None


def ends_of(bootstrap: str, topic: str, *, committed: bool = False) -> dict[int, int]:
    """Each partition's end: the high watermark, or (``committed``) the last stable offset."""
    if not committed:
        return end_offsets(bootstrap, topic)
    partitions = admin(bootstrap).list_topics(topic=topic, timeout=REQUEST_TIMEOUT_S).topics[topic].partitions
    request = {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions}
    client = admin(bootstrap)  # keep a reference: futures fail once the client is destroyed
    futures = client.list_offsets(
        request, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=REQUEST_TIMEOUT_S
    )
    return {tp.partition: f.result(timeout=REQUEST_TIMEOUT_S).offset for tp, f in futures.items()}


def read_topic(bootstrap: str, topic: str, *, committed: bool = False, timeout: float = 60.0) -> list[Seen]:
    """Every record of ``topic`` below its end offsets at the call, as a reader with isolation
    level read_committed (``committed``) or read_uncommitted sees it."""
    ends = ends_of(bootstrap, topic, committed=committed)
    left = {p for p, end in ends.items() if end > 0}
    if not left:
        return []
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": make_unique_name("reader", topic),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
        }
    )
    seen: list[Seen] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in sorted(left)])
        deadline = time.monotonic() + timeout
        while left:
            assert time.monotonic() < deadline, f"read {len(seen)} records of {topic}; not at the end: {left}"
            for msg in consumer.consume(1000, 0.2):
                partition, offset = msg.partition(), msg.offset()
                assert partition is not None
                assert offset is not None
                error = msg.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, f"reading {topic}: {error}"
                    if offset >= ends[partition]:  # past every record (and marker) below the end
                        left.discard(partition)
                    continue
                if offset < ends[partition]:
                    header = dict(msg.headers() or []).get("message-id")
                    record = int(header) if header is not None else -1
                    seen.append(Seen(partition, offset, record, msg.key(), msg.value()))
                if offset + 1 >= ends[partition]:
                    left.discard(partition)
    finally:
        consumer.close()
    return seen


def wait_stable(bootstrap: str, topic: str, timeout: float) -> dict[int, int]:
    """Wait until ``topic`` has no open transaction (last stable offsets = high watermarks)."""

    def stable() -> dict[int, int]:
        lso, hw = ends_of(bootstrap, topic, committed=True), ends_of(bootstrap, topic)
        return hw if lso == hw else {}

    return wait_for(
        stable,
        timeout,
        interval=0.2,
        message=lambda: (
            f"{topic}: LSO {ends_of(bootstrap, topic, committed=True)}, HW {ends_of(bootstrap, topic)}"
        ),
    )


def wait_committed(
    bootstrap: str,
    group: str,
    topic: str,
    ends: Mapping[int, int],
    timeout: float,
    describe: Callable[[], str],
) -> None:
    """Wait until ``group`` committed every partition of ``topic`` at ``ends``."""
    wait_for(
        lambda: committed_offsets(bootstrap, group, topic) == dict(ends),
        timeout,
        interval=0.2,
        message=lambda: (
            f"committed {committed_offsets(bootstrap, group, topic)}, ends {dict(ends)}\n{describe()}"
        ),
    )


@dataclass(frozen=True)
class Sample:
    """The group's commits at one moment, and the output topic's high watermarks just after."""

    committed: dict[int, Committed]
    out_ends: dict[int, int]


class Sampler:
    """Samples the group's commits and the output topic's ends, at most every SAMPLE_EVERY_S."""

    def __init__(self, bootstrap: str, group: str, topic: str, out: str) -> None:
        self.bootstrap, self.group, self.topic, self.out = bootstrap, group, topic, out
        self.samples: list[Sample] = []
        self._last = 0.0

    def __call__(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < SAMPLE_EVERY_S:
            return
        self._last = time.monotonic()
        # The commits first: an output acknowledged before its input was committed is then
        # below the high watermark read after.
        committed = committed_maps(self.bootstrap, self.group, self.topic, PARTITIONS)
        self.samples.append(Sample(committed, ends_of(self.bootstrap, self.out)))


def committed_without_output(
    samples: Iterable[Sample], inputs: Mapping[int, Seen], outputs: Iterable[Seen]
) -> list[str]:
    """Inputs a sampled commit covered whose output was not yet on the broker (below the output
    topic's high watermarks sampled right after)."""
    by_position = {(s.partition, s.offset): s.id for s in inputs.values()}
    outputs = list(outputs)
    found = []
    for number, sample in enumerate(samples):
        present = {o.id for o in outputs if o.offset < sample.out_ends.get(o.partition, 0)}
        for partition, commit in sample.committed.items():
            covered = [*range(commit.offset), *commit.finished]
            lacking = [o for o in covered if by_position[(partition, o)] not in present]
            if lacking:
                found.append(
                    f"sample {number}: partition {partition} committed at {commit.offset} (map of "
                    f"{len(commit.finished)}), no output yet for {len(lacking)} offsets, e.g. {lacking[:10]}"
                )
    return found


def assert_pass_through(outputs: Iterable[Seen], inputs: Mapping[int, Seen]) -> None:
    """Every output is the output of a known input, with its key and value."""
    wrong = [
        o for o in outputs if o.id not in inputs or (o.key, o.value) != (inputs[o.id].key, inputs[o.id].value)
    ]
    assert not wrong, f"{len(wrong)} outputs are not the pass-through of an input: {wrong[:3]}"


def assert_exactly_once(outputs: Iterable[Seen], expected: set[int], what: str) -> None:
    """``outputs`` hold each id of ``expected`` exactly once, and no other."""
    counts = Counter(o.id for o in outputs)
    missing = sorted(expected - counts.keys())
    extra = sorted(counts.keys() - expected)
    twice = {record: n for record, n in sorted(counts.items()) if n > 1}
    assert [missing, extra, twice] == [[], [], {}], (
        f"{what}: {len(missing)} inputs missing (e.g. {missing[:10]}), {len(twice)} more than once "
        f"(e.g. {list(twice.items())[:10]}), {len(extra)} unexpected ids (e.g. {extra[:10]})"
    )


# -- the storm ----------------------------------------------------------------------------------


def storm(
    pool: Transformers, rng: random.Random, kills: int, *, at: tuple[int, int], sampler: Sampler | None = None
) -> int:
    """One bounded worker at a time over the topic: ``kills`` times, SIGKILL it once it handled a
    random number of records in ``at`` and start the next at once; then let the last one finish
    at full speed. Returns the kills made (fewer if a worker reached the end first).

    ``sampler`` (optional) samples the group's commits while the workers run, and after each kill.
    """
    also: Callable[[], object] = sampler or (lambda: None)
    made = 0
    for number in range(kills):
        worker = pool.start(f"w{number}", until_end=True)
        if not wait_handled(worker, rng.randint(*at), RUN_TIMEOUT_S, also=also):
            break
        worker.kill()
        made += 1
        print(f"kill {made}: SIGKILL {worker.name} after {worker.handled()} records handled")
        if sampler is not None:
            sampler(force=True)
    pool.slow.unlink()
    last = pool.start(f"w{kills}-final", until_end=True)
    code = wait_exit(last, RUN_TIMEOUT_S, also=also)
    assert code == 0, last.describe()
    return made


def at_least_once_storm(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
    *,
    setup: Setup,
    records: int,
    kills: int,
    bound: int,
    keyed: bool = False,
) -> None:
    """The at-least-once storm of tests (a) and (b), and its checks."""
    rng = random.Random(seed)
    topic, out = topic_factory(PARTITIONS), topic_factory(PARTITIONS)
    produce_records(kafka_bootstrap, topic, records, key_fn=record_key if keyed else None)
    pool = transformers(topic, out, setup)
    sampler = Sampler(kafka_bootstrap, group_id, topic, out)
    made = storm(pool, rng, kills, at=(200, records // (kills + 2)), sampler=sampler)
    sampler(force=True)

    inputs = {s.id: s for s in read_topic(kafka_bootstrap, topic)}
    assert len(inputs) == records
    outputs = read_topic(kafka_bootstrap, out)
    assert_pass_through(outputs, inputs)
    counts = Counter(o.id for o in outputs)
    missing = sorted(inputs.keys() - counts.keys())
    assert not missing, f"{len(missing)} inputs have no output, e.g. {missing[:10]}\n{pool.describe()}"
    assert committed_offsets(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic)
    lacking = committed_without_output(sampler.samples, inputs, outputs)
    assert not lacking, "\n".join(lacking[:10])
    extra: Counter[int] = Counter()
    for record, n in counts.items():
        extra[inputs[record].partition] += n - 1
    print(
        f"{made} kills, {len(sampler.samples)} commit samples; duplicate outputs per input partition: "
        f"{dict(sorted(extra.items()))} (bound {made} x {bound} = {made * bound} each)"
    )
    over = {p: n for p, n in extra.items() if n > made * bound}
    assert not over, f"duplicates over {made} x {bound} per partition: {over}"


# -- at-least-once ------------------------------------------------------------------------------


def test_at_least_once_outputs_every_input_across_a_sigkill_storm_within_the_reread_bound(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
) -> None:
    """At-least-once, serial dispatch, a sync handler: 20,000 inputs over 6 partitions, the worker
    SIGKILLed 3 times at random points and restarted: every input has an output; an input is
    never committed before its output is on the broker; the duplicate outputs of each partition
    stay within kills x (every_records + 2 x poll_batch_size)."""
    at_least_once_storm(
        transformers,
        topic_factory,
        kafka_bootstrap,
        group_id,
        seed,
        setup=Setup(),
        records=20_000,
        kills=3,
        bound=REREAD_BOUND,
    )


def test_at_least_once_async_concurrent_outputs_every_input_across_a_sigkill_storm_within_the_bound(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
) -> None:
    """At-least-once, an ``async def`` handler, concurrency 64, ordering "key", keyed inputs:
    20,000 inputs, 2 SIGKILLs at random points: every input has an output; a commit (its offset
    and its map of offsets finished above it) never covers an input whose output is not on the
    broker; duplicates per partition stay within kills x (the re-read bound + the records in
    flight)."""
    at_least_once_storm(
        transformers,
        topic_factory,
        kafka_bootstrap,
        group_id,
        seed,
        setup=Setup(concurrency=CONCURRENCY, ordering="key", async_handler=True, sleep_us=5000),
        records=20_000,
        kills=2,
        bound=REREAD_BOUND + CONCURRENCY,
        keyed=True,
    )


# -- exactly-once -------------------------------------------------------------------------------

EXACTLY_ONCE = Setup(guarantee="exactly_once", every_records=EVERY_RECORDS, every_seconds=1.0)


def assert_exactly_once_outputs(
    bootstrap: str, topic: str, out: str, *, poison: set[int] | None = None
) -> dict[int, Seen]:
    """Once no transaction is open on ``out``: a read_committed reader sees each input's output
    exactly once (none for ``poison``); returns the inputs by id."""
    wait_stable(bootstrap, out, TXN_TIMEOUT_S + 30)
    inputs = {s.id: s for s in read_topic(bootstrap, topic)}
    outputs = read_topic(bootstrap, out, committed=True)
    assert_pass_through(outputs, inputs)
    assert_exactly_once(outputs, set(inputs) - (poison or set()), f"read_committed reader of {out}")
    uncommitted = read_topic(bootstrap, out)
    print(
        f"{out}: read_committed sees {len(outputs):,} outputs of {len(inputs):,} inputs; "
        f"read_uncommitted sees {len(uncommitted):,} (aborted ones included)"
    )
    return inputs


def test_exactly_once_read_committed_sees_each_output_once_across_a_sigkill_storm(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
) -> None:
    """Exactly-once: 10,000 inputs, the worker SIGKILLed 3 times at random points (its open
    transaction left to the broker's timeout) and restarted: a read_committed reader of the
    output topic sees each input's output exactly once, and the group's commit reaches the end."""
    rng = random.Random(seed)
    records = 10_000
    topic, out = topic_factory(PARTITIONS), topic_factory(PARTITIONS)
    produce_records(kafka_bootstrap, topic, records)
    pool = transformers(topic, out, EXACTLY_ONCE)
    made = storm(pool, rng, 3, at=(200, records // 5))
    assert committed_offsets(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic)
    print(f"{made} kills")
    assert_exactly_once_outputs(kafka_bootstrap, topic, out)


def test_exactly_once_read_committed_sees_each_output_once_across_a_sigterm_and_a_rebalance(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
) -> None:
    """Exactly-once: a worker SIGTERMed mid-run (exit 0) and restarted; a second worker joins
    mid-run (the partitions it takes are revoked from the first) and the first is stopped (its
    partitions move to the second): a read_committed reader sees each output exactly once, and
    no input is handled twice (a clean stop or a revoke commits what finished)."""
    rng = random.Random(seed)
    records = 6_000
    topic, out = topic_factory(PARTITIONS), topic_factory(PARTITIONS)
    produce_records(kafka_bootstrap, topic, records)
    pool = transformers(topic, out, replace(EXACTLY_ONCE, sleep_us=1000))

    first = pool.start("first")
    first.wait_handled(rng.randint(200, 1000), START_TIMEOUT_S)
    assert stop(first) == 0, first.describe()
    print(f"SIGTERM first after {first.handled()} records")
    again = pool.start("again")
    again.wait_handled(rng.randint(200, 1000), START_TIMEOUT_S)
    second = pool.start("second")
    second.wait_handled(rng.randint(100, 500), START_TIMEOUT_S)
    assert again.running, again.describe()
    assert stop(again) == 0, again.describe()
    print(f"second joined after again handled some; SIGTERM again after {again.handled()} records")
    pool.slow.unlink()
    ends = end_offsets(kafka_bootstrap, topic)
    wait_committed(kafka_bootstrap, group_id, topic, ends, RUN_TIMEOUT_S, pool.describe)
    assert stop(second) == 0, second.describe()

    handled = Counter(effect.id for effect in pool.effects())
    twice = {record: n for record, n in handled.items() if n > 1}
    assert not twice, (
        f"{len(twice)} inputs handled more than once after clean stops: {list(twice.items())[:10]}"
    )
    assert_exactly_once_outputs(kafka_bootstrap, topic, out)


def test_exactly_once_read_committed_sees_each_output_once_when_a_worker_dies_after_a_handover(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
) -> None:
    """Exactly-once, a transaction every 5 s: worker A runs alone until it has handled inputs of
    every partition; B joins, so A hands some partitions over (committing its transaction on the
    revoke) and keeps the others; A is SIGKILLed right after the handover, before its next
    commit, and B takes everything over: a read_committed reader sees each input's output
    exactly once (a handover's transaction commits no output of an input whose offset it
    leaves uncommitted, such as the inputs of the partitions A kept)."""
    rng = random.Random(seed)
    records = 6_000
    topic, out = topic_factory(PARTITIONS), topic_factory(PARTITIONS)
    # Small producer batches (50 records per partition) and small fetches (about one batch per
    # partition) interleave the partitions in A's processing order, so that A has handled inputs
    # of the partitions it hands over and of those it keeps since its last commit.
    for start in range(0, records, 300):
        produce_records(kafka_bootstrap, topic, 300, start_id=start)
    client = {**CLIENT, "max.partition.fetch.bytes": 16_384}
    setup = replace(EXACTLY_ONCE, every_records=0, every_seconds=5.0, sleep_us=1000, client=client)
    pool = transformers(topic, out, setup)
    a = pool.start("a")

    def partitions_handled() -> set[int]:
        return {effect.partition for effect in read_effects(a.effects)}

    wait_for(
        lambda: len(partitions_handled()) == PARTITIONS,
        START_TIMEOUT_S,
        message=lambda: f"A handled partitions {partitions_handled()} only: {a.describe()}",
    )
    a.wait_handled(a.handled() + rng.randint(0, 500), START_TIMEOUT_S)
    b = pool.start("b")
    wait_for(
        lambda: any(e.get("event") == "partitions revoked" for e in log_events(a)),
        START_TIMEOUT_S,
        interval=0.01,
        message=lambda: f"B's join revoked nothing of A: {pool.describe()}",
    )
    a.kill()
    assert a.handled() < records, "A handled every input before the handover: it must be mid-run"
    revoked = next(e for e in log_events(a) if e.get("event") == "partitions revoked")
    handed = sorted(int(name.rpartition("[")[2].rstrip("]")) for name in revoked["partitions"])
    per_partition = Counter(effect.partition for effect in read_effects(a.effects))
    print(
        f"SIGKILL A right after it handed over partitions {handed}, having handled "
        f"{dict(sorted(per_partition.items()))} by partition"
    )
    assert 0 < len(handed) < PARTITIONS, f"A handed over {handed}: it must keep some and hand some over"
    pool.slow.unlink()
    wait_committed(
        kafka_bootstrap, group_id, topic, end_offsets(kafka_bootstrap, topic), RUN_TIMEOUT_S, pool.describe
    )
    assert stop(b) == 0, b.describe()
    assert_exactly_once_outputs(kafka_bootstrap, topic, out)


def test_exactly_once_fences_a_zombie_frozen_past_its_session_timeout(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
) -> None:
    """Exactly-once: worker A is frozen (SIGSTOP, inside the handler of a chosen input) with the
    outputs of the inputs before it in an open transaction, past its session timeout; B takes
    over and commits every input; A is resumed (SIGCONT) while that transaction is still open:
    A finds its partitions lost (the group's generation fences it), aborts that transaction and
    stops, and a read_committed reader sees each input's output exactly once (B's, never A's)."""
    rng = random.Random(seed)
    records = 3_000
    topic, out = topic_factory(PARTITIONS), topic_factory(PARTITIONS)
    produce_records(kafka_bootstrap, topic, records)
    pool = transformers(topic, out, replace(EXACTLY_ONCE, sleep_us=0))
    held = rng.randrange(records // 4, records // 2)
    # A commits nothing on its own before it is frozen, and its transaction outlives the freeze:
    # only the group's generation can fence it, not the broker's transaction timeout.
    zombie = replace(
        EXACTLY_ONCE, every_records=0, every_seconds=30.0, sleep_us=0, transaction_timeout_s=90.0
    )
    pool.hold.touch()
    a = pool.start("a", hold_id=held, setup=zombie)
    wait_for(
        lambda: any(e.id == held for e in read_effects(a.effects)),
        START_TIMEOUT_S,
        message=lambda: f"A never reached id {held}: {a.describe()}",
    )
    before = a.handled() - 1  # the held input's output is not emitted yet
    wait_for(
        lambda: len(read_topic(kafka_bootstrap, out)) >= before,
        START_TIMEOUT_S,
        message=lambda: (
            f"A's {before} outputs are not all on the broker: {len(read_topic(kafka_bootstrap, out))}"
        ),
    )
    assert committed_offsets(kafka_bootstrap, group_id, topic) == {}, "A committed before it was frozen"
    a.send(signal.SIGSTOP)
    frozen = time.monotonic()
    print(f"SIGSTOP A inside the handler of id {held}, with {before} outputs in its open transaction")

    b = pool.start("b", setup=replace(EXACTLY_ONCE, sleep_us=0))
    ends = end_offsets(kafka_bootstrap, topic)
    wait_committed(kafka_bootstrap, group_id, topic, ends, RUN_TIMEOUT_S, pool.describe)
    lso, hw = ends_of(kafka_bootstrap, out, committed=True), ends_of(kafka_bootstrap, out)
    assert lso != hw, f"A's transaction is no longer open (LSO {lso}, HW {hw}): the test cannot show fencing"
    assert {e.id for e in read_effects(b.effects)} >= set(range(records)), "B did not handle every input"
    print(f"B committed every input {time.monotonic() - frozen:.1f} s after the freeze; SIGCONT A")

    pool.hold.unlink()
    a.send(signal.SIGCONT)

    # Fenced: A finds its partitions lost, aborts its transaction and stops (EXIT_FAILED); its
    # restart would resume at the group's last commit.
    code = a.wait(START_TIMEOUT_S)
    events = [e.get("event") for e in log_events(a)]
    assert code == EXIT_FAILED, f"A exited {code} after SIGCONT: {a.describe()}"
    assert "partitions lost" in events, f"A did not find its partitions lost: {a.describe()}"
    print(f"A resumed, found its partitions lost and exited {code}")
    # A's rejoin and leave rebalance the group: stop B once that is over (a SIGTERM during a
    # rebalance may exit 1, as test_rebalance's test of it allows; not the promise checked here).
    wait_for(
        lambda: (
            (d := describe_group(kafka_bootstrap, group_id)).state == ConsumerGroupState.STABLE
            and len(d.members) == 1
        ),
        START_TIMEOUT_S,
        interval=0.2,
        message=lambda: f"the group did not settle with B alone: {describe_group(kafka_bootstrap, group_id)}",
    )
    assert stop(b) == 0, b.describe()
    assert_exactly_once_outputs(kafka_bootstrap, topic, out)


def test_exactly_once_dead_lettered_input_is_parked_once_and_never_output(
    transformers: Callable[[str, str, Setup], Transformers],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    seed: int,
) -> None:
    """Exactly-once with the dead-letter topic on: inputs whose handler raises PermanentError
    (three ids at random), the worker SIGKILLed once at a random point and restarted: a
    read_committed reader finds each of them exactly once in the dead-letter topic and never in
    the output, and every other input's output exactly once."""
    rng = random.Random(seed)
    records = 4_000
    poison = frozenset(rng.sample(range(records), 3))
    print(f"poison ids: {sorted(poison)}")
    topic, out = topic_factory(PARTITIONS), topic_factory(PARTITIONS)
    dlq = topic_factory(PARTITIONS, name=f"{topic}.dlq")  # the default: the topic + [dead_letter] suffix
    produce_records(kafka_bootstrap, topic, records)
    pool = transformers(topic, out, replace(EXACTLY_ONCE, dead_letter=True, poison=poison))
    made = storm(pool, rng, 1, at=(200, records // 2))
    print(f"{made} kills")
    assert committed_offsets(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic)
    inputs = assert_exactly_once_outputs(kafka_bootstrap, topic, out, poison=set(poison))
    wait_stable(kafka_bootstrap, dlq, TXN_TIMEOUT_S + 30)
    parked = read_topic(kafka_bootstrap, dlq, committed=True)
    assert_exactly_once(parked, set(poison), f"read_committed reader of {dlq}")
    assert all(p.value == inputs[p.id].value for p in parked), "a parked record lost its original value"

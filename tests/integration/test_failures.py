"""Failure handling against the real broker: retries that keep the other partitions flowing,
records parked in the dead-letter topic with their story, poison records, a dead-letter topic that
cannot be written, a handler slower than max.poll.interval.ms, ``streamer dlq replay``, and the
errors a user can act on.

Workers run ``streamer run tests.integration.apps.failing_app:app`` as subprocesses; the app fails,
retries or sleeps on chosen record ids and appends ``partition offset id attempt`` per success to
an effects file (see ``tests/integration/apps/failing_app.py``).
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from streamer.deadletter import (
    FAILURE_HEADERS,
    H_ATTEMPTS,
    H_ERROR_MESSAGE,
    H_ERROR_TYPE,
    H_FAILED_AT,
    H_GROUP,
    H_OFFSET,
    H_PARTITION,
    H_TIMESTAMP,
    H_TOPIC,
    H_WORKER,
    failure_headers,
)
from streamer.message import Message as StreamerMessage
from streamer.replay import (
    H_REPLAYED_FROM,
    DeadLetterTopicNotFoundError,
    DestinationNotFoundError,
    ReplayedRecord,
    ReplayFilter,
    replay,
)
from tests.conftest import TopicFactory
from tests.integration.workers import REPO, STOP_TIMEOUT_S, Worker, clean_env, streamer_command
from tests.support import wait_for
from tests.support.kafka import (
    ID_HEADER,
    admin,
    committed_offsets,
    create_topic,
    delete_topics,
    end_offsets,
    produce_records,
    record_id,
)

APP = "tests.integration.apps.failing_app:app"
#: Seconds a bounded run over a few dozen records may take, start-up and group join included.
RUN_TIMEOUT_S = 30.0
#: Seconds a ``streamer dlq replay`` may take.
REPLAY_TIMEOUT_S = 30.0
#: Seconds for asynchronous commits to be acknowledged (usually well under one).
COMMIT_TIMEOUT_S = 30.0


# -- workers and their files -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Effect:
    """One record handled successfully: ``partition offset id attempt``."""

    partition: int
    offset: int
    id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Attempt:
    """One entry into the handler: ``partition offset id attempt unix_time``."""

    partition: int
    offset: int
    id: int
    attempt: int
    at: float


def read_lines(path: Path) -> list[list[str]]:
    """The complete lines of a file, split on whitespace ([] if it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [line.split() for line in data.decode().split("\n")[:-1]]


def effects(worker: Worker) -> list[Effect]:
    return [Effect(*map(int, fields)) for fields in read_lines(worker.effects)]


def attempts(worker: Worker) -> list[Attempt]:
    path = worker.effects.with_suffix(".attempts")
    return [Attempt(int(p), int(o), int(i), int(a), float(t)) for p, o, i, a, t in read_lines(path)]


def log_events(worker: Worker) -> list[dict[str, Any]]:
    """The JSON log lines of a worker (librdkafka's and other plain lines are left out)."""
    events = []
    for line in worker.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def named(worker: Worker, event: str) -> list[dict[str, Any]]:
    return [e for e in log_events(worker) if e.get("event") == event]


class Workers:
    """Starts failing_app workers; kills the ones still running at exit."""

    def __init__(self, directory: Path, bootstrap: str) -> None:
        self.directory = directory
        self.bootstrap = bootstrap
        self.started: list[Worker] = []

    def start(
        self,
        name: str,
        topic: str,
        group: str,
        *,
        until_end: bool = True,
        config: Path | None = None,
        permanent: Sequence[int] = (),
        retry: dict[int, int] | None = None,
        sleep: dict[int, float] | None = None,
        env: dict[str, str] | None = None,
    ) -> Worker:
        """Start ``streamer run`` on ``topic``; effects, attempts and log go to ``<name>.*``."""
        effects_path = self.directory / f"{name}.effects"
        log = self.directory / f"{name}.log"
        assert not log.exists(), f"{log} exists: use a new worker name"
        settings = {
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMER_KAFKA__GROUP_ID": group,
            "STREAMER_LOG_LEVEL": "INFO",
            "STREAMER_LOG_FORMAT": "json",
            "STREAMER_METRICS__ENABLED": "false",
            "FAILING_TOPIC": topic,
            "FAILING_EFFECTS": str(effects_path),
            "FAILING_ATTEMPTS": str(effects_path.with_suffix(".attempts")),
            "FAILING_PERMANENT_IDS": ",".join(map(str, permanent)),
            "FAILING_RETRY_IDS": ",".join(f"{i}:{k}" for i, k in (retry or {}).items()),
            "FAILING_SLEEP_IDS": ",".join(f"{i}:{s}" for i, s in (sleep or {}).items()),
        }
        args = ["run", APP, "--no-progress"]
        if until_end:
            args.append("--until-end")
        if config is not None:
            args += ["--config", str(config)]
        base = {k: v for k, v in clean_env().items() if not k.startswith("FAILING_")}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                streamer_command(*args),
                cwd=REPO,
                env={**base, **settings, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        worker = Worker(name, proc, effects_path, log)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()


@pytest.fixture
def workers(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Workers]:
    pool = Workers(tmp_path, kafka_bootstrap)
    try:
        yield pool
    finally:
        pool.kill_all()


@pytest.fixture
def dlq_cleanup(kafka_bootstrap: str) -> Iterator[list[str]]:
    """Dead-letter topics a worker created (topic_factory does not know them): deleted at teardown."""
    names: list[str] = []
    yield names
    delete_topics(kafka_bootstrap, names)


# -- Kafka helpers -----------------------------------------------------------------------------------


def read_topic(bootstrap: str, topic: str, timeout: float = 15.0) -> list[Message]:
    """Every record of ``topic`` up to its current end offsets, partition by partition."""
    ends = {p: o for p, o in end_offsets(bootstrap, topic).items() if o > 0}
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        records: list[Message] = []
        deadline = time.monotonic() + timeout
        left = dict(ends)
        while left:
            assert time.monotonic() < deadline, f"read {len(records)} records of {topic}; missing {left}"
            for msg in consumer.consume(100, 0.1):
                assert msg.error() is None, msg.error()
                if msg.partition() in left and msg.offset() < ends[msg.partition()]:
                    records.append(msg)
                    if msg.offset() + 1 >= ends[msg.partition()]:
                        del left[msg.partition()]
        return sorted(records, key=lambda m: (m.partition(), m.offset()))
    finally:
        consumer.close()


def headers_of(msg: Message) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in msg.headers() or []}


def topic_exists(bootstrap: str, topic: str) -> bool:
    return topic in admin(bootstrap).list_topics(timeout=10).topics


Record = tuple[int, bytes | None, bytes, list[tuple[str, bytes | None]]]  # partition, key, value, headers


def produce_raw(bootstrap: str, topic: str, records: Sequence[Record]) -> None:
    """Produce ``records`` in order with one idempotent producer, asserting every delivery."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    errors: list[Any] = []
    for partition, key, value, headers in records:
        producer.produce(
            topic,
            value=value,
            key=key,
            partition=partition,
            headers=headers,
            on_delivery=lambda e, _m: errors.append(e),
        )
    assert producer.flush(30) == 0
    assert errors == [None] * len(records), errors


def run_replay(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        streamer_command("dlq", "replay", "--bootstrap", bootstrap, *args),
        cwd=REPO,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=REPLAY_TIMEOUT_S,
        check=False,
    )


def assert_in_order_and_once(
    handled: list[Effect], ends: dict[int, int], skipped: set[tuple[int, int]]
) -> None:
    """Each partition was handled in offset order, every offset once, except ``skipped`` ones."""
    by_partition: dict[int, list[int]] = {}
    for effect in handled:
        by_partition.setdefault(effect.partition, []).append(effect.offset)
    for partition, end in ends.items():
        expected = [o for o in range(end) if (partition, o) not in skipped]
        assert by_partition.get(partition, []) == expected, (
            f"partition {partition}: {by_partition.get(partition)}"
        )


# -- a. retries --------------------------------------------------------------------------------------


def test_retried_record_succeeds_on_attempt_3_while_other_partitions_flow(
    workers: Workers, kafka_bootstrap: str, topic: str, group_id: str, dlq_cleanup: list[str]
) -> None:
    """RetryableError twice, then success: processed once (attempt 3), its partition waits behind
    it in order, and records of the other partitions, even ones produced while it waits, finish
    before it."""
    dlq_cleanup.append(f"{topic}.dlq")
    produce_records(kafka_bootstrap, topic, 30)  # id i -> partition i % 3, offset i // 3
    retried = 3  # partition 0, offset 1
    backoff = {"STREAMER_RETRY__INITIAL_BACKOFF": "2", "STREAMER_RETRY__MULTIPLIER": "1.5"}
    worker = workers.start("w", topic, group_id, until_end=False, retry={retried: 2}, env=backoff)

    def first_attempt() -> Attempt | None:
        assert worker.running, worker.describe()
        return next((a for a in attempts(worker) if a.id == retried), None)

    first = wait_for(first_attempt, RUN_TIMEOUT_S, message=worker.describe)
    # While it waits for its retry: new records for the other partitions must flow.
    produce_records(kafka_bootstrap, topic, 20, partitions=[1, 2], start_id=100)
    wait_for(lambda: len(effects(worker)) >= 50, 20.0, message=worker.describe)
    worker.send(signal.SIGTERM)
    assert worker.wait(STOP_TIMEOUT_S) == 0, worker.describe()

    handled = effects(worker)
    assert Counter(e.id for e in handled) == Counter([*range(30), *range(100, 120)]), "lost or repeated"
    tries = [a for a in attempts(worker) if a.id == retried]
    assert [a.attempt for a in tries] == [1, 2, 3]
    assert tries[0] == first
    # Backoffs 2 s then 3 s, each within the jitter of 20% (plus the loop's reaction time).
    gaps = [b.at - a.at for a, b in itertools.pairwise(tries)]
    assert 1.6 <= gaps[0] <= 2.4 + 1.0, gaps
    assert 2.4 <= gaps[1] <= 3.6 + 1.0, gaps
    success = [i for i, e in enumerate(handled) if e.id == retried]
    assert len(success) == 1
    assert handled[success[0]].attempt == 3
    others = [i for i, e in enumerate(handled) if e.partition != 0]
    assert max(others) < success[0], "a record of another partition waited for the retried one"
    assert_in_order_and_once(handled, end_offsets(kafka_bootstrap, topic), set())
    assert committed_offsets(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic)
    assert not named(worker, "record parked in the dead-letter topic")


# -- b. parking ----------------------------------------------------------------------------------------


def park_two(
    workers: Workers, bootstrap: str, topic: str, group: str, name: str = "failing"
) -> tuple[Worker, dict[int, Message]]:
    """Produce 30 keyed records; run a worker where id 4 fails for good (ValueError) and id 8 keeps
    raising RetryableError until its 3 attempts are spent. Return the worker and both originals."""
    produce_records(bootstrap, topic, 30, key_fn=lambda i: f"key-{i}")
    worker = workers.start(
        name,
        topic,
        group,
        permanent=[4],
        retry={8: 99},
        env={"STREAMER_RETRY__INITIAL_BACKOFF": "0.05", "STREAMER_RETRY__MAX_ATTEMPTS": "3"},
    )
    assert worker.wait(RUN_TIMEOUT_S) == 0, worker.describe()
    originals = {record_id(m): m for m in read_topic(bootstrap, topic) if record_id(m) in (4, 8)}
    return worker, originals


def test_permanent_and_exhausted_failures_are_parked_with_their_story(
    workers: Workers, kafka_bootstrap: str, topic: str, group_id: str, dlq_cleanup: list[str]
) -> None:
    """A ValueError and a retry that runs out land in <topic>.dlq with the original key, value and
    headers plus the streamer.* headers; the worker goes on, exits 0, commits up to the end."""
    dlq = f"{topic}.dlq"
    dlq_cleanup.append(dlq)
    started = time.time()
    worker, originals = park_two(workers, kafka_bootstrap, topic, group_id)

    ends = end_offsets(kafka_bootstrap, topic)
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends
    handled = effects(worker)
    assert_in_order_and_once(handled, ends, {(4 % 3, 4 // 3), (8 % 3, 8 // 3)})
    assert len(end_offsets(kafka_bootstrap, dlq)) == 3, "the dead-letter topic has the source's partitions"

    parked = {record_id(m): m for m in read_topic(kafka_bootstrap, dlq)}
    assert sorted(parked) == [4, 8]
    worker_id = named(worker, "worker starting")[0]["worker_id"]
    for rid, expected_type, expected_attempts in (
        (4, "builtins.ValueError", "1"),
        (8, "streamer.errors.RetryableError", "3"),
    ):
        msg, original = parked[rid], originals[rid]
        assert msg.key() == original.key() == f"key-{rid}".encode()
        assert msg.value() == original.value()
        headers = headers_of(msg)
        assert headers[ID_HEADER] == str(rid)
        assert [k for k, _ in msg.headers()] == [ID_HEADER, *FAILURE_HEADERS]
        assert headers[H_ERROR_TYPE] == expected_type
        assert f"on id {rid}" in headers[H_ERROR_MESSAGE]
        assert headers[H_TOPIC] == topic
        assert headers[H_PARTITION] == str(original.partition())
        assert headers[H_OFFSET] == str(original.offset())
        assert headers[H_TIMESTAMP] == str(original.timestamp()[1])
        assert headers[H_ATTEMPTS] == expected_attempts
        assert headers[H_GROUP] == group_id
        assert headers[H_WORKER] == worker_id
        assert started <= float(headers[H_FAILED_AT]) <= time.time()
    assert "gave up after 3 attempts" in headers_of(parked[8])[H_ERROR_MESSAGE]
    assert [a.attempt for a in attempts(worker) if a.id == 8] == [1, 2, 3]
    assert [a.attempt for a in attempts(worker) if a.id == 4] == [1]
    assert len(named(worker, "record parked in the dead-letter topic")) == 2


# -- c. poison records ---------------------------------------------------------------------------------


def test_poison_record_is_parked_at_once_and_the_partition_flows(
    workers: Workers, kafka_bootstrap: str, topic: str, group_id: str, dlq_cleanup: list[str], tmp_path: Path
) -> None:
    """With the json decoder, a value that is not JSON is parked on its first attempt (no retries,
    no crash loop); everything around it, in its partition too, is processed."""
    dlq = f"{topic}.dlq"
    dlq_cleanup.append(dlq)
    config = tmp_path / "streamer.toml"
    config.write_text(f'[topics."{topic}"]\ndecoder = "json"\n')
    produce_records(kafka_bootstrap, topic, 30)
    poison = 999
    produce_raw(kafka_bootstrap, topic, [(0, b"poison", b"{not json", [(ID_HEADER, str(poison).encode())])])
    produce_records(kafka_bootstrap, topic, 30, start_id=30)
    ends = end_offsets(kafka_bootstrap, topic)

    worker = workers.start("w", topic, group_id, config=config, env={"FAILING_EXPECT_JSON": "1"})
    assert worker.wait(RUN_TIMEOUT_S) == 0, worker.describe()

    handled = effects(worker)
    assert Counter(e.id for e in handled) == Counter(range(60))
    assert_in_order_and_once(handled, ends, {(0, 10)})
    assert all(e.attempt == 1 for e in handled)
    assert poison not in {a.id for a in attempts(worker)}, "the handler saw a value that did not decode"
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends
    [parked] = read_topic(kafka_bootstrap, dlq)
    headers = headers_of(parked)
    assert (parked.value(), parked.key(), headers[ID_HEADER]) == (b"{not json", b"poison", str(poison))
    assert headers[H_ERROR_TYPE] == "json.decoder.JSONDecodeError"
    assert headers[H_ATTEMPTS] == "1"
    assert (headers[H_PARTITION], headers[H_OFFSET]) == ("0", "10")
    assert not named(worker, "record will be retried")
    assert len(named(worker, "record parked in the dead-letter topic")) == 1


# -- d. a dead-letter topic that cannot be written --------------------------------------------------------


def test_missing_dead_letter_topic_without_create_topics_refuses_to_start(
    workers: Workers, kafka_bootstrap: str, topic: str, group_id: str, unique_name: str, tmp_path: Path
) -> None:
    """dead_letter.create_topics = false and the configured dead-letter topic missing: exit 2, named."""
    missing = f"{unique_name}-parking"
    config = tmp_path / "streamer.toml"
    config.write_text(
        f'[dead_letter]\ncreate_topics = false\n\n[topics."{topic}"]\ndead_letter_topic = "{missing}"\n'
    )
    produce_records(kafka_bootstrap, topic, 3)
    worker = workers.start("refused", topic, group_id, config=config)
    assert worker.wait(RUN_TIMEOUT_S) == 2, worker.describe()
    stderr = worker.log.read_text()
    assert missing in stderr, stderr
    assert "create_topics" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not effects(worker)
    assert committed_offsets(kafka_bootstrap, group_id, topic) == {}
    assert not topic_exists(kafka_bootstrap, missing)


def test_unwritable_dead_letter_topic_blocks_the_partition_until_it_is_back(
    workers: Workers, kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str
) -> None:
    """The dead-letter topic is deleted under a running worker, then a record fails: nothing is
    committed past it while it cannot be parked; once the topic is back, it is parked and the
    records after it are processed and committed. Nothing is lost."""
    topic = topic_factory(2)
    dlq = topic_factory(2, name=f"{topic}.dlq")
    produce_records(kafka_bootstrap, topic, 10)  # ids 0..9: partition 0 gets offsets 0..4
    worker = workers.start(
        "w",
        topic,
        group_id,
        until_end=False,
        permanent=[100],
        env={
            "STREAMER_DEAD_LETTER__TIMEOUT": "1",
            "STREAMER_COMMIT__EVERY_RECORDS": "1",
            "STREAMER_KAFKA__POLL_TIMEOUT": "0.1",
        },
    )
    worker.wait_handled(10)
    # Commits do land (so the check during the outage below is not vacuous). Asynchronous commits
    # are usually acknowledged within a second; allow for a broker busy with other test runs.
    wait_for(
        lambda: committed_offsets(kafka_bootstrap, group_id, topic) == {0: 5, 1: 5},
        COMMIT_TIMEOUT_S,
        message=lambda: (
            f"committed {committed_offsets(kafka_bootstrap, group_id, topic)}; {worker.describe()}"
        ),
    )

    assert not delete_topics(kafka_bootstrap, [dlq])
    wait_for(lambda: not topic_exists(kafka_bootstrap, dlq), 30.0, message=f"{dlq} still listed")
    produce_records(kafka_bootstrap, topic, 1, partitions=[0], start_id=100)  # partition 0, offset 5
    produce_records(kafka_bootstrap, topic, 10, start_id=101)  # 5 more per partition

    def outage_logged() -> bool:
        assert worker.running, worker.describe()
        return bool(list(named(worker, "dead-letter write failed; nothing past it is committed")))

    wait_for(outage_logged, 20.0, message=worker.describe)
    # Sample what is committed for a few seconds: never past the failed record in its partition,
    # and nothing after it in that partition is handled.
    deadline = time.monotonic() + 4.0
    samples = 0
    while time.monotonic() < deadline:
        committed = committed_offsets(kafka_bootstrap, group_id, topic)
        assert committed.get(0, 0) <= 5, f"committed {committed} past the unparked record at 0@5"
        assert not [e for e in effects(worker) if e.partition == 0 and e.offset > 5]
        assert worker.running, worker.describe()
        samples += 1
    assert samples >= 3
    assert named(worker, "dead-letter write still failing"), "the dead-letter write is not being retried"

    create_topic(kafka_bootstrap, dlq, 2)
    wait_for(lambda: named(worker, "dead-letter write succeeded again"), 30.0, message=worker.describe)
    worker.wait_handled(20, timeout=20.0)
    ends = end_offsets(kafka_bootstrap, topic)
    wait_for(
        lambda: committed_offsets(kafka_bootstrap, group_id, topic) == ends,
        COMMIT_TIMEOUT_S,
        message=lambda: f"committed {committed_offsets(kafka_bootstrap, group_id, topic)}, ends {ends}",
    )
    worker.send(signal.SIGTERM)
    assert worker.wait(STOP_TIMEOUT_S) == 0, worker.describe()

    handled = effects(worker)
    assert Counter(e.id for e in handled) == Counter([*range(10), *range(101, 111)])
    assert_in_order_and_once(handled, ends, {(0, 5)})
    parked = read_topic(kafka_bootstrap, dlq)
    assert [record_id(m) for m in parked] == [100]
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends


# -- e. a handler slower than max.poll.interval.ms ---------------------------------------------------------


def test_a_handler_running_3x_max_poll_interval_keeps_its_partition(
    workers: Workers, kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str, dlq_cleanup: list[str]
) -> None:
    """A handler running 18 s with max.poll.interval.ms = 6 s: the worker stays in the group (a
    second worker that joins meanwhile gets nothing), the record runs once, the run exits 0."""
    topic = topic_factory(1)
    dlq_cleanup.append(f"{topic}.dlq")
    produce_records(kafka_bootstrap, topic, 5)
    client = {
        "STREAMER_KAFKA__CLIENT": json.dumps({"max.poll.interval.ms": 6000, "session.timeout.ms": 6000})
    }
    slow = workers.start("slow", topic, group_id, sleep={2: 18.0}, env=client)

    def sleeping() -> bool:
        assert slow.running, slow.describe()
        return any(a.id == 2 for a in attempts(slow))

    wait_for(sleeping, RUN_TIMEOUT_S, message=slow.describe)
    started = time.monotonic()
    # A second worker joins the group while the handler runs: it must not get the partition.
    standby = workers.start("standby", topic, group_id, until_end=False, sleep={2: 18.0}, env=client)
    wait_for(lambda: named(standby, "partitions assigned"), RUN_TIMEOUT_S, message=standby.describe)
    assert slow.wait(RUN_TIMEOUT_S + 18) == 0, slow.describe()
    assert time.monotonic() - started >= 15.0, "the handler did not run long"
    standby.send(signal.SIGTERM)
    assert standby.wait(STOP_TIMEOUT_S) == 0, standby.describe()

    assert [e.id for e in effects(slow)] == [0, 1, 2, 3, 4]
    assert [a.id for a in attempts(slow)] == [0, 1, 2, 3, 4], "a record ran twice"
    assert not attempts(standby), "the standby worker took over the partition"
    assert committed_offsets(kafka_bootstrap, group_id, topic) == {0: 5}
    events = log_events(slow)
    assert any(e["event"].startswith("handler running long") for e in events)
    final = next(i for i, e in enumerate(events) if e["event"] == "committed" and e.get("reason") == "clean")
    before_stop = events[:final]
    assert not [e for e in before_stop if e["event"] == "partitions lost"], "evicted from the group"
    assert not [e for e in before_stop if e["event"] == "partitions revoked" and e.get("partitions")]
    assert "max poll interval" not in slow.log.read_text().lower()
    # The standby joined while the handler ran: the slow worker saw that rebalance and kept [0].
    assigned = [e["partitions"] for e in before_stop if e["event"] == "partitions assigned"]
    assert assigned[0] == [f"{topic}[0]"]
    assert all(a == [] for a in assigned[1:]), assigned


# -- f. streamer dlq replay -----------------------------------------------------------------------------


def test_replay_republishes_parked_records_which_the_fixed_worker_then_processes(
    workers: Workers, kafka_bootstrap: str, topic: str, group_id: str, dlq_cleanup: list[str]
) -> None:
    """After the bug is fixed: --dry-run publishes nothing; --error-type picks the records to
    replay; replayed records keep key, value and message-id, lose the failure headers, say where
    they came from, and run once in the fixed worker."""
    dlq = f"{topic}.dlq"
    dlq_cleanup.append(dlq)
    _, originals = park_two(workers, kafka_bootstrap, topic, group_id)
    ends = end_offsets(kafka_bootstrap, topic)
    parked = {record_id(m): m for m in read_topic(kafka_bootstrap, dlq)}

    dry = run_replay(kafka_bootstrap, "--topic", dlq, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: read 2, matched 2, would replay 2, skipped 0" in dry.stdout, dry.stdout
    for rid in (4, 8):
        source = f"{dlq}/{parked[rid].partition()}/{parked[rid].offset()}"
        assert f"{source} -> {topic}[{originals[rid].partition()}]" in dry.stdout, dry.stdout
    assert end_offsets(kafka_bootstrap, topic) == ends, "a dry run published"

    first = run_replay(kafka_bootstrap, "--topic", dlq, "--error-type", "ValueError")
    assert first.returncode == 0, first.stderr
    assert "read 2, matched 1, replayed 1, skipped 0" in first.stdout, first.stdout
    second = run_replay(kafka_bootstrap, "--topic", dlq, "--error-type", "RetryableError")
    assert second.returncode == 0, second.stderr
    assert "read 2, matched 1, replayed 1, skipped 0" in second.stdout, second.stdout

    after = end_offsets(kafka_bootstrap, topic)
    grown = {p: after[p] - ends[p] for p in ends}
    assert grown == {p: [originals[4].partition(), originals[8].partition()].count(p) for p in ends}
    replayed = [m for m in read_topic(kafka_bootstrap, topic) if m.offset() >= ends[m.partition()]]
    assert sorted(record_id(m) for m in replayed) == [4, 8]
    for msg in replayed:
        rid, original, was = record_id(msg), originals[record_id(msg)], parked[record_id(msg)]
        assert msg.partition() == original.partition(), "not back in its original partition"
        assert (msg.key(), msg.value()) == (original.key(), original.value())
        assert msg.headers() == [
            (ID_HEADER, str(rid).encode()),
            (H_REPLAYED_FROM, f"{dlq}/{was.partition()}/{was.offset()}".encode()),
        ]

    fixed = workers.start("fixed", topic, group_id)
    assert fixed.wait(RUN_TIMEOUT_S) == 0, fixed.describe()
    assert sorted((e.id, e.attempt) for e in effects(fixed)) == [(4, 1), (8, 1)]
    assert committed_offsets(kafka_bootstrap, group_id, topic) == after
    assert not named(fixed, "record parked in the dead-letter topic")


def parked_record(
    topic: str, partition: int, offset: int, rid: int, error: BaseException
) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """The value and headers of a record of ``topic`` parked after ``error``."""
    msg = StreamerMessage(
        topic, partition, offset, f"k{rid}".encode(), b"v%d" % rid, ((ID_HEADER, str(rid).encode()),)
    )
    return msg.value or b"", list(failure_headers(msg, error, "g", "w"))


def test_replay_partition_offsets_limit_to_and_missing_topics(
    kafka_bootstrap: str, topic_factory: TopicFactory, unique_name: str
) -> None:
    """Offsets and partitions select what is read; --limit stops; --to redirects; a destination
    that does not exist stops the replay with what was published; a missing DLQ is named (exit 4)."""
    source = topic_factory(3)
    other = topic_factory(1)
    dlq = topic_factory(2, name=f"{source}.dlq")
    # Partition 0: ids 0..4 from the source (partition = id % 3), ValueError except id 3.
    # Partition 1: id 10 from a topic that no longer exists, then id 11 with no original topic.
    records: list[Record] = []
    for rid in range(5):
        error: BaseException = ValueError("bad") if rid != 3 else KeyError("sku")
        records.append((0, f"k{rid}".encode(), *parked_record(source, rid % 3, rid, rid, error)))
    records.append((1, b"k10", *parked_record(f"{unique_name}-gone", 0, 0, 10, ValueError("bad"))))
    records.append((1, b"k11", b"v11", [(ID_HEADER, b"11")]))
    produce_raw(kafka_bootstrap, dlq, records)
    connection = {"bootstrap.servers": kafka_bootstrap}

    seen: list[ReplayedRecord] = []
    summary = replay(
        connection,
        dlq,
        where=ReplayFilter(partition=0, from_offset=1, to_offset=3),
        dry_run=True,
        on_record=seen.append,
    )
    assert [r.source for r in seen] == [f"{dlq}/0/{o}" for o in (1, 2, 3)]
    assert [(r.destination, r.partition) for r in seen] == [(source, 1), (source, 2), (source, 0)]
    assert (summary.read, summary.matched, summary.replayed, summary.skipped) == (3, 3, 0, 0)
    assert end_offsets(kafka_bootstrap, source) == {0: 0, 1: 0, 2: 0}

    summary = replay(connection, dlq, where=ReplayFilter(partition=0, error_type="ValueError", limit=2))
    assert (summary.read, summary.matched, summary.replayed) == (2, 2, 2)
    assert sorted(record_id(m) for m in read_topic(kafka_bootstrap, source)) == [0, 1]

    summary = replay(connection, dlq, to=other, where=ReplayFilter(error_type="KeyError"))
    assert (summary.read, summary.matched, summary.replayed) == (7, 1, 1)
    [moved] = read_topic(kafka_bootstrap, other)
    assert (record_id(moved), moved.key()) == (3, b"k3")

    summary = replay(connection, dlq, where=ReplayFilter(partition=1, from_offset=1))
    assert (summary.read, summary.matched, summary.replayed, summary.skipped) == (1, 1, 0, 1)

    with pytest.raises(DestinationNotFoundError, match=f"{unique_name}-gone") as caught:
        replay(connection, dlq, where=ReplayFilter(partition=1))
    assert caught.value.summary is not None
    assert caught.value.summary.replayed == 0

    result = run_replay(kafka_bootstrap, "--topic", f"{unique_name}-nope.dlq")
    assert result.returncode == 4, result
    assert f"'{unique_name}-nope.dlq' does not exist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(DeadLetterTopicNotFoundError):
        replay(connection, f"{unique_name}-nope.dlq")


# -- g. errors people can act on -------------------------------------------------------------------------


def test_missing_subscribed_topic_exits_2_naming_it(
    workers: Workers, kafka_bootstrap: str, unique_name: str, group_id: str
) -> None:
    missing = f"{unique_name}-nope"
    worker = workers.start("w", missing, group_id)
    assert worker.wait(RUN_TIMEOUT_S) == 2, worker.describe()
    stderr = worker.log.read_text()
    assert missing in stderr, stderr
    assert "do not exist" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not topic_exists(kafka_bootstrap, f"{missing}.dlq")


def test_unreachable_kafka_is_retried_with_a_line_per_attempt_until_sigterm(
    workers: Workers, unique_name: str, group_id: str
) -> None:
    worker = workers.start(
        "w", unique_name, group_id, env={"STREAMER_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    )

    def retry_lines() -> list[dict[str, Any]]:
        assert worker.running, worker.describe()
        return named(worker, "kafka unreachable; retrying")

    [line, *_] = wait_for(retry_lines, 30.0, message=worker.describe)
    assert line["bootstrap_servers"] == "127.0.0.1:1"
    assert line["level"] == "warning"
    assert worker.running
    worker.send(signal.SIGTERM)
    assert worker.wait(STOP_TIMEOUT_S) == 0, worker.describe()

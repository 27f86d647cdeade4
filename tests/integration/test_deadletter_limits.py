"""Records the dead-letter topic refuses for their size, against the real broker: a reference is
parked instead (no value, the same failure headers, ``streamer.value.omitted``), and
``streamer dlq replay`` reads the original back from the source topic and re-publishes its exact
bytes, or says clearly (exit 1) that the original is gone.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from streamer import PermanentError
from streamer.deadletter import (
    FAILURE_HEADERS,
    H_ERROR_TYPE,
    H_KEY_OMITTED,
    H_OFFSET,
    H_PARTITION,
    H_TOPIC,
    H_VALUE_OMITTED,
    DeadLetterRejectedError,
    KafkaDeadLetterSink,
)
from streamer.message import Message as StreamerMessage
from streamer.replay import H_REPLAYED_FROM
from tests.conftest import make_unique_name
from tests.integration.workers import REPO, clean_env, streamer_command
from tests.support import wait_for
from tests.support.kafka import admin, committed_offsets, delete_topics, end_offsets

#: Seconds a ``streamer dlq replay`` or a bounded worker run may take.
RUN_TIMEOUT_S = 60.0
#: The dead-letter topics' max.message.bytes in these tests: far below the records parked.
SMALL_LIMIT = 20_000

TopicMaker = Callable[..., str]


@pytest.fixture
def make_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[TopicMaker]:
    """Create topics with topic configs: ``make_topic(partitions=1, name=None, **config) -> name``."""
    created: list[str] = []

    def make(partitions: int = 1, name: str | None = None, **config: str) -> str:
        topic = name or make_unique_name("t", request.node.name)
        client = admin(kafka_bootstrap)
        new = NewTopic(topic, num_partitions=partitions, replication_factor=1, config=config)
        client.create_topics([new], operation_timeout=30)[topic].result(timeout=30)
        created.append(topic)

        def ready() -> bool:
            meta = client.list_topics(topic=topic, timeout=10).topics.get(topic)
            return (
                meta is not None
                and meta.error is None
                and len(meta.partitions) == partitions
                and all(p.leader >= 0 for p in meta.partitions.values())
            )

        wait_for(ready, 30, message=f"topic {topic} has leaders")
        return topic

    yield make
    delete_topics(kafka_bootstrap, created)


def produce_one(
    bootstrap: str,
    topic: str,
    key: bytes,
    value: bytes,
    headers: list[tuple[str, bytes]],
    partition: int = 0,
    **config: Any,
) -> None:
    """Produce one record and assert it was acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", **config})
    errors: list[KafkaError | None] = []
    producer.produce(
        topic,
        key=key,
        value=value,
        headers=headers,
        partition=partition,
        on_delivery=lambda err, _m: errors.append(err),
    )
    assert producer.flush(30) == 0
    assert errors == [None], errors


def read_all(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Message]:
    """Every record of ``topic`` from its start offsets to its current end offsets."""
    ends = {p: o for p, o in end_offsets(bootstrap, topic).items() if o > 0}
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "unused",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        found: list[Message] = []
        deadline = time.monotonic() + timeout
        left = dict(ends)
        while left:
            assert time.monotonic() < deadline, f"read {len(found)} records of {topic}; missing {left}"
            for msg in consumer.consume(100, 0.2):
                assert msg.error() is None, msg.error()
                if msg.partition() in left and msg.offset() < ends[msg.partition()]:
                    found.append(msg)
                    if msg.offset() + 1 >= ends[msg.partition()]:
                        del left[msg.partition()]
        return sorted(found, key=lambda m: (m.partition(), m.offset()))
    finally:
        consumer.close()


def as_streamer_message(msg: Message) -> StreamerMessage:
    """The message a worker would have built from ``msg``."""
    return StreamerMessage(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.value(),
        tuple(msg.headers() or ()),
        msg.timestamp()[1],
    )


def texts(msg: Message) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in msg.headers() or []}


def run_replay(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        streamer_command("dlq", "replay", "--bootstrap", bootstrap, *args),
        cwd=REPO,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def park_in(bootstrap: str, dlq: str, original: Message, **connection: Any) -> None:
    """Park ``original`` in ``dlq`` the way the worker does, after a PermanentError."""
    sink = KafkaDeadLetterSink({"bootstrap.servers": bootstrap, **connection}, timeout=10)
    try:
        sink.park(as_streamer_message(original), PermanentError("bad order"), dlq, "billing", "w-1")
    finally:
        sink.close()


def assert_is_a_reference_to(parked: Message, original: Message, reason: str) -> None:
    """``parked`` is a reference: no value, the original's key and coordinates, ``reason`` (a regex)."""
    headers = texts(parked)
    assert parked.value() is None
    assert parked.key() == original.key()
    assert H_KEY_OMITTED not in headers
    assert (headers[H_TOPIC], headers[H_PARTITION], headers[H_OFFSET]) == (
        original.topic(),
        str(original.partition()),
        str(original.offset()),
    )
    assert set(FAILURE_HEADERS) <= set(headers)
    assert headers[H_ERROR_TYPE] == "streamer.errors.PermanentError"
    assert re.fullmatch(reason, headers[H_VALUE_OMITTED]), headers[H_VALUE_OMITTED]
    assert headers["message-id"] == "big", "the original headers ride along when they fit"


def assert_replayed_exactly(replayed: Message, original: Message, dlq: str, parked: Message) -> None:
    """``replayed`` carries the original's exact key, value and headers, plus where it was parked."""
    assert replayed.partition() == original.partition()
    assert replayed.key() == original.key()
    assert replayed.value() == original.value()
    assert replayed.headers() == [
        *(original.headers() or []),
        (H_REPLAYED_FROM, f"{dlq}/{parked.partition()}/{parked.offset()}".encode()),
    ]


def test_a_record_over_the_dead_letter_topics_max_message_bytes_is_parked_as_a_reference_and_replayed(
    kafka_bootstrap: str, make_topic: TopicMaker
) -> None:
    source = make_topic(2)
    dlq = make_topic(2, name=f"{source}.dlq", **{"max.message.bytes": str(SMALL_LIMIT)})
    value = os.urandom(60_000)
    produce_one(kafka_bootstrap, source, b"customer-7", value, [("message-id", b"big")], partition=1)
    [original] = read_all(kafka_bootstrap, source)

    park_in(kafka_bootstrap, dlq, original)

    [parked] = read_all(kafka_bootstrap, dlq)
    # The size counts the key, the value and the headers, streamer's included.
    assert_is_a_reference_to(
        parked, original, r"MSG_SIZE_TOO_LARGE: 60\d{3} bytes \(Broker: Message size too large\)"
    )
    result = run_replay(kafka_bootstrap, "--topic", dlq)
    assert result.returncode == 0, result.stderr
    assert "read 1, matched 1, replayed 1, skipped 0" in result.stdout, result.stdout
    assert "replayed 1 parked references with their original bytes from the source" in result.stdout
    [_, replayed] = read_all(kafka_bootstrap, source)
    assert replayed.offset() == original.offset() + 1
    assert_replayed_exactly(replayed, original, dlq, parked)


def test_a_record_over_the_producers_message_max_bytes_is_parked_as_a_reference_and_replayed(
    kafka_bootstrap: str, make_topic: TopicMaker
) -> None:
    """A 2,000,123-byte record (its topic allows 3 MB): the dead-letter producer's 1 MB default
    refuses it before sending; the replay re-publishes all of it."""
    source = make_topic(1, **{"max.message.bytes": "3000000"})
    dlq = make_topic(1, name=f"{source}.dlq")
    value = os.urandom(2_000_123)
    produce_one(
        kafka_bootstrap,
        source,
        b"customer-8",
        value,
        [("message-id", b"big")],
        **{"message.max.bytes": 3_000_000},
    )
    [original] = read_all(kafka_bootstrap, source)

    park_in(kafka_bootstrap, dlq, original)

    [parked] = read_all(kafka_bootstrap, dlq)
    assert_is_a_reference_to(parked, original, r"MSG_SIZE_TOO_LARGE: 2000\d{3} bytes \(.*\)")
    result = run_replay(kafka_bootstrap, "--topic", dlq)
    assert result.returncode == 0, result.stderr
    [_, replayed] = read_all(kafka_bootstrap, source)
    assert len(replayed.value() or b"") == 2_000_123
    assert_replayed_exactly(replayed, original, dlq, parked)


def test_replay_of_a_reference_whose_original_is_gone_says_so_and_exits_1(
    kafka_bootstrap: str, make_topic: TopicMaker
) -> None:
    """Retention removed the original (here: DeleteRecords, which moves the log start the same
    way): the reference is skipped with a line naming it, the rest is replayed, exit 1."""
    source = make_topic(1)
    dlq = make_topic(1, name=f"{source}.dlq", **{"max.message.bytes": str(SMALL_LIMIT)})
    produce_one(kafka_bootstrap, source, b"customer-1", os.urandom(60_000), [("message-id", b"big")])
    [original] = read_all(kafka_bootstrap, source)
    park_in(kafka_bootstrap, dlq, original)
    # A small record parked whole, after the reference: it is still replayed.
    produce_one(kafka_bootstrap, source, b"customer-2", b"small", [("message-id", b"small")])
    [_, small] = read_all(kafka_bootstrap, source)
    park_in(kafka_bootstrap, dlq, small)
    client = admin(kafka_bootstrap)
    deleted = client.delete_records([TopicPartition(source, 0, 2)], operation_timeout=30)
    for future in deleted.values():
        future.result(timeout=30)

    dry = run_replay(kafka_bootstrap, "--topic", dlq, "--dry-run")
    assert dry.returncode == 1, dry
    assert "NOT replayed 1 parked references: the original record is gone" in dry.stdout, dry.stdout
    assert "would replay 1, skipped 0" in dry.stdout, dry.stdout

    result = run_replay(kafka_bootstrap, "--topic", dlq)
    assert result.returncode == 1, result
    where = f"{dlq}/0/0 -> {source}[0]@0"
    assert f"{where}: gone from the source topic: {source}[0] now starts at offset 2 (retention)" in (
        result.stdout
    ), result.stdout
    assert "1 parked references not replayed" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "read 2, matched 2, replayed 1, skipped 0" in result.stdout, result.stdout
    [replayed] = read_all(kafka_bootstrap, source)
    assert (replayed.offset(), replayed.value()) == (2, b"small")


def test_a_worker_parks_a_reference_for_a_record_too_large_for_its_dead_letter_topic_and_goes_on(
    kafka_bootstrap: str, make_topic: TopicMaker, group_id: str, tmp_path: Path
) -> None:
    """Before: the worker retried the refused write forever and every partition waited. Now the
    reference is parked, the bounded run reaches the end and commits it."""
    source = make_topic(2)
    dlq = make_topic(2, name=f"{source}.dlq", **{"max.message.bytes": str(SMALL_LIMIT)})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    big = os.urandom(60_000)
    for rid in range(10):
        producer.produce(
            source,
            key=f"k{rid}".encode(),
            value=big if rid == 4 else b"v%d" % rid,
            partition=rid % 2,
            headers=[("message-id", str(rid).encode())],
        )
    assert producer.flush(30) == 0
    env = clean_env(
        STREAMER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        STREAMER_KAFKA__GROUP_ID=group_id,
        STREAMER_METRICS__ENABLED="false",
        STREAMER_LOG_FORMAT="json",
        FAILING_TOPIC=source,
        FAILING_EFFECTS=str(tmp_path / "effects"),
        FAILING_PERMANENT_IDS="4",
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            streamer_command("run", "tests.integration.apps.failing_app:app", "--until-end", "--no-progress"),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the worker did not finish:\n{log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]
    assert committed_offsets(kafka_bootstrap, group_id, source) == {0: 5, 1: 5}
    [parked] = read_all(kafka_bootstrap, dlq)
    assert parked.value() is None
    assert parked.key() == b"k4"
    assert texts(parked)["message-id"] == "4"
    assert texts(parked)[H_VALUE_OMITTED].startswith("MSG_SIZE_TOO_LARGE: ")
    assert "parked a reference to it instead" in log.read_text()


def test_a_record_whose_reference_is_refused_too_is_rejected_naming_the_topic_record_and_reason(
    kafka_bootstrap: str, make_topic: TopicMaker
) -> None:
    """A dead-letter topic that takes nothing of a reference's size (300 bytes): no retry can help."""
    source = make_topic(1)
    dlq = make_topic(1, name=f"{source}.dlq", **{"max.message.bytes": "300"})
    produce_one(kafka_bootstrap, source, b"customer-3", os.urandom(5_000), [("message-id", b"big")])
    [original] = read_all(kafka_bootstrap, source)

    with pytest.raises(DeadLetterRejectedError) as caught:
        park_in(kafka_bootstrap, dlq, original)

    assert str(caught.value).startswith(f"dead-letter topic {dlq!r} refuses {source}[0]@0 for good: ")
    assert "Message size too large" in str(caught.value)
    assert end_offsets(kafka_bootstrap, dlq) == {0: 0}, "nothing was parked"


def test_a_worker_whose_dead_letter_topic_refuses_even_a_reference_stops_with_the_reason(
    kafka_bootstrap: str, make_topic: TopicMaker, group_id: str, tmp_path: Path
) -> None:
    """Before: it retried forever, every partition held. Now it stops (exit 1), naming the record,
    and commits nothing at or past it."""
    source = make_topic(1)
    dlq = make_topic(1, name=f"{source}.dlq", **{"max.message.bytes": "300"})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for rid in range(6):
        producer.produce(source, key=b"k%d" % rid, value=b"v%d" % rid, headers=[("message-id", b"%d" % rid)])
    assert producer.flush(30) == 0
    env = clean_env(
        STREAMER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        STREAMER_KAFKA__GROUP_ID=group_id,
        STREAMER_METRICS__ENABLED="false",
        STREAMER_LOG_FORMAT="json",
        FAILING_TOPIC=source,
        FAILING_EFFECTS=str(tmp_path / "effects"),
        FAILING_PERMANENT_IDS="3",
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            streamer_command("run", "tests.integration.apps.failing_app:app", "--until-end", "--no-progress"),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the worker did not stop:\n{log.read_text()[-3000:]}") from None
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert f"dead-letter topic '{dlq}' refuses {source}[0]@3 for good" in text, text[-3000:]
    assert committed_offsets(kafka_bootstrap, group_id, source) == {0: 3}, "up to the record, not past it"
    assert end_offsets(kafka_bootstrap, dlq) == {0: 0}

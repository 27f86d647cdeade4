"""Self-test of ``tests.support.mockcluster``: librdkafka's mock cluster driven through ctypes.

No dev services: the mock brokers run inside this process on loopback ports, and plain
confluent-kafka clients talk to them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import confluent_kafka
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.support import wait_for
from tests.support.kafka import produce_records, record_id
from tests.support.mockcluster import ApiKey, Err, MockCluster, MockClusterError, librdkafka_path

TOPIC = "orders"


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    """A 3-broker mock cluster with a 2-partition topic."""
    with MockCluster(brokers=3) as mock:
        mock.set_group_initial_rebalance_delay(50)  # a new group's first join: 3 s by default
        mock.create_topic(TOPIC, partitions=2)
        yield mock


def _consumer(cluster: MockCluster, group: str, **extra: object) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": cluster.bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **extra,
        }
    )


def _consume(consumer: Consumer, n: int, timeout: float = 20.0) -> list[Message]:
    got: list[Message] = []

    def enough() -> bool:
        got.extend(m for m in consumer.consume(n - len(got), 0.2) if m.error() is None)
        return len(got) >= n

    wait_for(enough, timeout, interval=0, message=lambda: f"consumed {len(got)} of {n}")
    return got


def test_binds_the_librdkafka_confluent_kafka_uses() -> None:
    path = librdkafka_path()
    assert "librdkafka" in str(path)
    with MockCluster(brokers=1) as mock:
        assert mock.librdkafka_version == confluent_kafka.libversion()[0]
        assert mock.bootstrap.startswith("127.0.0.1:")
        assert mock.broker_ids == [1]
    assert mock.closed
    with pytest.raises(MockClusterError, match="closed"):
        mock.create_topic("late")
    mock.close()  # idempotent


def test_brokers_and_topics_are_what_clients_see(cluster: MockCluster) -> None:
    assert len(cluster.bootstrap.split(",")) == 3
    metadata = AdminClient({"bootstrap.servers": cluster.bootstrap}).list_topics(timeout=10)
    assert sorted(metadata.brokers) == [1, 2, 3]
    assert len(metadata.topics[TOPIC].partitions) == 2
    with pytest.raises(MockClusterError, match="TOPIC_ALREADY_EXISTS"):
        cluster.create_topic(TOPIC, partitions=2)


def test_produce_consume_and_commit(cluster: MockCluster) -> None:
    counts = produce_records(cluster.bootstrap, TOPIC, 40)
    assert counts == {0: 20, 1: 20}
    consumer = _consumer(cluster, "g-roundtrip")
    try:
        consumer.subscribe([TOPIC])
        records = _consume(consumer, 40)
        assert sorted(record_id(m) for m in records) == list(range(40))
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition(TOPIC, p) for p in (0, 1)], timeout=10)
        assert {tp.partition: tp.offset for tp in committed} == {0: 20, 1: 20}
    finally:
        consumer.close()


def test_injected_commit_errors_fail_commits_in_order_then_clear(cluster: MockCluster) -> None:
    produce_records(cluster.bootstrap, TOPIC, 10)
    consumer = _consumer(cluster, "g-errors")
    tp = TopicPartition(TOPIC, 0)
    try:
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 1)], asynchronous=False)
        cluster.start_request_tracking()
        # A permanent error fails the commit at once; librdkafka retries REQUEST_TIMED_OUT
        # (twice), so three of them in a row fail a commit too.
        cluster.push_request_errors(ApiKey.OFFSET_COMMIT, [Err.OFFSET_METADATA_TOO_LARGE])
        with pytest.raises(KafkaException) as failed:
            consumer.commit(offsets=[TopicPartition(TOPIC, 0, 2)], asynchronous=False)
        assert failed.value.args[0].code() == KafkaError.OFFSET_METADATA_TOO_LARGE
        cluster.push_request_errors(ApiKey.OFFSET_COMMIT, [Err.REQUEST_TIMED_OUT] * 3)
        with pytest.raises(KafkaException) as timed_out:
            consumer.commit(offsets=[TopicPartition(TOPIC, 0, 3)], asynchronous=False)
        assert timed_out.value.args[0].code() == KafkaError.REQUEST_TIMED_OUT
        assert cluster.request_count(ApiKey.OFFSET_COMMIT) == 4
        assert consumer.committed([tp], timeout=10)[0].offset == 1, "a failed commit changed nothing"

        # One retriable error is absorbed by librdkafka's retry: the commit lands.
        cluster.push_request_errors(ApiKey.OFFSET_COMMIT, [Err.REQUEST_TIMED_OUT])
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 4)], asynchronous=False)
        assert consumer.committed([tp], timeout=10)[0].offset == 4
        assert cluster.request_count(ApiKey.OFFSET_COMMIT) == 6

        # Cleared errors fail nothing.
        cluster.push_request_errors(ApiKey.OFFSET_COMMIT, [Err.OFFSET_METADATA_TOO_LARGE] * 5)
        cluster.clear_request_errors(ApiKey.OFFSET_COMMIT)
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 5)], asynchronous=False)
        assert consumer.committed([tp], timeout=10)[0].offset == 5
        assert all(r.broker_id in cluster.broker_ids for r in cluster.requests())
    finally:
        consumer.close()


def test_per_broker_errors_hit_only_that_broker(cluster: MockCluster) -> None:
    cluster.set_coordinator("g-broker", 2)  # before the consumer looks it up
    consumer = _consumer(cluster, "g-broker")
    try:
        cluster.push_broker_request_errors(3, ApiKey.OFFSET_COMMIT, [(Err.OFFSET_METADATA_TOO_LARGE, 0)])
        assert cluster.broker_error_stack_count(3, ApiKey.OFFSET_COMMIT) == 1
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 1)], asynchronous=False)  # to broker 2
        assert cluster.broker_error_stack_count(3, ApiKey.OFFSET_COMMIT) == 1
        cluster.push_broker_request_errors(
            2, ApiKey.OFFSET_COMMIT, [(Err.NO_ERROR, 300), (Err.OFFSET_METADATA_TOO_LARGE, 0)]
        )
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 2)], asynchronous=False)  # late, lands
        with pytest.raises(KafkaException):
            consumer.commit(offsets=[TopicPartition(TOPIC, 0, 3)], asynchronous=False)
        assert cluster.broker_error_stack_count(2, ApiKey.OFFSET_COMMIT) == 0
        assert consumer.committed([TopicPartition(TOPIC, 0)], timeout=10)[0].offset == 2
    finally:
        consumer.close()


def test_coordinator_moves_are_followed_by_a_group_member(cluster: MockCluster) -> None:
    """A member's heartbeats to the old coordinator fail; it finds the new one and stays."""
    stats: list[dict[str, object]] = []
    group = "g-moves"
    cluster.set_coordinator(group, 1)
    produce_records(cluster.bootstrap, TOPIC, 10)
    consumer = _consumer(
        cluster,
        group,
        **{
            "statistics.interval.ms": 100,
            "stats_cb": lambda text: stats.append(json.loads(text)),
            "heartbeat.interval.ms": 100,
        },
    )
    ports = {
        broker.id: f"{broker.host}:{broker.port}"
        for broker in AdminClient({"bootstrap.servers": cluster.bootstrap})
        .list_topics(timeout=10)
        .brokers.values()
    }

    def coordinator() -> str | None:
        consumer.poll(0.05)
        brokers = stats[-1]["brokers"] if stats else {}
        assert isinstance(brokers, dict)
        entry = brokers.get("GroupCoordinator")
        return str(entry["nodename"]) if entry and entry.get("state") == "UP" else None

    try:
        consumer.subscribe([TOPIC])
        _consume(consumer, 10)
        for broker_id in (2, 3, 1):
            cluster.set_coordinator(group, broker_id)
            expected = ports[broker_id]
            wait_for(
                lambda: coordinator() == expected,  # noqa: B023 - called before the loop moves on
                15,
                interval=0,
                message=lambda: f"coordinator {coordinator()}, expected {expected}",  # noqa: B023
            )
        assert consumer.assignment(), "the member kept its partitions through the moves"
        consumer.commit(offsets=[TopicPartition(TOPIC, 0, 5)], asynchronous=False)
        assert consumer.committed([TopicPartition(TOPIC, 0)], timeout=10)[0].offset == 5
    finally:
        consumer.close()

"""Kafka helpers for tests: topics, producing records with ids, reading offsets.

Every record produced here carries a unique integer id, in the ``message-id`` header (ASCII
digits) and in the JSON value (``{"id": N, "pad": "xxx"}``), so tests can check at-least-once /
exactly-once delivery by counting ids.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from tests.support import wait_for

__all__ = [
    "GROUP_PROTOCOLS",
    "ID_HEADER",
    "admin",
    "committed_offsets",
    "create_topic",
    "delete_topics",
    "end_offsets",
    "kafka_unavailable_reason",
    "partition_count",
    "produce_records",
    "protocol_client",
    "read_all",
    "record_id",
    "wait_for",
]

ID_HEADER = "message-id"
REQUEST_TIMEOUT_S = 10.0

#: The group protocols the rebalance, crash and chaos scenarios run under (``[kafka] group_protocol``).
GROUP_PROTOCOLS = ("classic", "consumer")
#: What the broker owns under the consumer protocol (KIP-848); dev/services sets the broker's
#: group.consumer.session.timeout.ms and heartbeat interval to the 6 s and 500 ms the classic
#: scenarios set on their members.
_CLASSIC_ONLY = ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy")


def protocol_client(client: dict[str, Any], protocol: str) -> dict[str, Any]:
    """``client`` ([kafka.client]) without the keys librdkafka refuses under ``protocol``."""
    if protocol == "classic":
        return client
    return {key: value for key, value in client.items() if key not in _CLASSIC_ONLY}


def admin(bootstrap: str) -> AdminClient:
    """Return an AdminClient for ``bootstrap``."""
    return AdminClient({"bootstrap.servers": bootstrap})


def kafka_unavailable_reason(bootstrap: str, timeout: float = 5.0) -> str | None:
    """Return None when the broker answers a metadata request, else why it does not."""
    try:
        metadata = admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException as exc:
        return f"metadata request failed: {exc.args[0]}"
    if not metadata.brokers:
        return "metadata lists no brokers"
    return None


def create_topic(
    bootstrap: str, name: str, partitions: int = 3, *, replication: int = 1, timeout: float = 30.0
) -> str:
    """Create ``name`` and return it once every partition has a leader."""
    client = admin(bootstrap)
    futures = client.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication)],
        operation_timeout=timeout,
    )
    futures[name].result(timeout=timeout)

    def ready() -> bool:
        topic = client.list_topics(topic=name, timeout=REQUEST_TIMEOUT_S).topics.get(name)
        return (
            topic is not None
            and topic.error is None
            and len(topic.partitions) == partitions
            and all(p.leader >= 0 and p.error is None for p in topic.partitions.values())
        )

    wait_for(ready, timeout, message=f"topic {name} has no leader for all {partitions} partitions")
    return name


def delete_topics(bootstrap: str, names: Sequence[str], timeout: float = 30.0) -> list[str]:
    """Delete topics, best effort; return the descriptions of deletions that failed."""
    if not names:
        return []
    failures: list[str] = []
    client = admin(bootstrap)  # keep a reference: futures fail once the client is destroyed
    futures = client.delete_topics(list(names), operation_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except (KafkaException, TimeoutError) as exc:
            failures.append(f"{name}: {exc}")
    return failures


def partition_count(bootstrap: str, topic: str) -> int:
    """Return the number of partitions of an existing topic."""
    metadata = admin(bootstrap).list_topics(topic=topic, timeout=REQUEST_TIMEOUT_S)
    entry = metadata.topics.get(topic)
    if entry is None or entry.error is not None:
        raise AssertionError(f"topic {topic} not found: {entry.error if entry else 'missing'}")
    return len(entry.partitions)


def encode_value(record: int, value_size: int) -> bytes:
    """Return the JSON value for record id ``record``, padded to ``value_size`` bytes if shorter."""
    head, tail = f'{{"id": {record}, "pad": "', '"}'
    return (head + "x" * max(0, value_size - len(head) - len(tail)) + tail).encode()


def record_id(message: Message) -> int:
    """Return the id a record from ``produce_records`` carries (from its header)."""
    value = dict(message.headers() or []).get(ID_HEADER)
    if value is not None:
        return int(value)
    # Fall back to the value, e.g. for records whose headers a handler dropped.
    return int(json.loads(message.value() or b"{}")["id"])


def produce_records(
    bootstrap: str,
    topic: str,
    n: int,
    *,
    partitions: int | Sequence[int] | None = None,
    value_size: int = 100,
    start_id: int = 0,
    key_fn: Callable[[int], bytes | str | None] | None = None,
) -> dict[int, int]:
    """Produce ``n`` records with ids ``start_id..start_id+n-1``; return records per partition.

    Records go round-robin to explicit partitions: all of the topic's (None), ``0..k-1`` (an int
    k) or the given partition numbers. Delivery of every record is asserted.
    """
    if partitions is None:
        targets: Sequence[int] = range(partition_count(bootstrap, topic))
    elif isinstance(partitions, int):
        targets = range(partitions)
    else:
        targets = partitions
    if not targets:
        raise ValueError("produce_records needs at least one partition")
    counts = dict.fromkeys(targets, 0)
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        partition = msg.partition()
        if err is not None or partition is None:
            errors.append(f"partition {partition}: {err}")
        else:
            counts[partition] += 1

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    for i in range(n):
        record = start_id + i
        key = key_fn(record) if key_fn is not None else None
        while True:
            try:
                producer.produce(
                    topic,
                    value=encode_value(record, value_size),
                    key=key,
                    partition=targets[i % len(targets)],
                    headers=[(ID_HEADER, str(record).encode())],
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: serve delivery reports, then retry
        producer.poll(0)
    remaining = producer.flush(60)
    assert remaining == 0, f"{remaining} of {n} records to {topic} still undelivered after 60s"
    assert not errors, f"{len(errors)} of {n} records to {topic} failed: {errors[:5]}"
    assert sum(counts.values()) == n, f"delivered {sum(counts.values())} of {n} records"
    return counts


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Return the high watermark of every partition of ``topic``."""
    partitions = range(partition_count(bootstrap, topic))
    request = {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions}
    client = admin(bootstrap)  # keep a reference: futures fail once the client is destroyed
    futures = client.list_offsets(request, request_timeout=REQUEST_TIMEOUT_S)
    return {tp.partition: future.result(timeout=REQUEST_TIMEOUT_S).offset for tp, future in futures.items()}


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Return the offsets ``group`` committed for ``topic``; partitions without one are left out.

    Reads through the admin API, so it never joins the group or triggers a rebalance.
    """
    partitions = [TopicPartition(topic, p) for p in range(partition_count(bootstrap, topic))]
    client = admin(bootstrap)  # keep a reference: futures fail once the client is destroyed
    futures = client.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, partitions)], request_timeout=REQUEST_TIMEOUT_S
    )
    result = futures[group].result(timeout=REQUEST_TIMEOUT_S)
    offsets: dict[int, int] = {}
    for tp in result.topic_partitions or []:
        if tp.error is not None:
            raise AssertionError(f"committed offset of {group} on {topic}[{tp.partition}]: {tp.error}")
        if tp.offset >= 0:
            offsets[tp.partition] = tp.offset
    return offsets


def read_all(
    bootstrap: str, topic: str, expect: int, *, timeout: float = 60.0, read_committed: bool = False
) -> list[Message]:
    """Every record of ``topic`` from the start, waiting until ``expect`` arrived or ``timeout``."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": f"reader-{uuid.uuid4().hex[:12]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    if read_committed:
        config["isolation.level"] = "read_committed"
    consumer = Consumer(config)
    consumer.subscribe([topic])
    out: list[Message] = []

    def more() -> bool:
        out.extend(raw for raw in consumer.consume(500, 0.5) if raw.error() is None)
        return len(out) >= expect

    try:
        wait_for(more, timeout, interval=0, message=lambda: f"{topic}: {len(out)} of {expect} records")
    finally:
        consumer.close()
    return out

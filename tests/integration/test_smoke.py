"""Smoke tests: the dev Kafka broker and Redis work end to end with plain clients."""

from __future__ import annotations

from collections import Counter

import redis
from confluent_kafka import Consumer

from tests.support.kafka import committed_offsets, end_offsets, produce_records, record_id, wait_for

RECORDS = 10_000


def test_kafka_produce_consume_commit(kafka_bootstrap: str, topic: str, group_id: str) -> None:
    """Every produced record is consumed exactly once and the manual commit reaches the end."""
    per_partition = produce_records(kafka_bootstrap, topic, RECORDS)
    assert per_partition == {0: 3334, 1: 3333, 2: 3333}
    assert end_offsets(kafka_bootstrap, topic) == per_partition

    seen: Counter[int] = Counter()
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])

        def consumed_all() -> bool:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                error = msg.error()
                assert error is None, f"consume error: {error}"
                seen[record_id(msg)] += 1
            return len(seen) >= RECORDS

        wait_for(
            consumed_all,
            timeout=60,
            interval=0,
            message=lambda: f"consumed {len(seen)} of {RECORDS} distinct records",
        )
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()

    assert set(seen) == set(range(RECORDS))
    duplicates = {i: c for i, c in seen.items() if c > 1}
    assert not duplicates, f"{len(duplicates)} ids seen twice or more: {sorted(duplicates)[:10]}"
    committed = committed_offsets(kafka_bootstrap, group_id, topic)
    assert committed == end_offsets(kafka_bootstrap, topic), f"committed {committed}"


def test_redis_round_trip(redis_url: str, unique_name: str) -> None:
    """A value SET under a fresh key comes back from GET."""
    client = redis.Redis.from_url(redis_url)
    key = f"streamer-test:{unique_name}"
    try:
        assert client.set(key, b"value-1")
        assert client.get(key) == b"value-1"
    finally:
        client.delete(key)
        client.close()

"""``streamer lag``: how far behind a consumer group is, per partition, in records and seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from streamer.errors import StreamerError


class GroupNotFoundError(StreamerError):
    """The consumer group has no members and no committed offsets."""


@dataclass(frozen=True)
class PartitionLag:
    """Lag of one partition of a group."""

    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int
    #: Age of the oldest unprocessed record (the one at the committed offset); 0 when caught up.
    seconds: float | None


def group_lag(connection: dict[str, Any], group: str, timeout: float = 10.0) -> list[PartitionLag]:
    """Committed offset, end offset and lag of every partition the group has committed."""
    admin = AdminClient(connection)
    future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
    try:
        partitions = future.result(timeout=timeout).topic_partitions or []
    except KafkaException as exc:
        raise GroupNotFoundError(f"consumer group {group!r}: {exc.args[0]}") from None
    committed = {(p.topic, p.partition): p.offset for p in partitions if p.offset >= 0}
    if not committed:
        state = admin.describe_consumer_groups([group])[group].result(timeout=timeout).state
        raise GroupNotFoundError(
            f"consumer group {group!r} has no committed offsets (state {state.name.lower()}): "
            "it does not exist, or it has not committed yet"
        )
    probe = Consumer({**connection, "group.id": f"streamer-lag-probe-{group}", "enable.auto.commit": False})
    try:
        ends = {tp: probe.get_watermark_offsets(TopicPartition(*tp), timeout=timeout)[1] for tp in committed}
        ages = _oldest_unprocessed_age(
            probe, {tp: off for tp, off in committed.items() if ends[tp] > off}, timeout
        )
    finally:
        probe.close()
    return [
        PartitionLag(t, p, off, ends[t, p], max(ends[t, p] - off, 0), ages.get((t, p), 0.0))
        for (t, p), off in sorted(committed.items())
    ]


def _oldest_unprocessed_age(
    consumer: Consumer, positions: dict[tuple[str, int], int], timeout: float
) -> dict[tuple[str, int], float | None]:
    """Read the record at each committed offset (without joining the group) and return its age."""
    ages: dict[tuple[str, int], float | None] = dict.fromkeys(positions)
    if not positions:
        return ages
    consumer.assign([TopicPartition(t, p, off) for (t, p), off in positions.items()])
    deadline = time.monotonic() + timeout
    pending = set(positions)
    while pending and time.monotonic() < deadline:
        for msg in consumer.consume(100, 0.5):
            tp = (msg.topic(), msg.partition())
            if msg.error() is None and tp in pending:
                ts_type, ts = msg.timestamp()
                ages[tp] = max(time.time() - ts / 1000.0, 0.0) if ts_type else None
                pending.discard(tp)
                consumer.pause([TopicPartition(*tp)])
    return ages


def render(rows: list[PartitionLag]) -> str:
    """A table of the group's lag, with a total line."""
    header = ("topic", "partition", "committed", "end", "lag", "lag_seconds")
    body = [
        (
            r.topic,
            str(r.partition),
            "-" if r.committed is None else str(r.committed),
            str(r.end),
            str(r.lag),
            "?" if r.seconds is None else f"{r.seconds:.1f}",
        )
        for r in rows
    ]
    worst = max((r.seconds or 0.0 for r in rows), default=0.0)
    body.append(("total", "", "", "", str(sum(r.lag for r in rows)), f"{worst:.1f} (max)"))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    )

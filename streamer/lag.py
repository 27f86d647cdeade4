"""``streamer lag``: how far behind a consumer group is, per partition, in records and seconds.

The group's committed offsets are read with a plain consumer that carries the group's id and
never subscribes (``Consumer.committed``: an OffsetFetch through the consumer's own group
coordinator handling; it neither joins the group nor changes it). Not with the AdminClient:
librdkafka 2.16's coordinator-bound admin requests (``list_consumer_group_offsets``,
``describe_consumer_groups``) can abort the process right after a broker restart, with
``Assertion 'eonce->refcnt > 0'`` in ``rd_kafka_admin_coord_response_parse`` (a use-after-free on
their error path, librdkafka #4605 / #5397) or, once, a SIGSEGV (an OffsetFetch error handled as if
the admin client had a consumer group, #5040). ``committed`` needs the partitions to ask about, so
lag asks about every partition in the cluster's metadata, in one request.

A group with no committed offset for any partition is reported as not found (exit 4). Whether it
exists at all, and its state, comes from ListConsumerGroups, which asks every broker and does not
go through the coordinator path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from streamer.errors import StreamerError

T = TypeVar("T")

#: Errors of a coordinator that is moving or loading (as after a broker restart): asked again.
_COORDINATOR_BUSY = frozenset(
    (
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._WAIT_COORD,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.REQUEST_TIMED_OUT,
    )
)


class GroupNotFoundError(StreamerError):
    """The consumer group has no committed offsets (it does not exist, or never committed).

    Also raised, naming the error, when its committed offsets cannot be read within the timeout.
    """


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
    committed = committed_offsets(connection, group, timeout)
    if not committed:
        raise GroupNotFoundError(_no_offsets(connection, group, timeout))
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


def committed_offsets(
    connection: dict[str, Any], group: str, timeout: float = 10.0
) -> dict[tuple[str, int], int]:
    """The offsets ``group`` has committed, per (topic, partition) of the cluster; {} if none.

    Raises GroupNotFoundError naming the error when they cannot be read within ``timeout``.
    """
    consumer = Consumer(
        {
            **connection,
            "group.id": group,
            # Never subscribes (so never joins) and never commits: it only reads.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    deadline = time.monotonic() + timeout
    try:
        topics = _patiently(lambda left: consumer.list_topics(timeout=left).topics, deadline, group)
        partitions = [
            TopicPartition(topic, partition)
            for topic, meta in sorted(topics.items())
            if meta.error is None
            for partition in sorted(meta.partitions)
        ]
        if not partitions:
            return {}
        found = _patiently(lambda left: consumer.committed(partitions, timeout=left), deadline, group)
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): tp.offset for tp in found if tp.error is None and tp.offset >= 0}


def _patiently(call: Callable[[float], T], deadline: float, group: str) -> T:
    """``call(seconds left)``, asked again while the coordinator is busy, until ``deadline``."""
    while True:
        left = deadline - time.monotonic()
        try:
            return call(max(left, 0.1))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            busy = isinstance(err, KafkaError) and (err.code() in _COORDINATOR_BUSY or err.retriable())
            if not busy or deadline - time.monotonic() <= 0.5:
                reason = err.str() if isinstance(err, KafkaError) else str(exc)
                raise GroupNotFoundError(
                    f"consumer group {group!r}: cannot read its offsets: {reason}"
                ) from None
            time.sleep(0.5)  # a moving coordinator settles in a few hundred ms


def _no_offsets(connection: dict[str, Any], group: str, timeout: float) -> str:
    """Why ``group`` has no committed offsets, as far as ListConsumerGroups tells."""
    text = f"consumer group {group!r} has no committed offsets"
    admin = AdminClient(connection)  # referenced until the result is in: its futures fail once it is gone
    try:
        listing = admin.list_consumer_groups(request_timeout=timeout).result(timeout=timeout + 1)
    except (KafkaException, TimeoutError):
        return f"{text}: it does not exist, or it has not committed yet"
    states = {g.group_id: g.state for g in listing.valid}
    if group in states:
        return f"{text} (state {states[group].name.lower()}): it has not committed yet"
    if listing.errors:
        return f"{text}: it does not exist, or it has not committed yet"
    return f"{text}: no group of that name exists on the cluster"


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

"""Replay parked records: read a dead-letter topic and re-publish what matches to where it came from.

``streamer dlq replay --topic orders.dlq`` reads the dead-letter topic from its beginning (or
``--from-offset``) up to the end offsets it saw when it started, with partitions assigned directly
(no consumer group, nothing committed), and re-publishes each matching record:

- to its original topic (header ``streamer.original.topic``), into its original partition when that
  partition still exists, so that it lands in the order its key's records are consumed in; or to
  ``--to TOPIC`` (then the key decides the partition, with the Java clients' partitioner);
- with its original key, value and headers, minus the ``streamer.*`` failure headers, so that its
  idempotency key (e.g. ``message-id``) survives: with dedup on, a record that was parked is not
  marked done, so it runs again;
- plus ``streamer.replayed_from = "<dlq topic>/<partition>/<offset>"``, which says where it was.

A *reference* (a parked record without its value, header ``streamer.value.omitted``: the
dead-letter topic refused the record for its size or content) is resolved by reading the original
record back from its source topic at the partition and offset its headers name, and replaying
that record's key, value and headers. If the original is gone (retention or compaction removed
it, or the topic was deleted or recreated), the reference is not replayed: the summary lists it,
and the replay ends with OriginalNotFoundError once the rest is published.

Publishing uses an idempotent producer with ``acks=all``; every delivery is checked before the
replay reports success. A replay publishes a record again each time it runs: replay a range once,
or turn dedup on so that a record replayed twice runs once.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka import Message as KafkaMessage

from streamer.deadletter import (
    FAILURE_HEADERS,
    H_ERROR_TYPE,
    H_OFFSET,
    H_PARTITION,
    H_TIMESTAMP,
    H_TOPIC,
    H_VALUE_OMITTED,
    REFERENCE_HEADERS,
    header_text,
)
from streamer.errors import ConfigError, StreamerError
from streamer.message import Headers

__all__ = [
    "H_REPLAYED_FROM",
    "DeadLetterTopicNotFoundError",
    "DestinationNotFoundError",
    "OriginalNotFoundError",
    "ReplayError",
    "ReplayFilter",
    "ReplaySummary",
    "ReplayedRecord",
    "replay",
]

#: Header added to a replayed record: ``<dlq topic>/<partition>/<offset>`` it was read from.
H_REPLAYED_FROM = "streamer.replayed_from"
#: Headers a replay drops from the parked record: the failure description and an earlier replay's mark.
DROPPED_HEADERS = frozenset((*FAILURE_HEADERS, *REFERENCE_HEADERS, H_REPLAYED_FROM))

#: Seconds to wait for metadata and watermarks.
_REQUEST_TIMEOUT = 10.0
#: Seconds without a single record, below the end offsets, before the replay gives up.
_IDLE_LIMIT = 30.0
#: The largest record a replay re-publishes (a referenced original may exceed librdkafka's
#: 1,000,000-byte default); the destination topic's max.message.bytes still applies.
_MAX_RECORD_BYTES = 100_000_000


class ReplayError(StreamerError):
    """A replay could not finish; ``summary`` (when known) says what was published before it stopped."""

    def __init__(self, message: str, summary: ReplaySummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class DeadLetterTopicNotFoundError(ReplayError):
    """The dead-letter topic to replay from does not exist."""


class DestinationNotFoundError(ReplayError):
    """A topic to replay into does not exist (streamer never creates one)."""


class OriginalNotFoundError(ReplayError):
    """Parked references were not replayed: their original records are gone from the source topic.

    Raised after everything else was replayed; ``summary.missing`` lists each reference and why.
    """


@dataclass(frozen=True)
class ReplayFilter:
    """Which parked records to replay. Offsets are those of the dead-letter topic."""

    #: Only records whose ``streamer.error.type`` contains this text (e.g. ``ValueError``).
    error_type: str | None = None
    #: Only this partition of the dead-letter topic.
    partition: int | None = None
    #: First offset to read, in every partition read (default: the beginning).
    from_offset: int | None = None
    #: Last offset to read, inclusive, in every partition read (default: the end seen at start).
    to_offset: int | None = None
    #: Replay at most this many records, then stop reading.
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("partition", "from_offset", "to_offset"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more (got {value})")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be 1 or more (got {self.limit})")
        if self.from_offset is not None and self.to_offset is not None and self.from_offset > self.to_offset:
            raise ConfigError(f"--from-offset ({self.from_offset}) is past --to-offset ({self.to_offset})")

    def matches(self, headers: Headers) -> bool:
        """Whether a parked record with ``headers`` passes the header filters."""
        if self.error_type is None:
            return True
        error_type = header_text(headers, H_ERROR_TYPE)
        return error_type is not None and self.error_type in error_type


@dataclass(frozen=True)
class ReplayedRecord:
    """One matching record: where it was parked, where it goes (None: nowhere), why it failed."""

    source: str
    destination: str | None
    partition: int | None
    error_type: str | None
    key: bytes | None
    #: ``topic[partition]@offset`` of the original, for a reference (its bytes come from there).
    original: str | None = None
    #: Why a reference is not replayed (its original is gone), else None.
    missing: str | None = None


@dataclass
class ReplaySummary:
    """What a replay did."""

    dead_letter_topic: str
    dry_run: bool
    #: Records read from the dead-letter topic, within the partitions and offsets asked for.
    read: int = 0
    #: Records read that passed the filters (at most ``limit``).
    matched: int = 0
    #: Matching records re-published and acknowledged (0 in a dry run).
    replayed: int = 0
    #: Matching records not re-published: no ``streamer.original.topic`` header and no ``--to``.
    skipped: int = 0
    #: Matching references replayed (or, in a dry run, that would be) with their original's bytes.
    resolved: int = 0
    #: Matching references not replayed, ``"<source>: <why>"``: the original is gone.
    missing: list[str] = field(default_factory=list)
    #: Records re-published (or, in a dry run, that would be) per destination topic.
    destinations: Counter[str] = field(default_factory=Counter)
    #: End offsets snapshotted at start, per partition read: the replay stopped there.
    ends: dict[int, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The summary as printed by ``streamer dlq replay``."""
        verb = "would replay" if self.dry_run else "replayed"
        count = self.matched - self.skipped - len(self.missing) if self.dry_run else self.replayed
        out = [
            f"{'dry run: ' if self.dry_run else ''}read {self.read}, matched {self.matched}, "
            f"{verb} {count}, skipped {self.skipped} from {self.dead_letter_topic} "
            f"(up to end offsets {_show_ends(self.ends)})"
        ]
        out.extend(f"  {verb} {n} to {topic}" for topic, n in sorted(self.destinations.items()))
        if self.resolved:
            out.append(
                f"  {verb} {self.resolved} parked references with their original bytes from the source"
            )
        if self.skipped:
            out.append(f"  skipped {self.skipped}: no {H_TOPIC} header; give --to TOPIC to replay them")
        if self.missing:
            out.append(f"  NOT replayed {len(self.missing)} parked references: the original record is gone")
            out.extend(f"    {line}" for line in self.missing)
        return out


def replay(
    connection: dict[str, Any],
    dead_letter_topic: str,
    *,
    to: str | None = None,
    where: ReplayFilter | None = None,
    dry_run: bool = False,
    on_record: Callable[[ReplayedRecord], None] | None = None,
    timeout: float = 30.0,
) -> ReplaySummary:
    """Re-publish the matching records of ``dead_letter_topic``; return what was done.

    ``connection`` is a librdkafka configuration with the connection and security settings (see
    ``streamer.source.admin_config``). ``on_record`` is called for every matching record, before
    it is published. ``timeout`` bounds the wait for the last acknowledgements, in seconds.

    Raises DeadLetterTopicNotFoundError if ``dead_letter_topic`` does not exist,
    DestinationNotFoundError if a topic to publish to does not, ConfigError for a partition the
    topic does not have, ReplayError when a delivery fails, OriginalNotFoundError (after
    replaying the rest) when a parked reference's original record is gone from its source topic,
    KafkaException when the cluster cannot be reached.
    """
    consumer = Consumer(
        {
            **connection,
            # Required by the client; never joined (partitions are assigned) and never committed.
            "group.id": "streamer-dlq-replay",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    originals = _Originals(connection)
    try:
        run = _Replay(consumer, dead_letter_topic, to, where or ReplayFilter(), on_record)
        run.originals = originals
        run.summary.dry_run = dry_run
        run.publisher = None if dry_run else _Publisher(connection)
        try:
            run.read_all()
        except (ReplayError, KafkaException) as exc:
            # Let what was queued be delivered (or fail) so that the summary tells the truth.
            if run.publisher is not None:
                run.summary.replayed = run.publisher.drain(timeout)
            if isinstance(exc, ReplayError):
                exc.summary = run.summary
                raise
            raise ReplayError(f"reading {dead_letter_topic} failed: {exc}", run.summary) from exc
        if run.publisher is not None:
            try:
                run.summary.replayed = run.publisher.finish(timeout)
            except ReplayError as exc:
                run.summary.replayed = run.publisher.acked
                exc.summary = run.summary
                raise
        if run.summary.missing:
            raise OriginalNotFoundError(
                f"{len(run.summary.missing)} parked references not replayed, their original records "
                f"are gone from the source topic: {'; '.join(run.summary.missing[:5])}",
                run.summary,
            )
    finally:
        originals.close()
        consumer.close()
    return run.summary


class _Replay:
    """One replay: the snapshot of the end offsets, the reading loop, and each record's fate."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        to: str | None,
        where: ReplayFilter,
        on_record: Callable[[ReplayedRecord], None] | None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.to = to
        self.where = where
        self.on_record = on_record
        self.publisher: _Publisher | None = None
        self.originals: _Originals | None = None
        self.summary = ReplaySummary(topic, dry_run=False)
        self.topics: dict[str, Any] = consumer.list_topics(timeout=_REQUEST_TIMEOUT).topics
        #: Destination topic -> its partition count, once checked.
        self.destinations: dict[str, int] = {}
        if to is not None:
            self.destinations[to] = self._partition_count(to)

    def read_all(self) -> None:
        """Consume each partition from its start to its snapshotted end, replaying what matches."""
        starts = self._snapshot(self._partitions_to_read())
        if not starts:
            return
        self.consumer.assign([TopicPartition(self.topic, p, offset) for p, offset in starts.items()])
        remaining = set(starts)
        idle_since = time.monotonic()
        while remaining:
            batch = self.consumer.consume(500, 0.1)  # returns at the timeout, not when data arrives
            if batch:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > _IDLE_LIMIT:
                raise ReplayError(
                    f"no records from {self.topic} partitions {sorted(remaining)} for {_IDLE_LIMIT:.0f} s "
                    f"although they are below the end offsets {_show_ends(self.summary.ends)}; "
                    f"replayed so far: {_published(self.publisher)}"
                )
            for raw in batch:
                if raw.partition() in remaining and not self._take(raw, remaining):
                    return

    def _take(self, raw: Any, remaining: set[int]) -> bool:
        """Handle one consumed message; False once the limit is reached."""
        partition: int = raw.partition()
        err = raw.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                remaining.discard(partition)  # at the high watermark, which is past the snapshot
            elif err.fatal():
                raise KafkaException(err)
            return True  # other errors are transient; librdkafka retries
        offset: int = raw.offset()
        end = self.summary.ends[partition]
        if offset + 1 >= end:
            remaining.discard(partition)
            if offset >= end:
                return True
        self.summary.read += 1
        headers: Headers = tuple(raw.headers() or ())
        if not self.where.matches(headers):
            return True
        self.summary.matched += 1
        source = f"{self.topic}/{partition}/{offset}"
        key, value, kept = raw.key(), raw.value(), headers
        original = None
        if header_text(headers, H_VALUE_OMITTED) is not None:
            original = _coordinates(headers)
            found = self._original(headers)
            if isinstance(found, str):
                self.summary.missing.append(f"{source} -> {original}: {found}")
                if self.on_record is not None:
                    self.on_record(
                        ReplayedRecord(
                            source, None, None, header_text(headers, H_ERROR_TYPE), None, original, found
                        )
                    )
                return self.where.limit is None or self.summary.matched < self.where.limit
            key, value, kept = _contents(found)
        record = self._route(
            ReplayedRecord(
                source=source,
                destination=self.to or header_text(headers, H_TOPIC),
                partition=None,
                error_type=header_text(headers, H_ERROR_TYPE),
                key=key,
                original=original,
            ),
            headers,
        )
        if original is not None and record.destination is not None:
            self.summary.resolved += 1
        if self.on_record is not None:
            self.on_record(record)
        if self.publisher is not None and record.destination is not None:
            self.publisher.publish(record, value, _replay_headers(kept, record.source))
        return self.where.limit is None or self.summary.matched < self.where.limit

    def _original(self, headers: Headers) -> KafkaMessage | str:
        """The original record a reference names, or why it cannot be had (a str)."""
        topic, partition, offset = (header_text(headers, h) for h in (H_TOPIC, H_PARTITION, H_OFFSET))
        if topic is None or partition is None or offset is None:
            return f"the reference lacks {H_TOPIC}, {H_PARTITION} or {H_OFFSET}"
        if not (partition.isdigit() and offset.isdigit()):
            return f"the reference names no valid position ({partition!r}, {offset!r})"
        stamp = header_text(headers, H_TIMESTAMP)
        assert self.originals is not None  # noqa: S101 - replay() sets it before reading
        return self.originals.fetch(topic, int(partition), int(offset), int(stamp) if stamp else None)

    def _route(self, record: ReplayedRecord, headers: Headers) -> ReplayedRecord:
        """Count the record's destination and pick its partition (None: the partitioner's choice).

        It goes back to its original partition if it goes back to its original topic (``--to``
        naming that topic counts) and that partition still exists.
        """
        destination = record.destination
        if destination is None:
            self.summary.skipped += 1
            return record
        if destination not in self.destinations:
            self.destinations[destination] = self._partition_count(destination)
        self.summary.destinations[destination] += 1
        original = header_text(headers, H_PARTITION)
        if original is None or destination != header_text(headers, H_TOPIC) or not original.isdigit():
            return record
        if int(original) >= self.destinations[destination]:
            return record
        return dataclasses.replace(record, partition=int(original))

    def _partitions_to_read(self) -> list[int]:
        meta = self.topics.get(self.topic)
        if meta is None or meta.error is not None:
            raise DeadLetterTopicNotFoundError(
                f"dead-letter topic {self.topic!r} does not exist"
                + ("" if meta is None else f" ({meta.error.str()})")
                + ": check its name (by default the source topic + '.dlq')"
            )
        partitions = sorted(meta.partitions)
        wanted = self.where.partition
        if wanted is None:
            return partitions
        if wanted not in partitions:
            raise ConfigError(f"--partition {wanted}: {self.topic!r} has partitions 0..{len(partitions) - 1}")
        return [wanted]

    def _snapshot(self, partitions: list[int]) -> dict[int, int]:
        """Record the end offsets as of now; return where to start reading each partition.

        Partitions with nothing to read in the range are left out.
        """
        starts: dict[int, int] = {}
        for partition in partitions:
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=_REQUEST_TIMEOUT, cached=False
            )
            end = high if self.where.to_offset is None else min(high, self.where.to_offset + 1)
            start = low if self.where.from_offset is None else max(low, self.where.from_offset)
            self.summary.ends[partition] = end
            if start < end:
                starts[partition] = start
        return starts

    def _partition_count(self, topic: str) -> int:
        """The partition count of ``topic``; raise DestinationNotFoundError if it does not exist."""
        meta = self.topics.get(topic)
        if meta is None:  # perhaps created since the replay started
            meta = self.consumer.list_topics(topic=topic, timeout=_REQUEST_TIMEOUT).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            how = "create it first" if topic == self.to else "recreate it, or replay into another with --to"
            raise DestinationNotFoundError(f"topic {topic!r} to replay into does not exist: {how}")
        return len(meta.partitions)


def _contents(msg: KafkaMessage) -> tuple[bytes | None, bytes | None, Headers]:
    """Key, value and headers of a consumed record (bytes: the consumer has no deserializers)."""
    return msg.key(), msg.value(), cast("Headers", tuple(msg.headers() or ()))


def _coordinates(headers: Headers) -> str:
    """``topic[partition]@offset`` of the record a parked record came from."""
    topic, partition, offset = (header_text(headers, h) for h in (H_TOPIC, H_PARTITION, H_OFFSET))
    return f"{topic}[{partition}]@{offset}"


class _Originals:
    """Reads the original record a reference names from its source topic (assigned, never committed)."""

    def __init__(self, connection: dict[str, Any]) -> None:
        self._connection = connection
        self._consumer: Consumer | None = None

    def fetch(self, topic: str, partition: int, offset: int, timestamp: int | None) -> KafkaMessage | str:
        """The record at ``topic[partition]@offset``, or why it is gone (a str).

        ``timestamp`` (ms, from the reference) tells the parked record from another one at the
        same offset of a recreated topic. Raises ReplayError when the record cannot be read in time.
        """
        consumer = self._open()
        gone = self._out_of_range(consumer, topic, partition, offset)
        if gone is not None:
            return gone
        where = f"{topic}[{partition}]@{offset}"
        consumer.assign([TopicPartition(topic, partition, offset)])
        try:
            found = self._first_record(consumer, where)
        finally:
            consumer.unassign()
        if found is None or found.offset() != offset:
            after = "" if found is None else f" (the next one is at {found.offset()})"
            return f"no record at {where} any more{after}: removed by compaction or retention"
        kind, stamp = found.timestamp()
        if timestamp is not None and kind != TIMESTAMP_NOT_AVAILABLE and stamp != timestamp:
            return (
                f"the record now at {where} is not the parked one (timestamp {stamp}, parked {timestamp}): "
                "the topic was recreated"
            )
        return found

    @staticmethod
    def _out_of_range(consumer: Consumer, topic: str, partition: int, offset: int) -> str | None:
        """Why ``offset`` cannot be read from ``topic[partition]`` any more, or None if it may be."""
        meta = consumer.list_topics(topic=topic, timeout=_REQUEST_TIMEOUT).topics.get(topic)
        if meta is None or meta.error is not None:
            return f"topic {topic!r} no longer exists"
        if partition not in meta.partitions:
            return f"topic {topic!r} has no partition {partition} any more"
        tp = TopicPartition(topic, partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=_REQUEST_TIMEOUT, cached=False)
        if offset < low:
            return f"gone from the source topic: {topic}[{partition}] now starts at offset {low} (retention)"
        if offset >= high:
            return f"{topic}[{partition}] ends at offset {high}: the topic was recreated or truncated"
        return None

    def _first_record(self, consumer: Consumer, where: str) -> KafkaMessage | None:
        """The first record consumed from the one assigned partition; None at its end."""
        deadline = time.monotonic() + _IDLE_LIMIT
        while time.monotonic() < deadline:
            for raw in consumer.consume(1, 0.5):
                err = raw.error()
                if err is None:
                    return raw
                if err.code() == KafkaError._PARTITION_EOF:
                    return None
                if err.fatal():
                    raise KafkaException(err)
        raise ReplayError(f"could not read the original record {where} within {_IDLE_LIMIT:.0f} s")

    def _open(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    **self._connection,
                    # Required by the client; never joined (partitions are assigned), never committed.
                    "group.id": "streamer-dlq-replay",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": True,
                    "auto.offset.reset": "earliest",
                }
            )
        return self._consumer

    def close(self) -> None:
        """Close the consumer, if one was opened."""
        if self._consumer is not None:
            self._consumer.close()


def _replay_headers(headers: Headers, source: str) -> list[tuple[str, bytes | None]]:
    """The parked record's headers without streamer's failure headers, plus where it was parked."""
    kept = [(k, v) for k, v in headers if k not in DROPPED_HEADERS]
    return [*kept, (H_REPLAYED_FROM, source.encode())]


class _Publisher:
    """An idempotent, acks=all producer that counts acknowledgements and remembers failures."""

    def __init__(self, connection: dict[str, Any]) -> None:
        self._producer = Producer(
            {
                **connection,
                "enable.idempotence": True,
                "acks": "all",
                # Java clients' default: a keyed record replayed with --to lands where they put its key.
                "partitioner": "murmur2_random",
                "linger.ms": 5,
                "message.max.bytes": connection.get("message.max.bytes", _MAX_RECORD_BYTES),
            }
        )
        self.sent = 0
        self.acked = 0
        self.failures: list[str] = []

    def publish(
        self, record: ReplayedRecord, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
    ) -> None:
        """Queue ``record`` for its destination; deliveries are checked in ``finish``."""
        assert record.destination is not None  # noqa: S101 - callers skip records without one

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                self.acked += 1
            else:
                self.failures.append(f"{record.source} -> {record.destination}: {err.str()}")

        kwargs: dict[str, Any] = {} if record.partition is None else {"partition": record.partition}
        self.sent += 1
        while True:
            try:
                self._producer.produce(
                    record.destination,
                    key=record.key,
                    value=value,
                    headers=list(headers),
                    on_delivery=delivered,
                    **kwargs,
                )
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve delivery reports, then retry
            except KafkaException as exc:  # refused before sending, e.g. larger than message.max.bytes
                self.failures.append(f"{record.source} -> {record.destination}: {exc}")
                return
        self._producer.poll(0)

    def drain(self, timeout: float) -> int:
        """Wait for outstanding acknowledgements without judging them; return how many arrived."""
        self._producer.flush(timeout)
        return self.acked

    def finish(self, timeout: float) -> int:
        """Wait for every acknowledgement; return how many; raise ReplayError if any is missing."""
        left = self._producer.flush(timeout)
        if self.failures:
            raise ReplayError(
                f"{len(self.failures)} of {self.sent} records were not re-published "
                f"({self.acked} were): {'; '.join(self.failures[:5])}"
            )
        if left:
            raise ReplayError(
                f"{left} of {self.sent} records not acknowledged within {timeout:g} s ({self.acked} were); "
                "they may or may not have been published"
            )
        return self.acked


def _published(publisher: _Publisher | None) -> str:
    return "nothing (dry run)" if publisher is None else f"{publisher.sent} queued"


def _show_ends(ends: dict[int, int]) -> str:
    return "{" + ", ".join(f"{p}: {o}" for p, o in sorted(ends.items())) + "}"

"""The Kafka boundary: a consumer in a group that only commits what streamer tells it to."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not re-exported in the stubs
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from streamer.errors import ConfigError
from streamer.settings import KafkaSettings

log = structlog.get_logger("streamer.source")

TP = tuple[str, int]
RebalanceCallback = Callable[[list[TP]], None]
CommitCallback = Callable[[KafkaError | None, list[Any]], None]


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """What the broker says about a subscribed topic."""

    partitions: int
    #: retention.ms of the topic; -1 means forever.
    retention_ms: int


@dataclass(frozen=True, slots=True)
class Committed:
    """What the group committed for a partition at assignment time."""

    offset: int | None
    metadata: str | None


def consumer_config(
    settings: KafkaSettings,
    on_commit: CommitCallback | None = None,
    on_stats: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The librdkafka configuration of a streamer consumer.

    Auto-commit and the automatic offset store are off: streamer alone decides what is committed.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": settings.group_id,
        **_group_protocol_config(settings),
        "auto.offset.reset": settings.auto_offset_reset,
        "enable.partition.eof": False,
        # Large fetches keep the Python loop, not the network, the bottleneck.
        "fetch.wait.max.ms": 100,
        # librdkafka waits fetch.queue.backoff.ms (1,000 by default) before fetching again once
        # its queue holds queued.min.messages: a consumer catching up on a backlog then idles
        # most of each second. 10 ms keeps the queue topped up (bench.throughput: the raw loop
        # runs ~5x faster with it); the queue itself is bounded to 16 MB instead of 64 MB, so
        # a worker's memory stays flat and small whatever the backlog.
        "fetch.queue.backoff.ms": 10,
        "queued.max.messages.kbytes": 16_384,
        **settings.librdkafka_client(),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    }
    # librdkafka's own log lines go through Python logging, hence through the structlog pipeline.
    config["logger"] = logging.getLogger("streamer.librdkafka")
    if on_commit is not None:
        config["on_commit"] = on_commit
    if on_stats is not None:
        # librdkafka statistics carry each partition's high watermark: the base of lag metrics.
        config.setdefault("statistics.interval.ms", 5000)
        config["stats_cb"] = on_stats
    return config


def _group_protocol_config(settings: KafkaSettings) -> dict[str, Any]:
    """The settings of the group protocol; librdkafka refuses classic ones with "consumer"."""
    if settings.group_protocol == "consumer":
        # KIP-848: the broker assigns partitions and owns the session timeout and heartbeat
        # interval (group.consumer.session.timeout.ms, group.consumer.heartbeat.interval.ms).
        config: dict[str, Any] = {"group.protocol": "consumer"}
        if settings.remote_assignor is not None:
            config["group.remote.assignor"] = settings.remote_assignor
        return config
    return {
        "group.protocol": "classic",
        "partition.assignment.strategy": settings.assignment_strategy,
        # A crashed member is noticed after 8 s instead of librdkafka's 45: a restarted worker
        # gets its partitions back that much sooner. The loop never blocks heartbeats (they run
        # on librdkafka's thread), so a short session costs no spurious evictions.
        "session.timeout.ms": 8_000,
    }


class Source(Protocol):
    """The Kafka boundary the worker needs; KafkaSource, or MemorySource in streamer.testing."""

    def bind(self, on_commit: CommitCallback) -> None:
        """Deliver asynchronous commit results to ``on_commit`` (during poll)."""
        ...

    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: RebalanceCallback,
        on_revoke: RebalanceCallback,
        on_lost: RebalanceCallback,
    ) -> None:
        """Join the group for ``topics``."""
        ...

    def poll(self, max_records: int, timeout: float) -> list[Any]:
        """Up to ``max_records`` records (confluent-kafka Message objects)."""
        ...

    def commit(self, offsets: dict[TP, int], metadata: Mapping[TP, str], *, asynchronous: bool) -> None:
        """Commit ``offsets``, each partition with its metadata."""
        ...

    def committed(self, partitions: list[TP], timeout: float = 10.0) -> dict[TP, Committed]:
        """The group's committed offsets."""
        ...

    def group_metadata(self) -> Any:
        """The consumer's group metadata (generation, member), for a transaction's offsets."""
        ...

    def watermarks(self, tp: TP, timeout: float = 10.0) -> tuple[int, int]:
        """Low and high watermark."""
        ...

    def pause(self, partitions: list[TP]) -> None:
        """Stop fetching ``partitions``."""
        ...

    def resume(self, partitions: list[TP]) -> None:
        """Fetch ``partitions`` again."""
        ...

    def seek(self, tp: TP, offset: int) -> None:
        """Fetch ``tp`` from ``offset`` next."""
        ...

    def describe_topics(self, topics: Sequence[str], timeout: float = 10.0) -> dict[str, TopicInfo | None]:
        """Partitions and retention of ``topics``."""
        ...

    def create_topics(self, topics: Mapping[str, int], timeout: float = 30.0) -> None:
        """Create ``topics``."""
        ...

    def close(self) -> None:
        """Leave the group."""
        ...


#: librdkafka settings that only a consumer understands; an admin client warns about them.
_CONSUMER_ONLY = (
    "group.",
    "session.timeout",
    "heartbeat.",
    "max.poll.",
    "fetch.",
    "auto.",
    "enable.auto.",
    "enable.partition.eof",
    "partition.assignment",
    "isolation.",
    "queued.",
    "check.crcs",
    "coordinator.",
    "statistics.interval",
    "logger",
)


def admin_config(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings only: what an admin client or a probe consumer needs."""
    return {k: v for k, v in consumer_config(settings).items() if not k.startswith(_CONSUMER_ONLY)}


class KafkaSource:
    """A confluent-kafka consumer subscribed to a set of topics, with rebalance hooks."""

    def __init__(
        self,
        settings: KafkaSettings,
        on_commit: CommitCallback | None = None,
        on_stats: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        try:
            self._consumer = Consumer(consumer_config(settings, on_commit, on_stats))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            text = err.str() if isinstance(err, KafkaError) else str(exc)
            raise ConfigError(
                "kafka settings rejected by librdkafka ([kafka] and [kafka.client]): "
                + text.removeprefix("Failed to create consumer: ")
            ) from None

    def bind(self, on_commit: CommitCallback) -> None:
        """No-op: librdkafka takes the commit callback at construction (see __init__)."""

    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: RebalanceCallback,
        on_revoke: RebalanceCallback,
        on_lost: RebalanceCallback,
    ) -> None:
        """Join the group for ``topics``; the callbacks run inside ``poll`` on this thread."""

        def tps(partitions: list[TopicPartition]) -> list[TP]:
            return [(p.topic, p.partition) for p in partitions]

        self._consumer.subscribe(
            list(topics),
            on_assign=lambda _c, parts: on_assign(tps(parts)),
            on_revoke=lambda _c, parts: on_revoke(tps(parts)),
            on_lost=lambda _c, parts: on_lost(tps(parts)),
        )

    def poll(self, max_records: int, timeout: float) -> list[Any]:
        """Fetch up to ``max_records`` records; errors that are not fatal are logged and dropped."""
        batch = self._consumer.consume(max_records, timeout)
        if not batch:
            return batch
        for raw in batch:
            if raw.error() is not None:
                return [m for m in batch if not self._is_error(m)]
        return batch

    def _is_error(self, raw: Any) -> bool:
        err: KafkaError | None = raw.error()
        if err is None:
            return False
        if err.fatal() or err.code() == KafkaError._FATAL:
            # A fatal consumer error reaches consume() as _FATAL with fatal() unset (only the
            # error rd_kafka_fatal_error() returns has it): the consumer is dead, and a worker
            # that went on polling it would idle forever while its health checks pass.
            raise KafkaException(err)
        log.warning("kafka error", error=err.str(), code=err.name(), topic=raw.topic())
        return True

    def commit(self, offsets: dict[TP, int], metadata: Mapping[TP, str], *, asynchronous: bool) -> None:
        """Commit ``offsets`` (the next offset to read, per partition). Sync commits raise on error."""
        parts = [TopicPartition(t, p, o, metadata[t, p]) for (t, p), o in offsets.items()]
        if asynchronous:
            self._consumer.commit(offsets=parts, asynchronous=True)
            return
        result = self._consumer.commit(offsets=parts, asynchronous=False)
        failed = [p for p in result or [] if p.error is not None]
        if failed:
            raise KafkaException(failed[0].error)

    def group_metadata(self) -> Any:
        """The consumer's group metadata (generation, member), for a transaction's offsets."""
        return self._consumer.consumer_group_metadata()

    def member_id(self) -> str | None:
        """The member id the group coordinator gave this consumer (None before the first join).

        A round trip to librdkafka's main thread, which waits while another thread is inside
        consume(): call it from the loop thread (``engine.rebalance.MemberId`` does).
        """
        member = self._consumer.memberid()
        return member if isinstance(member, str) and member else None

    def committed(self, partitions: list[TP], timeout: float = 10.0) -> dict[TP, Committed]:
        """The group's committed offsets (and their metadata) for ``partitions``."""
        parts = self._consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout)
        return {
            (p.topic, p.partition): Committed(p.offset if p.offset >= 0 else None, p.metadata) for p in parts
        }

    def watermarks(self, tp: TP, timeout: float = 10.0) -> tuple[int, int]:
        """Low and high watermark of a partition, asked of the broker (not cached)."""
        low, high = self._consumer.get_watermark_offsets(TopicPartition(*tp), timeout=timeout, cached=False)
        return int(low), int(high)

    def pause(self, partitions: list[TP]) -> None:
        """Stop fetching ``partitions`` while staying in the group."""
        self._consumer.pause([TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: list[TP]) -> None:
        """Fetch ``partitions`` again."""
        self._consumer.resume([TopicPartition(t, p) for t, p in partitions])

    def seek(self, tp: TP, offset: int) -> None:
        """Fetch ``tp`` from ``offset`` next (used to rewind records that must not be skipped)."""
        self._consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def describe_topics(self, topics: Sequence[str], timeout: float = 10.0) -> dict[str, TopicInfo | None]:
        """Partitions and retention of ``topics``; None for a topic that does not exist.

        Raises KafkaException when the cluster cannot be reached within ``timeout``.
        """
        admin = AdminClient(self._admin_config())
        metadata = admin.list_topics(timeout=timeout)
        partitions = {
            t: len(meta.partitions)
            for t in topics
            if (meta := metadata.topics.get(t)) is not None and meta.error is None
        }
        existing = list(partitions)
        retention: dict[str, int] = {}
        if existing:
            futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in existing])
            for resource, future in futures.items():
                entry = future.result(timeout=timeout).get("retention.ms")
                retention[resource.name] = int(entry.value) if entry is not None else -1
        return {t: TopicInfo(partitions[t], retention[t]) if t in retention else None for t in topics}

    def create_topics(self, topics: Mapping[str, int], timeout: float = 30.0) -> None:
        """Create ``topics`` (name -> partitions) with the broker's default replication factor."""
        admin = AdminClient(self._admin_config())
        futures = admin.create_topics([NewTopic(name, partitions) for name, partitions in topics.items()])
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaException(exc.args[0]) from None
                log.debug("topic already exists", topic=name)

    def _admin_config(self) -> dict[str, Any]:
        config = consumer_config(self._settings)
        # Keep only what an admin client understands: connection and security settings.
        for key in (
            "group.id",
            "group.protocol",
            "group.remote.assignor",
            "partition.assignment.strategy",
            "auto.offset.reset",
            "enable.partition.eof",
            "fetch.wait.max.ms",
            "session.timeout.ms",
            "enable.auto.commit",
            "enable.auto.offset.store",
        ):
            config.pop(key, None)
        return config

    def close(self) -> None:
        """Leave the group (running the revoke callback) and free the consumer."""
        started = time.monotonic()
        self._consumer.close()
        log.debug("consumer closed", seconds=round(time.monotonic() - started, 3))

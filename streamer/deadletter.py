"""The dead-letter topic: where a record that cannot be processed is parked, bytes intact.

A parked record keeps its original key, value and headers (so its idempotency key survives a
replay) and gains ``streamer.*`` headers that say what failed, where and when. The worker commits
past a parked record only after the broker acknowledged the dead-letter write (acks=all,
idempotent producer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from streamer.errors import StreamerError
from streamer.message import Headers, Message

log = structlog.get_logger("streamer.deadletter")

#: Headers added to a parked record.
H_ERROR_TYPE = "streamer.error.type"
H_ERROR_MESSAGE = "streamer.error.message"
H_TOPIC = "streamer.original.topic"
H_PARTITION = "streamer.original.partition"
H_OFFSET = "streamer.original.offset"
H_TIMESTAMP = "streamer.original.timestamp"
H_ATTEMPTS = "streamer.attempts"
H_GROUP = "streamer.group"
H_WORKER = "streamer.worker"
H_FAILED_AT = "streamer.failed_at"
FAILURE_HEADERS = (
    H_ERROR_TYPE,
    H_ERROR_MESSAGE,
    H_TOPIC,
    H_PARTITION,
    H_OFFSET,
    H_TIMESTAMP,
    H_ATTEMPTS,
    H_GROUP,
    H_WORKER,
    H_FAILED_AT,
)
_MAX_MESSAGE = 2000


class DeadLetterUnavailableError(StreamerError):
    """The dead-letter topic could not be written; the worker retries and commits nothing past it."""


class DeadLetterRejectedError(StreamerError):
    """The dead-letter topic refuses the record for good (authorization, size): it cannot be parked."""


class DeadLetterSink(Protocol):
    """Where parked records go (a Kafka topic, or an in-memory twin in tests)."""

    def park(self, msg: Message, error: BaseException, dlq_topic: str, group: str, worker: str) -> None:
        """Write ``msg`` to ``dlq_topic`` and return once it is durably acknowledged."""
        ...


def failure_headers(msg: Message, error: BaseException, group: str, worker: str) -> Headers:
    """The original headers plus the ``streamer.*`` headers describing the failure."""
    cause = error.__cause__ if error.__cause__ is not None else error
    text = str(error)[:_MAX_MESSAGE]
    added = [
        (H_ERROR_TYPE, f"{type(cause).__module__}.{type(cause).__qualname__}"),
        (H_ERROR_MESSAGE, text),
        (H_TOPIC, msg.topic),
        (H_PARTITION, str(msg.partition)),
        (H_OFFSET, str(msg.offset)),
        (H_TIMESTAMP, "" if msg.timestamp is None else str(msg.timestamp)),
        (H_ATTEMPTS, str(msg.attempt)),
        (H_GROUP, group),
        (H_WORKER, worker),
        (H_FAILED_AT, f"{time.time():.3f}"),
    ]
    kept = tuple((k, v) for k, v in msg.headers if k not in FAILURE_HEADERS)
    return kept + tuple((k, v.encode()) for k, v in added)


class KafkaDeadLetterSink:
    """Parks records in Kafka with an idempotent, acks=all producer; one flush per parked record."""

    def __init__(self, connection: dict[str, Any], timeout: float = 10.0) -> None:
        self._producer = Producer(
            {
                **connection,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
                "message.timeout.ms": int(timeout * 1000),
                "logger": logging.getLogger("streamer.librdkafka"),
            }
        )
        self._timeout = timeout

    def park(self, msg: Message, error: BaseException, dlq_topic: str, group: str, worker: str) -> None:
        """Write ``msg`` to ``dlq_topic``; raise DeadLetterUnavailableError unless acknowledged."""
        outcome: list[KafkaError | None] = []
        try:
            self._producer.produce(
                dlq_topic,
                key=msg.key,
                value=msg.value,
                headers=list(failure_headers(msg, error, group, worker)),
                on_delivery=lambda err, _m: outcome.append(err),
            )
        except (KafkaException, BufferError) as exc:
            raise DeadLetterUnavailableError(f"cannot write to {dlq_topic}: {exc}") from exc
        # Wait past message.timeout.ms: then librdkafka has reported the delivery either way, and a
        # retry never writes a second copy of a record whose first write did land.
        self._producer.flush(self._timeout + 5)
        if not outcome:
            raise DeadLetterUnavailableError(f"no acknowledgement from {dlq_topic} within {self._timeout} s")
        if outcome[0] is not None:
            raise DeadLetterUnavailableError(f"cannot write to {dlq_topic}: {outcome[0].str()}")

    def close(self) -> None:
        """Flush anything outstanding."""
        self._producer.flush(self._timeout)


class MemoryDeadLetterSink:
    """An in-memory twin: keeps what was parked, for unit tests and plugin authors."""

    def __init__(self) -> None:
        self.parked: list[tuple[str, Message, Headers]] = []

    def park(self, msg: Message, error: BaseException, dlq_topic: str, group: str, worker: str) -> None:
        """Remember the parked record and its headers."""
        self.parked.append((dlq_topic, msg, failure_headers(msg, error, group, worker)))


def header_text(headers: Sequence[tuple[str, bytes | None]], name: str) -> str | None:
    """The value of header ``name`` decoded as UTF-8, or None."""
    for key, value in reversed(headers):
        if key == name:
            return None if value is None else value.decode("utf-8", "replace")
    return None

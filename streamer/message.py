"""The record a handler receives: an immutable view of one Kafka message."""

from __future__ import annotations

from typing import Any, NamedTuple

Headers = tuple[tuple[str, bytes | None], ...]


class Message(NamedTuple):
    """One Kafka record, immutable.

    A ``NamedTuple`` rather than a frozen dataclass: building one is several times cheaper, and
    the worker builds one per record on the hot path.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    #: Milliseconds since the epoch as set by the producer or broker, or None when absent.
    timestamp: int | None = None
    #: 1 on the first run of the chain, 2 on the first retry, ...
    attempt: int = 1
    #: The value decoded by the decode step (e.g. JSON), or None when the topic has no decoder.
    decoded: Any = None

    def header(self, name: str) -> bytes | None:
        """Return the value of the last header called ``name``, or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None

    @classmethod
    def from_kafka(cls, raw: Any) -> Message:
        """Build a Message from a confluent-kafka ``Message``."""
        return message_from_kafka(raw)


_new_tuple = tuple.__new__


def message_from_kafka(raw: Any) -> Message:
    """Build a Message from a confluent-kafka ``Message`` (the hot path: no NamedTuple __new__)."""
    headers = raw.headers()
    ts_type, ts = raw.timestamp()
    return _new_tuple(
        Message,
        (
            raw.topic(),
            raw.partition(),
            raw.offset(),
            raw.key(),
            raw.value(),
            tuple(headers) if headers else (),
            ts if ts_type else None,  # TIMESTAMP_NOT_AVAILABLE == 0
            1,
            None,
        ),
    )

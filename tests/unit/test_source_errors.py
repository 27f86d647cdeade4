"""KafkaSource.poll: errors librdkafka delivers among the records."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamer.settings import load_settings
from streamer.source import KafkaSource

pytestmark = pytest.mark.usefixtures("clean_environment")


class FakeMessage:
    def __init__(self, error: KafkaError | None, offset: int = 0) -> None:
        self._error = error
        self._offset = offset

    def error(self) -> KafkaError | None:
        return self._error

    def topic(self) -> str | None:
        return None if self._error is not None else "t"

    def offset(self) -> int:
        return self._offset


class FakeConsumer:
    def __init__(self, batch: list[Any]) -> None:
        self.batch = batch

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        return self.batch


def source_with(batch: list[Any]) -> KafkaSource:
    """A KafkaSource whose consumer hands out ``batch`` (nothing connects anywhere)."""
    source = KafkaSource(load_settings(kafka={"bootstrap_servers": "127.0.0.1:1", "group_id": "g"}).kafka)
    source._consumer.close()
    source._consumer = FakeConsumer(batch)  # type: ignore[assignment]
    return source


def test_a_transient_error_is_dropped_and_the_records_around_it_are_kept() -> None:
    records = [
        FakeMessage(None, 1),
        FakeMessage(KafkaError(KafkaError._TRANSPORT, "down")),
        FakeMessage(None, 2),
    ]
    assert [m.offset() for m in source_with(records).poll(10, 0.1)] == [1, 2]


def test_a_fatal_consumer_error_delivered_as_fatal_without_the_flag_stops_the_poll() -> None:
    """librdkafka delivers a fatal consumer error (e.g. the broker refusing a consumer-protocol
    member: GROUP_ID_NOT_FOUND, UNRELEASED_INSTANCE_ID) as _FATAL with fatal() False."""
    reason = "Fatal error: Broker: The group id does not exist: ConsumerGroupHeartbeat fatal error"
    error = KafkaError(KafkaError._FATAL, reason)
    assert not error.fatal()
    with pytest.raises(KafkaException, match="group id does not exist"):
        source_with([FakeMessage(error)]).poll(10, 0.1)


def test_an_error_flagged_fatal_stops_the_poll() -> None:
    error = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    with pytest.raises(KafkaException):
        source_with([FakeMessage(None, 1), FakeMessage(error)]).poll(10, 0.1)

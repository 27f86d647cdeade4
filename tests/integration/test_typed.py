"""Typed handlers against the real broker: a good record reaches the handler as the model, a record
that does not validate is parked in the dead-letter topic with its original bytes and the
validation error in its headers, and the group commits past both — with a worker run in this
process until the end offsets, for a pydantic model and a msgspec Struct.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pydantic
import pytest
from confluent_kafka import Producer

from streamer import App, Message
from streamer.deadletter import H_ATTEMPTS, H_ERROR_MESSAGE, H_ERROR_TYPE, H_OFFSET, H_TOPIC
from streamer.exitcodes import EXIT_OK
from streamer.settings import load_settings
from streamer.worker import Worker
from tests.conftest import TopicFactory
from tests.support.kafka import committed_offsets, end_offsets, read_all

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 30.0


class Order(pydantic.BaseModel):
    id: int
    customer: str


class OrderStruct(msgspec.Struct):
    id: int
    customer: str


GOOD = (b"good", b'{"id": 7, "customer": "ada"}')
BAD = (b"bad", b'{"id": "seven", "customer": "ada"}')
NOT_JSON = (b"garbled", b"{not json")


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Produce ``(key, value)`` records in order to partition 0, each with a header of its own."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    errors: list[Any] = []
    for i, (key, value) in enumerate(records):
        producer.produce(
            topic,
            value,
            key,
            0,
            headers=[("message-id", str(i).encode())],
            on_delivery=lambda err, _m: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0, "records not delivered"
    assert not errors, errors


@pytest.mark.parametrize(
    ("model", "error_type", "not_json_type"),
    [
        (
            Order,
            "pydantic_core._pydantic_core.ValidationError",
            "pydantic_core._pydantic_core.ValidationError",
        ),
        (OrderStruct, "msgspec.ValidationError", "msgspec.DecodeError"),
    ],
    ids=["pydantic", "msgspec"],
)
def test_a_record_that_does_not_validate_is_parked_with_its_bytes_and_the_error_and_a_good_one_is_handled(
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    group_id: str,
    model: type,
    error_type: str,
    not_json_type: str,
) -> None:
    source = topic_factory(1)
    dlq = topic_factory(1, name=f"{source}.dlq")
    produce(kafka_bootstrap, source, [GOOD, BAD, NOT_JSON, GOOD])
    seen: list[tuple[Any, int]] = []

    def handle(order: Any, msg: Message) -> None:
        seen.append((order, msg.offset))

    handle.__annotations__ = {"order": model, "msg": Message, "return": None}
    app = App()
    app.handler(source)(handle)
    settings = load_settings(
        kafka={"bootstrap_servers": kafka_bootstrap, "group_id": group_id},
        metrics={"enabled": False},
        retry={"max_attempts": 3, "initial_backoff": 0.01},
    )
    worker = Worker(settings, app.chains(settings), until_end=True)
    assert worker.run() == EXIT_OK

    assert seen == [(model(id=7, customer="ada"), 0), (model(id=7, customer="ada"), 3)]
    assert all(type(order) is model for order, _ in seen)
    assert committed_offsets(kafka_bootstrap, group_id, source) == end_offsets(kafka_bootstrap, source)

    parked = read_all(kafka_bootstrap, dlq, 2, timeout=READ_TIMEOUT_S)
    assert [(m.key(), m.value()) for m in parked] == [BAD, NOT_JSON], "parked without the original bytes"
    bad, garbled = (dict(m.headers()) for m in parked)
    assert bad["message-id"] == b"1", "the original headers travel with the parked record"
    assert (bad[H_TOPIC], bad[H_OFFSET], bad[H_ATTEMPTS]) == (source.encode(), b"1", b"1")
    assert bad[H_ERROR_TYPE] == error_type.encode()
    reason = bad[H_ERROR_MESSAGE].decode()
    assert reason.startswith(f"invalid {model.__qualname__}: "), reason
    assert "int" in reason
    assert "id" in reason
    assert garbled[H_ERROR_TYPE] == not_json_type.encode()
    assert garbled[H_ERROR_MESSAGE].decode().startswith(f"invalid {model.__qualname__}: ")

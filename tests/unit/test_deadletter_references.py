"""Dead-letter writes that fail: which errors retry, which park a reference, which reject the record.

The Kafka sink runs over a stand-in producer that answers each write as a test says (acknowledged,
refused in its delivery report, or refused by ``produce`` itself, as librdkafka does for a record
over ``message.max.bytes``). The real broker's refusals are in
``tests/integration/test_deadletter_limits.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamer import Message, PermanentError
from streamer.deadletter import (
    FAILURE_HEADERS,
    H_HEADERS_OMITTED,
    H_KEY_OMITTED,
    H_OFFSET,
    H_PARTITION,
    H_TOPIC,
    H_VALUE_OMITTED,
    REFERENCE_HEADERS,
    DeadLetterRejectedError,
    DeadLetterUnavailableError,
    Disposition,
    KafkaDeadLetterSink,
    classify,
    failure_headers,
    header_text,
    record_size,
    references,
)
from streamer.errors import StreamerError
from streamer.replay import ReplaySummary, _replay_headers

MSG = Message(
    "orders",
    2,
    1234,
    b"customer-9",
    b"x" * 50_000,
    (("message-id", b"9"), ("trace", b"abc")),
    1_700_000_000_123,
)
#: A password in the connection settings, which no error message may repeat.
SECRET = "hunter2-very-secret"  # noqa: S105 - a test value, not a credential


def error(code: int, *, fatal: bool = False) -> KafkaError:
    return KafkaError(code, f"test: {code}", fatal=fatal)


@dataclass(frozen=True)
class Raise:
    """``produce`` itself raises this error (a local refusal)."""

    error: KafkaError


@dataclass
class FakeProducer:
    """Answers the n-th write with the n-th verdict: None (acknowledged), a KafkaError, or Raise."""

    verdicts: list[KafkaError | Raise | None]
    written: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = field(
        default_factory=list
    )
    closed: bool = False
    _pending: list[tuple[Callable[..., None], KafkaError | None]] = field(default_factory=list)

    def produce(self, topic: str, *, key: Any, value: Any, headers: Any, on_delivery: Any) -> None:
        verdict = self.verdicts.pop(0)
        if isinstance(verdict, Raise):
            raise KafkaException(verdict.error)
        self.written.append((topic, key, value, headers))
        self._pending.append((on_delivery, verdict))

    def flush(self, _timeout: float) -> int:
        for deliver, verdict in self._pending:
            deliver(verdict, None)
        self._pending.clear()
        return 0

    def close(self) -> bool:
        self.closed = True
        return True


def sink_over(*producers: FakeProducer, **connection: Any) -> KafkaDeadLetterSink:
    """A Kafka sink whose producers are ``producers``, in the order it builds them."""
    queue = list(producers)
    config = {"bootstrap.servers": "unused:9092", "sasl.password": SECRET, **connection}
    return KafkaDeadLetterSink(config, producer_factory=lambda _c: queue.pop(0))


def park(sink: KafkaDeadLetterSink, msg: Message = MSG) -> None:
    sink.park(msg, PermanentError("bad order"), "orders.dlq", "billing", "w-1")


def texts(headers: list[tuple[str, bytes | None]]) -> dict[str, str | None]:
    return {k: None if v is None else v.decode() for k, v in headers}


# --- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "disposition"),
    [
        (KafkaError.MSG_SIZE_TOO_LARGE, Disposition.REFERENCE),
        (KafkaError.RECORD_LIST_TOO_LARGE, Disposition.REFERENCE),
        (KafkaError.INVALID_RECORD, Disposition.REFERENCE),
        (KafkaError.INVALID_MSG_SIZE, Disposition.REFERENCE),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, Disposition.REJECT),
        (KafkaError.CLUSTER_AUTHORIZATION_FAILED, Disposition.REJECT),
        (KafkaError.TOPIC_EXCEPTION, Disposition.REJECT),
        (KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT, Disposition.REJECT),
        (KafkaError._MSG_TIMED_OUT, Disposition.RETRY),
        (KafkaError.NOT_ENOUGH_REPLICAS, Disposition.RETRY),
        (KafkaError.NOT_LEADER_FOR_PARTITION, Disposition.RETRY),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, Disposition.RETRY),
        (KafkaError._UNKNOWN_TOPIC, Disposition.RETRY),
        (KafkaError._TRANSPORT, Disposition.RETRY),
        (KafkaError.REQUEST_TIMED_OUT, Disposition.RETRY),
        (KafkaError.INVALID_MSG, Disposition.RETRY),
    ],
)
def test_classify_sorts_delivery_errors_into_retry_reference_and_reject(
    code: int, disposition: Disposition
) -> None:
    assert classify(error(code)) is disposition


def test_a_rejection_is_a_streamer_error_the_retry_loop_does_not_catch() -> None:
    assert issubclass(DeadLetterRejectedError, StreamerError)
    assert not issubclass(DeadLetterRejectedError, DeadLetterUnavailableError)
    assert not issubclass(DeadLetterUnavailableError, DeadLetterRejectedError)


# --- references() -----------------------------------------------------------------------------------


def test_the_first_reference_keeps_key_failure_and_original_headers_and_says_why_the_value_is_gone() -> None:
    headers = failure_headers(MSG, PermanentError("x"), "g", "w")
    refused = error(KafkaError.MSG_SIZE_TOO_LARGE)
    [(key, first), (key2, smallest)] = list(references(MSG, headers, refused, 1_000_000))
    assert key == MSG.key
    assert first[: len(headers)] == headers
    assert header_text(first, H_VALUE_OMITTED) == (
        f"MSG_SIZE_TOO_LARGE: {record_size(MSG.key, MSG.value, headers)} bytes (test: 10)"
    )
    assert record_size(MSG.key, MSG.value, headers) > 50_000
    assert key2 is None, "the last resort drops the key"
    assert [k for k, _ in smallest] == [*FAILURE_HEADERS, H_VALUE_OMITTED, H_KEY_OMITTED, H_HEADERS_OMITTED]
    assert header_text(smallest, H_KEY_OMITTED) == "MSG_SIZE_TOO_LARGE: key of 10 bytes"
    assert header_text(smallest, H_HEADERS_OMITTED) == "MSG_SIZE_TOO_LARGE: 2 original headers"


def test_a_key_too_large_for_the_producer_is_omitted_from_the_first_reference() -> None:
    msg = MSG._replace(key=b"k" * 20_000)
    headers = failure_headers(msg, PermanentError("x"), "g", "w")
    [(key, first), *_] = references(msg, headers, error(KafkaError.MSG_SIZE_TOO_LARGE), 10_000)
    assert key is None
    assert header_text(first, H_KEY_OMITTED) == "MSG_SIZE_TOO_LARGE: key of 20000 bytes"
    assert ("message-id", b"9") in first, "the original headers still fit"


def test_a_record_without_key_or_headers_has_one_reference() -> None:
    msg = MSG._replace(key=None, headers=())
    headers = failure_headers(msg, PermanentError("x"), "g", "w")
    assert len(list(references(msg, headers, error(KafkaError.INVALID_RECORD), 1_000_000))) == 1


# --- KafkaDeadLetterSink.park ------------------------------------------------------------------------


def test_a_record_the_broker_refuses_for_its_size_is_parked_as_a_reference() -> None:
    producer = FakeProducer([error(KafkaError.MSG_SIZE_TOO_LARGE), None])
    park(sink_over(producer))
    [(_, _, value, headers), (topic, key, ref_value, ref_headers)] = producer.written
    assert value == MSG.value, "the record itself was tried first"
    assert (topic, key, ref_value) == ("orders.dlq", MSG.key, None)
    got = texts(ref_headers)
    assert (got[H_TOPIC], got[H_PARTITION], got[H_OFFSET]) == ("orders", "2", "1234")
    assert (got[H_VALUE_OMITTED] or "").startswith("MSG_SIZE_TOO_LARGE: ")
    assert texts(headers).items() <= got.items(), "the same failure and original headers"


def test_a_record_over_the_producers_message_max_bytes_is_parked_as_a_reference() -> None:
    producer = FakeProducer([Raise(error(KafkaError.MSG_SIZE_TOO_LARGE)), None])
    park(sink_over(producer))
    [(_, key, value, headers)] = producer.written
    assert (key, value) == (MSG.key, None)
    assert texts(headers)[H_VALUE_OMITTED]


def test_a_reference_refused_for_its_size_is_retried_without_key_and_original_headers() -> None:
    too_large = error(KafkaError.MSG_SIZE_TOO_LARGE)
    producer = FakeProducer([too_large, too_large, None])
    park(sink_over(producer))
    _, _, (_, key, value, headers) = producer.written
    assert (key, value) == (None, None)
    assert "message-id" not in texts(headers)
    assert set(texts(headers)) == {*FAILURE_HEADERS, *REFERENCE_HEADERS}


def test_a_record_whose_references_are_all_refused_is_rejected_naming_topic_record_and_reason() -> None:
    too_large = error(KafkaError.MSG_SIZE_TOO_LARGE)
    producer = FakeProducer([too_large, too_large, too_large])
    with pytest.raises(DeadLetterRejectedError) as caught:
        park(sink_over(producer))
    text = str(caught.value)
    assert "'orders.dlq'" in text
    assert "orders[2]@1234" in text
    assert "test: 10" in text
    assert (caught.value.topic, caught.value.partition, caught.value.offset) == ("orders", 2, 1234)


@pytest.mark.parametrize("code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.TOPIC_EXCEPTION])
def test_a_permanent_refusal_of_the_topic_rejects_at_once_without_a_reference(code: int) -> None:
    producer = FakeProducer([error(code)])
    with pytest.raises(DeadLetterRejectedError, match=r"'orders\.dlq' refuses orders\[2\]@1234") as caught:
        park(sink_over(producer))
    assert error(code).name() in str(caught.value)
    assert SECRET not in str(caught.value)
    assert len(producer.written) == 1


def test_a_reference_refused_by_authorization_is_rejected() -> None:
    producer = FakeProducer(
        [error(KafkaError.MSG_SIZE_TOO_LARGE), error(KafkaError.TOPIC_AUTHORIZATION_FAILED)]
    )
    with pytest.raises(DeadLetterRejectedError, match="TOPIC_AUTHORIZATION_FAILED"):
        park(sink_over(producer))


@pytest.mark.parametrize(
    "verdict",
    [
        error(KafkaError._MSG_TIMED_OUT),
        error(KafkaError.NOT_ENOUGH_REPLICAS),
        Raise(error(KafkaError._QUEUE_FULL)),
    ],
)
def test_a_transient_failure_stays_unavailable_and_parks_no_reference(verdict: KafkaError | Raise) -> None:
    producer = FakeProducer([verdict])
    with pytest.raises(DeadLetterUnavailableError, match=r"orders\.dlq") as caught:
        park(sink_over(producer))
    assert SECRET not in str(caught.value)
    assert len(producer.written) <= 1


def test_a_transient_failure_of_the_reference_stays_unavailable() -> None:
    producer = FakeProducer([error(KafkaError.MSG_SIZE_TOO_LARGE), error(KafkaError._MSG_TIMED_OUT)])
    with pytest.raises(DeadLetterUnavailableError):
        park(sink_over(producer))


def test_a_fatal_producer_error_replaces_the_producer_and_the_retry_uses_the_new_one() -> None:
    broken = FakeProducer([error(KafkaError._FATAL, fatal=True)])
    fresh = FakeProducer([None])
    sink = sink_over(broken, fresh)
    with pytest.raises(DeadLetterUnavailableError, match="new producer"):
        park(sink)
    assert broken.closed
    park(sink)
    [(_, key, value, _)] = fresh.written
    assert (key, value) == (MSG.key, MSG.value)


def test_an_acknowledged_record_is_written_once_with_its_bytes() -> None:
    producer = FakeProducer([None])
    park(sink_over(producer))
    [(topic, key, value, headers)] = producer.written
    assert (topic, key, value) == ("orders.dlq", MSG.key, MSG.value)
    assert not set(texts(headers)) & set(REFERENCE_HEADERS)


def test_a_parked_reference_parked_again_does_not_carry_the_old_omission_headers() -> None:
    reference = MSG._replace(headers=((*MSG.headers, (H_VALUE_OMITTED, b"MSG_SIZE_TOO_LARGE: 1 bytes"))))
    assert H_VALUE_OMITTED not in texts(list(failure_headers(reference, PermanentError("x"), "g", "w")))


# --- replay: the pure parts ---------------------------------------------------------------------------


def test_replay_headers_drop_the_omission_headers() -> None:
    headers = (*MSG.headers, (H_VALUE_OMITTED, b"x"), (H_KEY_OMITTED, b"y"), (H_HEADERS_OMITTED, b"z"))
    assert [k for k, _ in _replay_headers(headers, "orders.dlq/0/1")] == [
        "message-id",
        "trace",
        "streamer.replayed_from",
    ]


def test_replay_summary_names_every_reference_whose_original_is_gone() -> None:
    summary = ReplaySummary("orders.dlq", dry_run=True, read=3, matched=3, resolved=1)
    summary.destinations["orders"] = 2
    summary.missing.append("orders.dlq/0/2 -> orders[1]@7: gone from the source topic")
    lines = summary.lines()
    assert lines[0].startswith("dry run: read 3, matched 3, would replay 2, skipped 0")
    assert "  would replay 1 parked references with their original bytes from the source" in lines
    assert "  NOT replayed 1 parked references: the original record is gone" in lines
    assert "    orders.dlq/0/2 -> orders[1]@7: gone from the source topic" in lines

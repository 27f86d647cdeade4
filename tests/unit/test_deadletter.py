"""Dead-letter headers, the in-memory sink, the Kafka sink when the broker cannot be reached, and
the pure parts of ``streamer dlq replay`` (filters, headers it writes, its summary)."""

from __future__ import annotations

import time

import pytest

from streamer import Message, PermanentError, RetryableError
from streamer.deadletter import (
    FAILURE_HEADERS,
    H_ATTEMPTS,
    H_ERROR_MESSAGE,
    H_ERROR_TYPE,
    H_FAILED_AT,
    H_GROUP,
    H_OFFSET,
    H_PARTITION,
    H_TIMESTAMP,
    H_TOPIC,
    H_WORKER,
    DeadLetterSink,
    DeadLetterUnavailableError,
    KafkaDeadLetterSink,
    MemoryDeadLetterSink,
    failure_headers,
    header_text,
)
from streamer.errors import ConfigError
from streamer.replay import H_REPLAYED_FROM, ReplayFilter, ReplaySummary, _replay_headers

MSG = Message(
    "orders",
    2,
    1234,
    b"customer-9",
    b'{"id": 9}',
    (("message-id", b"9"), ("trace", None), ("message-id", b"9-dup")),
    1_700_000_000_123,
    attempt=3,
)


def as_dict(headers: tuple[tuple[str, bytes | None], ...]) -> dict[str, str | None]:
    return {k: None if v is None else v.decode() for k, v in headers}


def permanent_from(cause: Exception) -> PermanentError:
    """A PermanentError raised ``from cause``, as the retry middleware raises it."""
    error = PermanentError(f"{type(cause).__name__}: {cause}")
    error.__cause__ = cause
    return error


# --- failure_headers ------------------------------------------------------------------------------


def test_failure_headers_describe_the_failure() -> None:
    before = time.time()
    headers = failure_headers(MSG, permanent_from(ValueError("bad amount")), "billing", "host-1-abc")
    added = as_dict(headers[len(MSG.headers) :])
    assert list(added) == list(FAILURE_HEADERS)
    assert added[H_ERROR_TYPE] == "builtins.ValueError", "the type is the cause's, not PermanentError"
    assert added[H_ERROR_MESSAGE] == "ValueError: bad amount"
    assert added[H_TOPIC] == "orders"
    assert added[H_PARTITION] == "2"
    assert added[H_OFFSET] == "1234"
    assert added[H_TIMESTAMP] == "1700000000123"
    assert added[H_ATTEMPTS] == "3"
    assert added[H_GROUP] == "billing"
    assert added[H_WORKER] == "host-1-abc"
    assert before - 1 <= float(added[H_FAILED_AT] or 0) <= time.time() + 1


def test_failure_headers_keep_the_original_headers_first_in_order() -> None:
    headers = failure_headers(MSG, PermanentError("x"), "g", "w")
    assert headers[: len(MSG.headers)] == MSG.headers
    assert all(isinstance(v, bytes) for _, v in headers[len(MSG.headers) :])


def test_an_error_without_a_cause_names_its_own_type() -> None:
    headers = as_dict(failure_headers(MSG, RetryableError("503"), "g", "w"))
    assert headers[H_ERROR_TYPE] == "streamer.errors.RetryableError"
    assert headers[H_ERROR_MESSAGE] == "503"


def test_a_nested_class_is_named_by_its_qualified_name() -> None:
    class Inner(Exception):
        pass

    headers = as_dict(failure_headers(MSG, Inner("x"), "g", "w"))
    assert (
        headers[H_ERROR_TYPE]
        == f"{__name__}.test_a_nested_class_is_named_by_its_qualified_name.<locals>.Inner"
    )


def test_a_long_error_message_is_truncated() -> None:
    headers = as_dict(failure_headers(MSG, PermanentError("x" * 10_000), "g", "w"))
    assert headers[H_ERROR_MESSAGE] == "x" * 2000


def test_a_missing_timestamp_is_an_empty_header() -> None:
    headers = as_dict(failure_headers(MSG._replace(timestamp=None), PermanentError("x"), "g", "w"))
    assert headers[H_TIMESTAMP] == ""


def test_a_record_parked_again_carries_only_the_latest_failure_headers() -> None:
    first = failure_headers(MSG, PermanentError("first"), "g", "w1")
    again = failure_headers(MSG._replace(headers=first, attempt=1), PermanentError("second"), "g", "w2")
    names = [k for k, _ in again]
    for name in FAILURE_HEADERS:
        assert names.count(name) == 1, f"{name} appears {names.count(name)} times"
    assert header_text(again, H_ERROR_MESSAGE) == "second"
    assert header_text(again, H_WORKER) == "w2"
    assert [h for h in again if h[0] not in FAILURE_HEADERS] == list(MSG.headers)


def test_header_text_takes_the_last_value_and_decodes_it() -> None:
    assert header_text(MSG.headers, "message-id") == "9-dup"
    assert header_text(MSG.headers, "trace") is None
    assert header_text(MSG.headers, "absent") is None
    assert header_text((("h", b"\xff"),), "h") == "\ufffd"


# --- sinks ----------------------------------------------------------------------------------------


def test_memory_sink_keeps_what_was_parked_with_its_headers() -> None:
    sink: DeadLetterSink = MemoryDeadLetterSink()
    error = permanent_from(KeyError("sku"))
    sink.park(MSG, error, "orders.dlq", "billing", "w-1")
    sink.park(MSG._replace(offset=1235), RetryableError("x"), "orders.dlq", "billing", "w-1")
    assert isinstance(sink, MemoryDeadLetterSink)
    assert [(topic, msg.offset) for topic, msg, _ in sink.parked] == [
        ("orders.dlq", 1234),
        ("orders.dlq", 1235),
    ]
    _, msg, headers = sink.parked[0]
    assert msg == MSG, "the record is kept as it was: key, value, headers"
    expected = as_dict(failure_headers(MSG, error, "billing", "w-1"))
    got = as_dict(headers)
    assert got.pop(H_FAILED_AT)
    assert expected.pop(H_FAILED_AT)
    assert got == expected


def test_kafka_sink_raises_unavailable_when_nothing_acknowledges_within_the_timeout() -> None:
    sink = KafkaDeadLetterSink({"bootstrap.servers": "127.0.0.1:1", "log_level": 0}, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DeadLetterUnavailableError, match=r"orders\.dlq"):
        sink.park(MSG, PermanentError("x"), "orders.dlq", "g", "w")
    assert time.monotonic() - started < 5.0


# --- replay: the pure parts -----------------------------------------------------------------------


def parked(error_type: str | None) -> tuple[tuple[str, bytes | None], ...]:
    headers = failure_headers(MSG, PermanentError("x"), "g", "w")
    if error_type is None:
        return tuple(h for h in headers if h[0] != H_ERROR_TYPE)
    return tuple((k, error_type.encode() if k == H_ERROR_TYPE else v) for k, v in headers)


def test_replay_headers_drop_failure_headers_keep_the_rest_and_say_where_from() -> None:
    headers = _replay_headers(parked("builtins.ValueError"), "orders.dlq/0/17")
    assert headers == [*MSG.headers, (H_REPLAYED_FROM, b"orders.dlq/0/17")]


def test_replay_headers_replace_an_earlier_replay_mark() -> None:
    once = _replay_headers(parked("builtins.ValueError"), "orders.dlq/0/17")
    twice = _replay_headers((*once, *parked("x")[len(MSG.headers) :]), "orders.dlq/1/3")
    assert [v for k, v in twice if k == H_REPLAYED_FROM] == [b"orders.dlq/1/3"]
    assert [h for h in twice if h[0] != H_REPLAYED_FROM] == list(MSG.headers)


def test_replay_filter_matches_error_type_substrings() -> None:
    assert ReplayFilter().matches(parked("builtins.ValueError"))
    assert ReplayFilter().matches(parked(None))
    assert ReplayFilter(error_type="ValueError").matches(parked("builtins.ValueError"))
    assert ReplayFilter(error_type="builtins.").matches(parked("builtins.ValueError"))
    assert not ReplayFilter(error_type="ValueError").matches(parked("streamer.errors.RetryableError"))
    assert not ReplayFilter(error_type="ValueError").matches(parked(None))
    assert not ReplayFilter(error_type="valueerror").matches(parked("builtins.ValueError"))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"partition": -1}, "--partition"),
        ({"from_offset": -5}, "--from-offset"),
        ({"to_offset": -1}, "--to-offset"),
        ({"limit": 0}, "--limit"),
        ({"from_offset": 10, "to_offset": 9}, "past --to-offset"),
    ],
)
def test_replay_filter_rejects_nonsense(kwargs: dict[str, int], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        ReplayFilter(**kwargs)


def test_replay_summary_lines() -> None:
    summary = ReplaySummary("orders.dlq", dry_run=False, read=5, matched=3, replayed=2, skipped=1)
    summary.destinations["orders"] = 2
    summary.ends = {0: 4, 1: 1}
    lines = summary.lines()
    assert (
        lines[0]
        == "read 5, matched 3, replayed 2, skipped 1 from orders.dlq (up to end offsets {0: 4, 1: 1})"
    )
    assert "  replayed 2 to orders" in lines
    assert any("--to TOPIC" in line for line in lines)


def test_replay_summary_of_a_dry_run_says_what_would_happen() -> None:
    summary = ReplaySummary("orders.dlq", dry_run=True, read=5, matched=3)
    summary.destinations["orders"] = 3
    assert summary.lines()[0].startswith("dry run: read 5, matched 3, would replay 3, skipped 0")

"""The public API: what ``import streamer`` exports, and the Message handlers receive."""

from __future__ import annotations

import pytest

import streamer
from streamer import Message

PUBLIC_API = [
    "App",
    "BatchFailed",
    "BatchHandler",
    "ConfigError",
    "DropRecord",
    "Handler",
    "HandlerSignal",
    "Message",
    "Middleware",
    "PermanentError",
    "Record",
    "RecordFailed",
    "RetryableError",
    "Settings",
    "StreamerError",
    "load_settings",
]


def test_public_api_is_exactly_the_pinned_names() -> None:
    # Adding to the public API is a decision: update this list in the same change.
    assert streamer.__all__ == PUBLIC_API


def test_public_api_is_sorted() -> None:
    assert streamer.__all__ == sorted(streamer.__all__)


@pytest.mark.parametrize("name", PUBLIC_API)
def test_every_public_name_is_importable(name: str) -> None:
    assert getattr(streamer, name) is not None


def test_star_import_gives_exactly_the_public_api() -> None:
    namespace: dict[str, object] = {}
    exec("from streamer import *", namespace)  # noqa: S102 - a constant string
    assert sorted(name for name in namespace if name != "__builtins__") == PUBLIC_API


# --- Message --------------------------------------------------------------------------------------


def test_message_is_immutable() -> None:
    msg = Message("orders", 0, 7, b"k", b"v")
    with pytest.raises(AttributeError):
        msg.value = b"other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        msg.extra = 1  # type: ignore[attr-defined]
    assert msg.value == b"v"


def test_message_defaults_to_no_headers_and_no_timestamp() -> None:
    msg = Message("orders", 0, 7, None, None)
    assert msg.headers == ()
    assert msg.timestamp is None


def test_header_returns_the_last_value_of_a_repeated_header() -> None:
    msg = Message("orders", 0, 7, None, None, (("id", b"first"), ("trace", b"t"), ("id", b"last")))
    assert msg.header("id") == b"last"
    assert msg.header("trace") == b"t"


def test_header_returns_none_when_absent() -> None:
    assert Message("orders", 0, 7, None, None, (("id", b"1"),)).header("missing") is None
    assert Message("orders", 0, 7, None, None).header("id") is None


def test_header_is_case_sensitive() -> None:
    assert Message("orders", 0, 7, None, None, (("ID", b"1"),)).header("id") is None


def test_header_with_a_null_value_returns_none() -> None:
    assert Message("orders", 0, 7, None, None, (("id", b"1"), ("id", None))).header("id") is None

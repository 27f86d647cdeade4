"""Unit tests of the test harness itself."""

from __future__ import annotations

import itertools

import pytest

from tests.support import wait_for


def test_wait_for_returns_first_truthy_value() -> None:
    """wait_for polls until the predicate turns truthy and returns what it returned."""
    calls = itertools.count(1)
    result = wait_for(lambda: next(calls) >= 3 and "ready", timeout=5, interval=0)
    assert result == "ready"
    assert next(calls) == 4  # polled exactly three times


def test_wait_for_raises_with_message_at_deadline() -> None:
    """On timeout wait_for raises AssertionError carrying the (possibly computed) message."""
    with pytest.raises(AssertionError, match=r"never ready \(waited 0.01s\)"):
        wait_for(lambda: False, timeout=0.01, interval=0.001, message="never ready")
    with pytest.raises(AssertionError, match="state was 42"):
        wait_for(lambda: None, timeout=0, message=lambda: "state was 42")


def test_wait_for_propagates_predicate_errors() -> None:
    """An exception in the predicate is not swallowed as 'not yet'."""

    def broken() -> bool:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        wait_for(broken, timeout=5)

"""Shared test harness: waiting on conditions, Kafka and Redis helpers.

Everything here is plain functions so that subprocess scripts started by tests can import it
(``from tests.support.kafka import produce_records``) with the repository root on ``sys.path``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition was not met",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    The predicate is always evaluated at least once, and once more at the deadline. On timeout an
    AssertionError carries ``message`` (called if it is a callable, so it can describe the state
    at that moment) and the time waited. Exceptions from the predicate propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    text = message() if callable(message) else message
    raise AssertionError(f"{text} (waited {timeout:g}s)")

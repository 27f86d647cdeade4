"""A worker app that fails on chosen records, for the failure-handling tests.

Configured by environment variables, read at import time:

``FAILING_TOPIC``
    the topic to consume (required).
``FAILING_EFFECTS``
    the effects file: one line ``"partition offset id attempt\\n"`` per record handled
    successfully, appended with ``os.write`` on an ``O_APPEND`` descriptor.
``FAILING_ATTEMPTS``
    optional: one line ``"partition offset id attempt unix_time\\n"`` per attempt, written on
    entry to the handler whatever its outcome, so a test can see retries and their timing.
``FAILING_PERMANENT_IDS``
    ids (comma-separated) whose handler raises ``ValueError``: not retryable, parked at once.
``FAILING_RETRY_IDS``
    ``id:K`` pairs (comma-separated): the handler raises ``RetryableError`` on the first K
    attempts of that id, then succeeds.
``FAILING_SLEEP_IDS``
    ``id:S`` pairs (comma-separated): the handler sleeps S seconds (a float) before its effect.
``FAILING_EXPECT_JSON``
    ``1``: the topic has the json decoder; the handler checks ``msg.decoded["id"]`` is the id.

The record id is the ``message-id`` header set by ``tests.support.kafka.produce_records`` (-1 if
absent).
"""

from __future__ import annotations

import os
import time

from streamer import App, Message, RetryableError

TOPIC = os.environ["FAILING_TOPIC"]
_EFFECTS = os.environ.get("FAILING_EFFECTS", "")
_ATTEMPTS = os.environ.get("FAILING_ATTEMPTS") or None
_EXPECT_JSON = os.environ.get("FAILING_EXPECT_JSON", "") == "1"


def _ids(name: str) -> set[int]:
    return {int(part) for part in os.environ.get(name, "").split(",") if part.strip()}


def _pairs(name: str) -> dict[int, float]:
    pairs = {}
    for part in os.environ.get(name, "").split(","):
        if part.strip():
            record, _, value = part.partition(":")
            pairs[int(record)] = float(value)
    return pairs


_PERMANENT = _ids("FAILING_PERMANENT_IDS")
_RETRY = {record: int(k) for record, k in _pairs("FAILING_RETRY_IDS").items()}
_SLEEP = _pairs("FAILING_SLEEP_IDS")

app = App(name="failing")
_fds: dict[str, int] = {}


def _append(path: str, line: bytes) -> None:
    fd = _fds.get(path)
    if fd is None:
        fd = _fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)


@app.handler(TOPIC)
def handle(msg: Message) -> None:
    """Fail, sleep or succeed as configured; on success append the effect line."""
    header = msg.header("message-id")
    record_id = int(header) if header is not None else -1
    if _ATTEMPTS is not None:
        _append(
            _ATTEMPTS,
            b"%d %d %d %d %.6f\n" % (msg.partition, msg.offset, record_id, msg.attempt, time.time()),
        )
    if record_id in _PERMANENT:
        raise ValueError(f"injected permanent failure on id {record_id}")
    if msg.attempt <= _RETRY.get(record_id, 0):
        raise RetryableError(f"injected transient failure on id {record_id}, attempt {msg.attempt}")
    if record_id in _SLEEP:
        time.sleep(_SLEEP[record_id])  # the handler's simulated slow work, not a test wait
    if _EXPECT_JSON and (not isinstance(msg.decoded, dict) or msg.decoded.get("id") != record_id):
        raise AssertionError(f"decoded value {msg.decoded!r} does not carry id {record_id}")
    _append(_EFFECTS, b"%d %d %d %d\n" % (msg.partition, msg.offset, record_id, msg.attempt))

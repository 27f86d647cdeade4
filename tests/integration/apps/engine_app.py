"""A worker app with knobs for the engine regression tests: slow records, held records, failures.

Configured by environment variables, read at import time:

``ENGINE_TOPIC``
    the topic to consume (required).
``ENGINE_EFFECTS``
    the effects file: one line ``"partition offset id attempt start end pid\\n"`` per record
    handled successfully, written when the handler returns (``start`` and ``end`` are
    ``time.time()`` on entry and exit, so intervals of different processes compare), appended
    with ``os.write`` on an ``O_APPEND`` descriptor: a line written survives a SIGKILL.
``ENGINE_ATTEMPTS``
    optional: one line ``"partition offset id attempt start pid\\n"`` on every entry into the
    handler, whatever its outcome, so a test sees a chain begin (a held record, a retry).
``ENGINE_SLEEP_MS``
    sleep this many milliseconds in every handler call (default 0): the handler's work.
``ENGINE_HOLD_IDS`` and ``ENGINE_HOLD_FILE``
    ids (comma-separated) whose handler keeps running while the file ``ENGINE_HOLD_FILE``
    exists: a test lets the chain end by deleting the file.
``ENGINE_FAIL_IDS``
    ``id:K`` pairs (comma-separated): the first K calls of this process for that id raise
    ``RetryableError`` (after the hold), whatever ``msg.attempt`` says, so a record re-read
    after a rebalance counts on.
``ENGINE_PARENT_PID``
    the test process that started this worker: on Linux the worker is SIGKILLed when it dies,
    so that a test run killed before its teardown leaves no worker behind.

The record id is the ``message-id`` header set by ``tests.support.kafka.produce_records`` (-1 if
absent).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections import Counter

from streamer import App, Message, RetryableError

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


if os.environ.get("ENGINE_PARENT_PID"):
    _die_with_parent(int(os.environ["ENGINE_PARENT_PID"]))


def _ids(name: str) -> set[int]:
    return {int(part) for part in os.environ.get(name, "").split(",") if part.strip()}


def _pairs(name: str) -> dict[int, int]:
    pairs = {}
    for part in os.environ.get(name, "").split(","):
        if part.strip():
            record, _, value = part.partition(":")
            pairs[int(record)] = int(value)
    return pairs


TOPIC = os.environ["ENGINE_TOPIC"]
_EFFECTS = os.environ["ENGINE_EFFECTS"]
_ATTEMPTS = os.environ.get("ENGINE_ATTEMPTS") or None
_SLEEP_S = float(os.environ.get("ENGINE_SLEEP_MS") or 0) / 1000
_HOLD_IDS = _ids("ENGINE_HOLD_IDS")
_HOLD_FILE = os.environ.get("ENGINE_HOLD_FILE") or None
_FAIL = _pairs("ENGINE_FAIL_IDS")
_PID = os.getpid()

app = App(name="engine")
_fds: dict[str, int] = {}
_calls: Counter[int] = Counter()


def _append(path: str, line: bytes) -> None:
    fd = _fds.get(path)
    if fd is None:
        fd = _fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)


@app.handler(TOPIC)
def handle(msg: Message) -> None:
    """Note the entry, sleep, stay while held, fail as configured, else append the effect line."""
    started = time.time()
    header = msg.header("message-id")
    record = int(header) if header is not None else -1
    if _ATTEMPTS is not None:
        _append(
            _ATTEMPTS,
            b"%d %d %d %d %.6f %d\n" % (msg.partition, msg.offset, record, msg.attempt, started, _PID),
        )
    if _SLEEP_S:
        time.sleep(_SLEEP_S)  # the handler's simulated work, not a test wait
    if record in _HOLD_IDS and _HOLD_FILE is not None:
        while os.path.exists(_HOLD_FILE):  # noqa: PTH110 - a plain check in a loop
            time.sleep(0.01)  # the handler's simulated long work, until the test releases it
    _calls[record] += 1
    if _calls[record] <= _FAIL.get(record, 0):
        raise RetryableError(f"injected transient failure on id {record}, call {_calls[record]}")
    _append(
        _EFFECTS,
        b"%d %d %d %d %.6f %.6f %d\n"
        % (msg.partition, msg.offset, record, msg.attempt, started, time.time(), _PID),
    )

"""The chaos suite's worker app: one effects line per handled record, saying who handled it and when.

Configured by environment variables, read at import time:

``CHAOS_TOPIC``
    the topic to consume (required).
``CHAOS_EFFECTS``
    the effects file (required): one line ``"partition offset id worker monotonic_ns\\n"`` per
    handled record, appended with one ``os.write`` on an ``O_APPEND`` descriptor, so a line
    written survives a SIGKILL right after and lines are never torn.
``CHAOS_WORKER``
    the name of this worker incarnation, written in every line (required).
``CHAOS_SLEEP_US``
    sleep this many microseconds per record before the effect (default 0): the load is slow
    while the nemesis works, so that records are in flight whenever it strikes.
``CHAOS_SLOW_WHILE``
    a path: the sleep applies only while it exists, so a scenario can lift it once the chaos is
    over and let the workers drain the backlog at full speed.
``CHAOS_FAIL_IDS``
    ids (comma-separated) whose handler always raises ``ValueError``: parked at once.
``CHAOS_RETRY_IDS``
    ids (comma-separated) whose handler always raises ``RetryableError``: retried, then parked.
``CHAOS_PARENT_PID``
    the test process: on Linux the worker is SIGKILLed when it dies, so that a test run killed
    before its teardown leaves no worker behind.

The id is the ``message-id`` header (-1 if absent). The timestamp is ``time.monotonic_ns()``:
CLOCK_MONOTONIC is one clock for every process of the machine, so the checker can order the
effects of all workers and compare them with the moments the test stopped or started a service.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

from streamer import App, Message, RetryableError

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


if os.environ.get("CHAOS_PARENT_PID"):
    _die_with_parent(int(os.environ["CHAOS_PARENT_PID"]))


def _ids(name: str) -> frozenset[int]:
    return frozenset(int(part) for part in os.environ.get(name, "").split(",") if part.strip())


TOPIC = os.environ["CHAOS_TOPIC"]
_EFFECTS = os.environ["CHAOS_EFFECTS"]
_WORKER = os.environ["CHAOS_WORKER"].encode()
_SLEEP_S = int(os.environ.get("CHAOS_SLEEP_US") or 0) / 1e6
_SLOW_WHILE = os.environ.get("CHAOS_SLOW_WHILE") or None
_FAIL = _ids("CHAOS_FAIL_IDS")
_RETRY = _ids("CHAOS_RETRY_IDS")

app = App(name="chaos")
_fd: int | None = None


@app.handler(TOPIC)
def record(msg: Message) -> None:
    """Fail if told to, sleep while the load is slow, then append the effect line."""
    global _fd  # noqa: PLW0603 - one descriptor per worker process, opened on first use
    header = msg.header("message-id")
    record_id = int(header) if header is not None else -1
    if record_id in _FAIL:
        raise ValueError(f"injected permanent failure on id {record_id}")
    if record_id in _RETRY:
        raise RetryableError(f"injected transient failure on id {record_id}, attempt {msg.attempt}")
    if _SLEEP_S and (_SLOW_WHILE is None or os.path.exists(_SLOW_WHILE)):  # noqa: PTH110 - hot path
        time.sleep(_SLEEP_S)  # the handler's simulated work, not a test wait
    if _fd is None:
        _fd = os.open(_EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, b"%d %d %d %s %d\n" % (msg.partition, msg.offset, record_id, _WORKER, time.monotonic_ns()))

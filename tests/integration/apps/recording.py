"""A worker app whose side effect is one line per handled record, for crash and rebalance tests.

Configured by environment variables, read at import time (like ``streamer.demo``):

``RECORDING_TOPIC``
    the topic to consume (required).
``RECORDING_EFFECTS``
    the effects file: one line ``"partition offset id\\n"`` per handled record, appended with
    ``os.write`` on an ``O_APPEND`` descriptor, so a line written survives a SIGKILL right after.
``RECORDING_WORK_US``
    busy-wait this many microseconds per record before writing the effect (default 0).
``RECORDING_SLEEP_US``
    sleep this many microseconds per record before writing the effect (default 0); unlike
    ``RECORDING_WORK_US`` it leaves the CPU to the broker and other workers.
``RECORDING_SLOW_WHILE``
    a path: the work and sleep above apply only while it exists, so that a test can keep the
    load slow while workers join and leave, then delete it to let them finish at full speed.
``RECORDING_FAIL_ID``
    raise ``RuntimeError`` on the record with this id, before writing its effect.
``RECORDING_PARENT_PID``
    the test process that started this worker: on Linux the worker is SIGKILLed when it dies,
    so that a test run killed before its teardown leaves no worker behind.

The record id is the ``message-id`` header set by ``tests.support.kafka.produce_records``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

from streamer import App, Message

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


if os.environ.get("RECORDING_PARENT_PID"):
    _die_with_parent(int(os.environ["RECORDING_PARENT_PID"]))

TOPIC = os.environ["RECORDING_TOPIC"]
_EFFECTS = os.environ.get("RECORDING_EFFECTS", "")
_WORK_S = int(os.environ.get("RECORDING_WORK_US") or 0) / 1e6
_SLEEP_S = int(os.environ.get("RECORDING_SLEEP_US") or 0) / 1e6
_SLOW_WHILE = os.environ.get("RECORDING_SLOW_WHILE") or None
_FAIL_ID = int(os.environ["RECORDING_FAIL_ID"]) if os.environ.get("RECORDING_FAIL_ID") else None

app = App(name="recording")
_fd: int | None = None


class InjectedFailure(RuntimeError):
    """The failure ``RECORDING_FAIL_ID`` asks for."""


@app.handler(TOPIC)
def record(msg: Message) -> None:
    """Do the configured work, then append ``partition offset id`` to the effects file."""
    global _fd  # noqa: PLW0603 - one descriptor per worker process, opened on first use
    header = msg.header("message-id")
    record_id = int(header) if header is not None else -1
    slow = _SLOW_WHILE is None or os.path.exists(_SLOW_WHILE)  # noqa: PTH110 - hot path, no Path object
    if _WORK_S and slow:
        deadline = time.perf_counter() + _WORK_S
        while time.perf_counter() < deadline:
            pass
    if _SLEEP_S and slow:
        time.sleep(_SLEEP_S)  # the handler's simulated work, not a test wait
    if record_id == _FAIL_ID:
        raise InjectedFailure(f"injected failure on id {record_id}")
    if _fd is None:
        _fd = os.open(_EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, b"%d %d %d\n" % (msg.partition, msg.offset, record_id))

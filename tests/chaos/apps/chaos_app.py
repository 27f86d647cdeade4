"""The chaos suite's worker app: one effects line per handled record, saying who handled it and when.

Configured by environment variables, read at import time:

``CHAOS_TOPIC``
    the topic to consume (required).
``CHAOS_EFFECTS``
    the effects file (required): one line ``"partition offset id worker monotonic_ns started_ns
    key\\n"`` per handled record (``monotonic_ns`` when the effect was written, ``started_ns`` when
    the handler was entered, ``key`` the record's Kafka key in ASCII or ``-``), appended with one
    ``os.write`` on an ``O_APPEND`` descriptor, so a line written survives a SIGKILL right after
    and lines are never torn.
``CHAOS_WORKER``
    the name of this worker incarnation, written in every line (required).
``CHAOS_SLEEP_US``
    sleep this many microseconds per record before the effect (default 0): the load is slow
    while the nemesis works, so that records are in flight whenever it strikes.
``CHAOS_SLEEP_JITTER``
    ``1``: each record sleeps between 0.5 and 1.5 times ``CHAOS_SLEEP_US`` instead (a fraction
    drawn from its id, so a re-read record sleeps as long): records running at once finish in
    another order than they started, as real work does.
``CHAOS_ASYNC``
    ``1``: the handler is ``async def`` (it awaits ``asyncio.sleep``), for concurrent dispatch
    on the worker's event loop; otherwise a ``def`` handler (``time.sleep``).
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

import asyncio
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
_JITTER = os.environ.get("CHAOS_SLEEP_JITTER") == "1"
_ASYNC = os.environ.get("CHAOS_ASYNC") == "1"
_SLOW_WHILE = os.environ.get("CHAOS_SLOW_WHILE") or None
_FAIL = _ids("CHAOS_FAIL_IDS")
_RETRY = _ids("CHAOS_RETRY_IDS")

app = App(name="chaos")
_fd: int | None = None


def _start(msg: Message) -> tuple[int, float]:
    """The record's id and how long it sleeps (0: not slow now); raise the injected failures."""
    header = msg.header("message-id")
    record_id = int(header) if header is not None else -1
    if record_id in _FAIL:
        raise ValueError(f"injected permanent failure on id {record_id}")
    if record_id in _RETRY:
        raise RetryableError(f"injected transient failure on id {record_id}, attempt {msg.attempt}")
    if not _SLEEP_S or (_SLOW_WHILE is not None and not os.path.exists(_SLOW_WHILE)):  # noqa: PTH110 - hot path
        return record_id, 0.0
    if not _JITTER:
        return record_id, _SLEEP_S
    fraction = (record_id * 2654435761 % 2**32) / 2**32  # Knuth's multiplicative hash of the id
    return record_id, _SLEEP_S * (0.5 + fraction)


def _effect(msg: Message, record_id: int, started_ns: int) -> None:
    """Append the effect line."""
    global _fd  # noqa: PLW0603 - one descriptor per worker process, opened on first use
    if _fd is None:
        _fd = os.open(_EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    key = msg.key if msg.key else b"-"
    os.write(
        _fd,
        b"%d %d %d %s %d %d %s\n"
        % (msg.partition, msg.offset, record_id, _WORKER, time.monotonic_ns(), started_ns, key),
    )


if _ASYNC:

    @app.handler(TOPIC)
    async def record_async(msg: Message) -> None:
        """Fail if told to, await the simulated work while the load is slow, append the effect line."""
        started_ns = time.monotonic_ns()
        record_id, sleep_s = _start(msg)
        if sleep_s:
            await asyncio.sleep(sleep_s)  # the handler's simulated work, not a test wait
        _effect(msg, record_id, started_ns)

else:

    @app.handler(TOPIC)
    def record(msg: Message) -> None:
        """Fail if told to, sleep while the load is slow, then append the effect line."""
        started_ns = time.monotonic_ns()
        record_id, sleep_s = _start(msg)
        if sleep_s:
            time.sleep(sleep_s)  # the handler's simulated work, not a test wait
        _effect(msg, record_id, started_ns)

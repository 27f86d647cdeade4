"""The concurrency tests' app: a handler that waits a while and writes when it starts and ends.

One app, two ways to run it:

- ``streamer run tests.support.concurrency_app:app``: a real worker process, configured by the
  ``CONC_*`` environment variables below (read when ``app`` is first looked up, so that importing
  this module in the test process needs none of them);
- ``build_app(topic, Behaviour(...))`` in the test process, for a ``streamer.engine.loop.Worker``
  run in a thread.

Every entry into the handler and every exit from it appends one line to the events file::

    KIND partition offset id key attempt time pid thread

``KIND`` is ``S`` (the chain entered the handler), ``E`` (it returned: the record is handled) or
``F`` (it raised: the attempt failed). ``key`` is the Kafka key (ASCII, ``-`` when absent),
``time`` is ``time.time()``, ``thread`` the handler thread's ``name/ident``. Each line is one ``os.write``
on an ``O_APPEND`` descriptor: it survives a SIGKILL right after, lines are never torn, and the
order of the lines of one process is the order of its events (for a sync handler on a thread
pool too: a line is written before the work starts and after it ends).

Environment (``CONC_TOPIC`` and ``CONC_EVENTS`` are required):

``CONC_TOPIC``, ``CONC_EVENTS``
    the topic to consume and the events file.
``CONC_DELAY_MS`` and ``CONC_SEED``
    ``LO,HI``: each record waits a uniformly random LO..HI milliseconds, drawn from a generator
    seeded with the seed and the record's id (a record re-read after a crash waits as long).
``CONC_SLOW_WHILE``
    a path: the delay applies only while this file exists.
``CONC_HOLD_KEY`` and ``CONC_HOLD_FILE``
    records with this key stay in the handler while the file exists.
``CONC_FAIL_IDS``
    ``id:K`` pairs (comma-separated): the first K calls of this process for that id raise
    ``RetryableError``.
``CONC_SYNC``
    ``1``: a ``def`` handler (it sleeps) instead of an ``async def`` one (it awaits).
``CONC_PARENT_PID``
    the test process: on Linux the worker is SIGKILLed when it dies.

The record id is the ``message-id`` header of ``tests.support.kafka.produce_records`` (-1 if
absent).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from streamer import App, Message, RetryableError

__all__ = ["Behaviour", "Event", "build_app", "read_events"]

_PR_SET_PDEATHSIG = 1
#: Seconds between looks at a hold or slow file from inside the handler.
_LOOK_S = 0.01


Kind = Literal["S", "E", "F"]


@dataclass(frozen=True, slots=True)
class Event:
    """One line of an events file."""

    kind: Kind
    partition: int
    offset: int
    id: int
    key: str
    attempt: int
    time: float
    pid: int
    thread: str


def read_events(path: Path) -> list[Event]:
    """Every complete line of an events file, in the order written ([] if it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    events = []
    for line in data.decode().split("\n")[:-1]:  # a line is complete once its newline is written
        kind, partition, offset, record, key, attempt, when, pid, thread = line.split()
        assert kind in ("S", "E", "F"), f"{path}: unexpected line {line!r}"
        fields = int(partition), int(offset), int(record), key, int(attempt), float(when), int(pid), thread
        events.append(Event(cast(Kind, kind), *fields))
    return events


@dataclass(frozen=True)
class Behaviour:
    """What the handler does besides writing its events (see the module's docstring)."""

    events: Path
    delay_ms: tuple[float, float] = (0.0, 0.0)
    seed: int = 0
    slow_while: Path | None = None
    hold_key: str | None = None
    hold_file: Path | None = None
    fail: Mapping[int, int] = field(default_factory=dict)
    sync: bool = False

    def env(self, topic: str) -> dict[str, str]:
        """The ``CONC_*`` variables that make a worker process's ``app`` behave like this."""
        return {
            "CONC_TOPIC": topic,
            "CONC_EVENTS": str(self.events),
            "CONC_DELAY_MS": f"{self.delay_ms[0]:g},{self.delay_ms[1]:g}",
            "CONC_SEED": str(self.seed),
            "CONC_SLOW_WHILE": str(self.slow_while or ""),
            "CONC_HOLD_KEY": self.hold_key or "",
            "CONC_HOLD_FILE": str(self.hold_file or ""),
            "CONC_FAIL_IDS": ",".join(f"{record}:{times}" for record, times in self.fail.items()),
            "CONC_SYNC": "1" if self.sync else "",
            "CONC_PARENT_PID": str(os.getpid()),
        }


class _Recorder:
    """The handler's state in one process: the events descriptor and the calls per id."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour
        self.fd = os.open(behaviour.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.calls: Counter[int] = Counter()
        self.pid = os.getpid()

    def write(self, kind: str, msg: Message, record: int, key: str) -> None:
        line = "%s %d %d %d %s %d %.6f %d %s\n" % (  # noqa: UP031 - one cheap format per event
            kind,
            msg.partition,
            msg.offset,
            record,
            key,
            msg.attempt,
            time.time(),
            self.pid,
            "%s/%d" % (threading.current_thread().name.replace(" ", "_"), threading.get_ident()),  # noqa: UP031
        )
        os.write(self.fd, line.encode())

    def begin(self, msg: Message) -> tuple[int, str, float, bool]:
        """Note the entry; return the id, the key, the delay (s) and whether the record is held."""
        header = msg.header("message-id")
        record = int(header) if header is not None else -1
        key = msg.key.decode() if msg.key is not None else "-"
        self.write("S", msg, record, key)
        b = self.b
        lo, hi = b.delay_ms
        delay = random.Random(b.seed * 1_000_003 + record).uniform(lo, hi) / 1000 if hi else 0.0
        if b.slow_while is not None and not b.slow_while.exists():
            delay = 0.0
        held = b.hold_key is not None and key == b.hold_key and b.hold_file is not None
        return record, key, delay, held

    def held(self) -> bool:
        return self.b.hold_file is not None and self.b.hold_file.exists()

    def end(self, msg: Message, record: int, key: str) -> None:
        """Fail as configured (an ``F`` line and RetryableError), else write the ``E`` line."""
        self.calls[record] += 1
        if self.calls[record] <= self.b.fail.get(record, 0):
            self.write("F", msg, record, key)
            raise RetryableError(f"injected transient failure on id {record}, call {self.calls[record]}")
        self.write("E", msg, record, key)


def build_app(topic: str, behaviour: Behaviour) -> App:
    """An App whose handler of ``topic`` behaves as ``behaviour`` says."""
    recorder = _Recorder(behaviour)
    app = App(name="concurrency")

    if behaviour.sync:

        @app.handler(topic)
        def handle_sync(msg: Message) -> None:
            record, key, delay, held = recorder.begin(msg)
            if delay:
                time.sleep(delay)  # the handler's simulated work, not a test wait
            while held and recorder.held():
                time.sleep(_LOOK_S)  # simulated long work, until the test releases it
            recorder.end(msg, record, key)

    else:

        @app.handler(topic)
        async def handle(msg: Message) -> None:
            record, key, delay, held = recorder.begin(msg)
            if delay:
                await asyncio.sleep(delay)  # the handler's simulated work, not a test wait
            while held and recorder.held():
                await asyncio.sleep(_LOOK_S)  # simulated long work, until the test releases it
            recorder.end(msg, record, key)

    return app


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _from_env() -> App:
    env = os.environ
    if env.get("CONC_PARENT_PID"):
        _die_with_parent(int(env["CONC_PARENT_PID"]))
    lo, _, hi = (env.get("CONC_DELAY_MS") or "0,0").partition(",")
    fail = {}
    for part in (env.get("CONC_FAIL_IDS") or "").split(","):
        if part.strip():
            record, _, times = part.partition(":")
            fail[int(record)] = int(times)
    behaviour = Behaviour(
        events=Path(env["CONC_EVENTS"]),
        delay_ms=(float(lo), float(hi or lo)),
        seed=int(env.get("CONC_SEED") or 0),
        slow_while=Path(env["CONC_SLOW_WHILE"]) if env.get("CONC_SLOW_WHILE") else None,
        hold_key=env.get("CONC_HOLD_KEY") or None,
        hold_file=Path(env["CONC_HOLD_FILE"]) if env.get("CONC_HOLD_FILE") else None,
        fail=fail,
        sync=env.get("CONC_SYNC") == "1",
    )
    return build_app(env["CONC_TOPIC"], behaviour)


_app: App | None = None


def __getattr__(name: str) -> Any:
    """``app``: the App the ``CONC_*`` environment describes, built on first use."""
    global _app  # noqa: PLW0603 - one app per worker process
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = _from_env()
    return _app

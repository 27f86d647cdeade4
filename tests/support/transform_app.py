"""The consume-transform-produce tests' app: each input record becomes one output record.

``streamer run tests.support.transform_app:app`` runs it as a real worker process, configured by
the ``TRANSFORM_*`` environment variables below (read when ``app`` is first looked up, so that
importing this module in the test process needs none of them).

The handler of the input topic returns ``Record(out_topic, value=msg.value, key=msg.key)``:
a pass-through, one output per input. streamer copies the input's ``message-id`` header onto
the output, so a reader of the output topic can tell which input each output came from.

Before it returns, the handler appends one line ``partition offset id`` to the effects file (the
format of ``tests.integration.workers.read_effects``): one ``os.write`` on an ``O_APPEND``
descriptor, so a line survives a SIGKILL right after and lines are never torn. A line means the
handler ran for that input, not that its output reached the broker.

Environment (``TRANSFORM_TOPIC``, ``TRANSFORM_OUT`` and ``TRANSFORM_EFFECTS`` are required):

``TRANSFORM_TOPIC``, ``TRANSFORM_OUT``, ``TRANSFORM_EFFECTS``
    the topic to consume, the topic the outputs go to, the effects file.
``TRANSFORM_ASYNC``
    ``1``: an ``async def`` handler (use it with ``[processing] concurrency`` > 1) instead of a
    ``def`` one.
``TRANSFORM_SLEEP_US``
    sleep (or, async, await) this many microseconds per record before emitting: the handler's
    simulated work, which keeps records in flight when a test strikes.
``TRANSFORM_SLOW_WHILE``
    a path: the sleep applies only while it exists, so that a test can keep the load slow while
    it kills and stops workers, then delete it to let the last one finish at full speed.
``TRANSFORM_HOLD_ID`` and ``TRANSFORM_HOLD_FILE``
    the record with this id writes its effects line, then stays in the handler while the file
    exists, and only then returns its output: a test can freeze the worker at a known point.
``TRANSFORM_POISON_IDS``
    comma-separated ids whose records raise ``PermanentError`` (parked in the dead-letter topic
    when it is enabled); no effects line is written for them.
``TRANSFORM_PARENT_PID``
    the test process: on Linux the worker is SIGKILLed when it dies, so that a test run killed
    before its teardown leaves no worker behind.

The record id is the ``message-id`` header of ``tests.support.kafka.produce_records`` (-1 if
absent).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer import App, Message, PermanentError, Record

__all__ = ["Behaviour", "build_app"]

_PR_SET_PDEATHSIG = 1
#: Seconds between looks at the hold file from inside the handler.
_LOOK_S = 0.01


@dataclass(frozen=True)
class Behaviour:
    """What a transform worker does (see the module's docstring); ``env`` describes it to a process."""

    out_topic: str
    effects: Path
    async_handler: bool = False
    sleep_us: int = 0
    slow_while: Path | None = None
    poison: Collection[int] = field(default_factory=frozenset)
    hold_id: int | None = None
    hold_file: Path | None = None

    def env(self, topic: str) -> dict[str, str]:
        """The ``TRANSFORM_*`` variables that make a worker process's ``app`` behave like this."""
        return {
            "TRANSFORM_TOPIC": topic,
            "TRANSFORM_OUT": self.out_topic,
            "TRANSFORM_EFFECTS": str(self.effects),
            "TRANSFORM_ASYNC": "1" if self.async_handler else "",
            "TRANSFORM_SLEEP_US": str(self.sleep_us),
            "TRANSFORM_SLOW_WHILE": str(self.slow_while or ""),
            "TRANSFORM_POISON_IDS": ",".join(str(record) for record in sorted(self.poison)),
            "TRANSFORM_HOLD_ID": "" if self.hold_id is None else str(self.hold_id),
            "TRANSFORM_HOLD_FILE": str(self.hold_file or ""),
            "TRANSFORM_PARENT_PID": str(os.getpid()),
        }


class _Effects:
    """The handler's state in one process: the effects descriptor and what each record does."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.out = behaviour.out_topic
        self.fd = os.open(behaviour.effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.sleep_s = behaviour.sleep_us / 1e6
        self.slow_while = str(behaviour.slow_while) if behaviour.slow_while is not None else None
        self.poison = frozenset(behaviour.poison)
        self.hold_id = behaviour.hold_id if behaviour.hold_file is not None else None
        self.hold_file = behaviour.hold_file

    def delay(self) -> float:
        """Seconds of simulated work for the record in hand."""
        if not self.sleep_s:
            return 0.0
        if self.slow_while is not None and not os.path.exists(self.slow_while):  # noqa: PTH110 - hot path
            return 0.0
        return self.sleep_s

    def note(self, msg: Message) -> bool:
        """Raise for a poison id; else write the effects line; say whether to hold the record."""
        header = msg.header("message-id")
        record = int(header) if header is not None else -1
        if record in self.poison:
            raise PermanentError(f"poison id {record}")
        os.write(self.fd, b"%d %d %d\n" % (msg.partition, msg.offset, record))
        return record == self.hold_id

    def holding(self) -> bool:
        return self.hold_file is not None and self.hold_file.exists()

    def output(self, msg: Message) -> Record:
        """The pass-through output of ``msg``."""
        return Record(self.out, value=msg.value, key=msg.key)


def build_app(topic: str, behaviour: Behaviour) -> App:
    """An App whose handler of ``topic`` transforms as ``behaviour`` says."""
    effects = _Effects(behaviour)
    app = App(name="transform")

    if behaviour.async_handler:

        @app.handler(topic)
        async def transform_async(msg: Message) -> Record:
            delay = effects.delay()
            if delay:
                await asyncio.sleep(delay)  # the handler's simulated work, not a test wait
            if effects.note(msg):
                while effects.holding():
                    await asyncio.sleep(_LOOK_S)  # held until the test deletes the file
            return effects.output(msg)

    else:

        @app.handler(topic)
        def transform(msg: Message) -> Record:
            delay = effects.delay()
            if delay:
                time.sleep(delay)  # the handler's simulated work, not a test wait
            if effects.note(msg):
                while effects.holding():
                    time.sleep(_LOOK_S)  # held until the test deletes the file
            return effects.output(msg)

    return app


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _from_env() -> App:
    env = os.environ
    if env.get("TRANSFORM_PARENT_PID"):
        _die_with_parent(int(env["TRANSFORM_PARENT_PID"]))
    poison = frozenset(
        int(part) for part in (env.get("TRANSFORM_POISON_IDS") or "").split(",") if part.strip()
    )
    behaviour = Behaviour(
        out_topic=env["TRANSFORM_OUT"],
        effects=Path(env["TRANSFORM_EFFECTS"]),
        async_handler=env.get("TRANSFORM_ASYNC") == "1",
        sleep_us=int(env.get("TRANSFORM_SLEEP_US") or 0),
        slow_while=Path(env["TRANSFORM_SLOW_WHILE"]) if env.get("TRANSFORM_SLOW_WHILE") else None,
        poison=poison,
        hold_id=int(env["TRANSFORM_HOLD_ID"]) if env.get("TRANSFORM_HOLD_ID") else None,
        hold_file=Path(env["TRANSFORM_HOLD_FILE"]) if env.get("TRANSFORM_HOLD_FILE") else None,
    )
    return build_app(env["TRANSFORM_TOPIC"], behaviour)


_app: App | None = None


def __getattr__(name: str) -> Any:
    """``app``: the App the ``TRANSFORM_*`` environment describes, built on first use."""
    global _app  # noqa: PLW0603 - one app per worker process
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = _from_env()
    return _app

"""Worker subprocesses for integration tests, and the effects files they write.

A test starts ``streamer run tests.integration.apps.recording:app`` as a real process (so it can
be killed with SIGKILL or stopped with SIGTERM), configured through ``STREAMER_*`` environment
variables, and reads what it handled from its effects file: one line ``partition offset id`` per
handled record (see ``tests/integration/apps/recording.py``).

``WorkerPool`` is a context manager: every process still running when it exits is killed, so a
failing test never leaves a worker behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support import wait_for
from tests.support.kafka import protocol_client

REPO = Path(__file__).resolve().parents[2]
APP = "tests.integration.apps.recording:app"
#: Seconds a worker may take from start to its first handled record (imports, group join).
START_TIMEOUT_S = 30.0
#: Seconds a worker may take to exit after SIGTERM; well inside Kubernetes' 30 s grace period.
STOP_TIMEOUT_S = 15.0


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without any ``STREAMER_*`` / ``RECORDING_*`` setting, plus the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMER_", "RECORDING_"))}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env.update(extra)
    return env


def streamer_command(*args: str) -> list[str]:
    """The ``streamer`` command line, run with this interpreter."""
    return [sys.executable, "-m", "streamer", *args]


# -- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Effect:
    """One handled record, as its effects line tells."""

    partition: int
    offset: int
    id: int


def count_effects(path: Path) -> int:
    """Number of complete lines in an effects file (0 if it does not exist yet)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def read_effects(path: Path) -> list[Effect]:
    """Every complete line of an effects file, in the order written."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]  # a line is complete once its newline is written
    effects = []
    for line in lines:
        partition, offset, record = line.split()
        effects.append(Effect(int(partition), int(offset), int(record)))
    return effects


def id_counts(*runs: Iterable[Effect]) -> Counter[int]:
    """How many times each id was handled over all ``runs``."""
    counts: Counter[int] = Counter()
    for run in runs:
        counts.update(effect.id for effect in run)
    return counts


def offsets_by_partition(effects: Iterable[Effect]) -> dict[int, list[int]]:
    """The offsets handled per partition, in the order handled."""
    result: dict[int, list[int]] = {}
    for effect in effects:
        result.setdefault(effect.partition, []).append(effect.offset)
    return result


def duplicates(counts: Counter[int]) -> dict[int, int]:
    """Ids handled more than once, with their counts."""
    return {record: n for record, n in counts.items() if n > 1}


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Worker:
    """One ``streamer run`` process and the files it writes."""

    name: str
    proc: subprocess.Popen[bytes]
    effects: Path
    log: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.proc.poll() is None

    def handled(self) -> int:
        """Records handled so far (lines in the effects file)."""
        return count_effects(self.effects)

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the worker's stderr, for failure messages."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        """A one-paragraph account of the worker, for failure messages."""
        state = "running" if self.running else f"exited {self.proc.returncode}"
        return f"worker {self.name} ({state}, handled {self.handled()}); stderr tail:\n{self.log_tail()}"

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker if it is still running."""
        if self.running:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit and return its exit code; fail the test after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:g}s: {self.describe()}") from None

    def kill(self) -> None:
        """SIGKILL the worker (if running) and reap it."""
        if self.running:
            self.proc.kill()
        self.proc.wait()

    def wait_handled(self, at_least: int, timeout: float = START_TIMEOUT_S) -> int:
        """Wait until the worker handled ``at_least`` records in total; return how many it has."""

        def reached() -> int:
            handled = self.handled()
            if handled >= at_least:
                return handled
            if not self.running:
                raise AssertionError(f"exited before handling {at_least} records: {self.describe()}")
            return 0

        return wait_for(
            reached,
            timeout,
            interval=0.01,
            message=lambda: f"waiting for {at_least} handled records: {self.describe()}",
        )


class WorkerPool:
    """Starts recording workers on one topic and group; kills the ones left at exit."""

    def __init__(
        self, directory: Path, bootstrap: str, group: str, topic: str, group_protocol: str = "classic"
    ) -> None:
        self.directory = directory
        self.bootstrap = bootstrap
        self.group = group
        self.topic = topic
        #: ``[kafka] group_protocol`` of every worker; classic-only client keys are left out under
        #: "consumer" (the dev broker sets the same session and heartbeat for consumer groups).
        self.group_protocol = group_protocol
        self.workers: list[Worker] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL every worker still running and reap all of them."""
        for worker in self.workers:
            worker.kill()

    def start(
        self,
        name: str,
        *,
        until_end: bool = False,
        every_records: int = 500,
        every_seconds: float = 0,
        poll_batch_size: int = 100,
        work_us: int = 0,
        sleep_us: int = 0,
        slow_while: Path | None = None,
        fail_id: int | None = None,
        client: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> Worker:
        """Start a worker; its effects go to ``<directory>/<name>.effects``, stderr to ``<name>.log``."""
        effects = self.directory / f"{name}.effects"
        log = self.directory / f"{name}.log"
        assert not effects.exists(), f"effects file {effects} already exists: use a new worker name"
        settings = {
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMER_KAFKA__GROUP_ID": self.group,
            "STREAMER_KAFKA__GROUP_PROTOCOL": self.group_protocol,
            "STREAMER_COMMIT__EVERY_RECORDS": str(every_records),
            "STREAMER_COMMIT__EVERY_SECONDS": str(every_seconds),
            "STREAMER_KAFKA__POLL_BATCH_SIZE": str(poll_batch_size),
            "STREAMER_LOG_LEVEL": "INFO",
            "STREAMER_LOG_FORMAT": "json",
            "RECORDING_TOPIC": self.topic,
            "RECORDING_EFFECTS": str(effects),
            "RECORDING_WORK_US": str(work_us),
            "RECORDING_SLEEP_US": str(sleep_us),
            "RECORDING_SLOW_WHILE": str(slow_while or ""),
            "RECORDING_PARENT_PID": str(os.getpid()),
            # No HTTP endpoint: concurrent workers would race for its port.
            "STREAMER_METRICS__ENABLED": "false",
            # These tests are about the offsets alone: a failed record stops the worker (exit 1)
            # instead of being parked in a dead-letter topic the test would have to clean up.
            "STREAMER_DEAD_LETTER__ENABLED": "false",
        }
        if fail_id is not None:
            settings["RECORDING_FAIL_ID"] = str(fail_id)
        client = protocol_client(client or {}, self.group_protocol)
        if client:
            settings["STREAMER_KAFKA__CLIENT"] = json.dumps(client)
        args: Sequence[str] = ("run", APP, "--no-progress", *(("--until-end",) if until_end else ()))
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                streamer_command(*args),
                cwd=REPO,
                env=clean_env(**{**settings, **(env or {})}),
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        worker = Worker(name, proc, effects, log)
        self.workers.append(worker)
        return worker

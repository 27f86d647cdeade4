"""``streamer run --workers N``: N worker processes in one consumer group, under one supervisor.

Each worker is a ``streamer run`` child process with its own metrics port (the base port + its
index), so Prometheus scrapes every worker as its own target; prometheus-client's multiprocess
mode is not used because streamer's metrics are read from live worker state at scrape time, which
that mode (file-backed values, no custom collectors) cannot do.

The supervisor forwards SIGTERM/SIGINT to every worker and waits for them; restarts a worker that
crashed (exit 1, or killed by a signal) with exponential backoff and logs each restart; and does
not restart workers that exited 0 (a bounded run finished) or 2 (bad settings: restarting cannot
help). It exits with the worst exit code of its workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

import structlog

from streamer.exitcodes import EXIT_OK, EXIT_USAGE

log = structlog.get_logger("streamer.supervisor")

_BACKOFF_MAX = 30.0


@dataclass
class Child:
    """One supervised worker process."""

    index: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    backoff: float = 1.0
    exit_code: int | None = None
    restart_at: float | None = None


def supervise(argv: Sequence[str], workers: int, base_port: int) -> int:
    """Run ``workers`` copies of ``streamer run <argv>``; return the worst exit code."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signum)

    children = [_spawn(argv, i, base_port) for i in range(workers)]
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("supervising workers", workers=workers, pids=[c.proc.pid for c in children])
    try:
        while True:
            for child in children:
                _check(child, argv, base_port, stopping)
            if all(c.exit_code is not None and c.restart_at is None for c in children):
                break
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    worst = max((c.exit_code or 0 for c in children), default=0)
    log.info(
        "all workers exited",
        exit_codes=[c.exit_code for c in children],
        restarts=[c.restarts for c in children],
    )
    return worst if worst >= 0 else 1


def _spawn(argv: Sequence[str], index: int, base_port: int) -> Child:
    env = {
        **os.environ,
        "STREAMER_METRICS__PORT": str(base_port + index),
        "STREAMER_WORKER_INDEX": str(index),
    }
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "run", *argv], env=env)
    return Child(index, proc)


def _check(child: Child, argv: Sequence[str], base_port: int, stopping: list[int]) -> None:
    """Notice an exit, and restart a crashed worker when its backoff has passed."""
    now = time.monotonic()
    if child.restart_at is not None:
        if stopping:
            child.restart_at = None
        elif now >= child.restart_at:
            restarted = _spawn(argv, child.index, base_port)
            child.proc, child.started, child.exit_code, child.restart_at = restarted.proc, now, None, None
            child.restarts += 1
            log.warning("worker restarted", worker=child.index, restarts=child.restarts, pid=child.proc.pid)
        return
    if child.exit_code is not None:
        return
    code = child.proc.poll()
    if code is None:
        return
    child.exit_code = code
    crashed = code not in (EXIT_OK, EXIT_USAGE)
    if stopping or not crashed:
        log.info("worker exited", worker=child.index, exit_code=code)
        return
    # A worker that ran a while before crashing starts its backoff over.
    if now - child.started > 60:
        child.backoff = 1.0
    child.restart_at = now + child.backoff
    log.error("worker crashed; restarting", worker=child.index, exit_code=code, restart_in=child.backoff)
    child.backoff = min(child.backoff * 2, _BACKOFF_MAX)

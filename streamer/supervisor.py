"""``streamer run --workers N``: N worker processes in one consumer group, under one supervisor.

Each worker is a ``streamer run`` child process with its own metrics port (the base port + its
index), so Prometheus scrapes every worker as its own target; prometheus-client's multiprocess
mode is not used because streamer's metrics are read from live worker state at scrape time, which
that mode (file-backed values, no custom collectors) cannot do.

Signals. Each worker runs in its own session (so its own process group): a signal to the
supervisor's process group (Ctrl-C in a terminal, ``kill -- -PGID``) reaches the supervisor alone,
and the supervisor forwards every SIGTERM/SIGINT it receives to every running worker exactly once.
A worker therefore sees a single SIGTERM for a single stop, drains and commits; a second signal it
sees means someone asked twice, and it exits at once (128 + N), as ``streamer run`` documents. On
Linux each worker also gets SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), so a
SIGKILLed supervisor leaves no worker behind, and each still stops cleanly.

Restarts. A worker that crashed (exit 1, or killed by a signal) is restarted with exponential
backoff, each restart logged; one that exited 0 (a bounded run finished) or 2 (bad settings:
restarting cannot help) is not. The supervisor exits with the worst exit code of its workers, a
worker killed by signal N counting as 128 + N (as a shell reports it), never as success.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType

import structlog

from streamer.exitcodes import EXIT_OK, EXIT_USAGE
from streamer.logs import configure_logging

log = structlog.get_logger("streamer.supervisor")

__all__ = ["Child", "exit_status", "supervise", "worst_exit_code"]

_BACKOFF_MAX = 30.0
#: Seconds between looks at the workers when no signal arrives.
_TICK = 0.2
#: The signals forwarded to the workers.
_FORWARDED = (signal.SIGTERM, signal.SIGINT)
#: prctl(2) option: the signal this process gets when its parent thread exits.
_PR_SET_PDEATHSIG = 1
#: How a worker is started: this interpreter running ``streamer run``.
WORKER_PROGRAM: tuple[str, ...] = (sys.executable, "-m", "streamer", "run")


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


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def worst_exit_code(returncodes: Iterable[int | None]) -> int:
    """The supervisor's exit code: the highest of its workers' exit statuses (0 if none exited)."""
    return max((exit_status(code) for code in returncodes if code is not None), default=EXIT_OK)


def supervise(
    argv: Sequence[str], workers: int, base_port: int, *, program: Sequence[str] = WORKER_PROGRAM
) -> int:
    """Run ``workers`` copies of ``program + argv`` (``streamer run <argv>``); return the worst exit code.

    Must run on the main thread (it installs signal handlers).
    """
    configure_logging()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only note it: the loop forwards it (it also owns the list of workers, which a restart
        # changes), and the wake-up pipe below cuts the loop's wait short.
        received.append(signum)

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    previous_wakeup = signal.set_wakeup_fd(wake_write)
    previous = {s: signal.signal(s, on_signal) for s in _FORWARDED}
    children: list[Child] = []
    try:
        children = [_spawn(program, argv, i, base_port) for i in range(workers)]
        log.info("supervising workers", workers=workers, pids=[c.proc.pid for c in children])
        forwarded = 0
        while True:
            # Every signal the supervisor received goes to every running worker once, in order.
            while forwarded < len(received):
                _forward(received[forwarded], children)
                forwarded += 1
            for child in children:
                _check(child, program, argv, base_port, received)
            if all(c.exit_code is not None and c.restart_at is None for c in children):
                break
            if select.select([wake_read], [], [], _TICK)[0]:
                os.read(wake_read, 512)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_read)
        os.close(wake_write)
    worst = worst_exit_code(c.exit_code for c in children)
    log.info(
        "all workers exited",
        exit_codes=[None if c.exit_code is None else exit_status(c.exit_code) for c in children],
        restarts=[c.restarts for c in children],
        exit_code=worst,
    )
    return worst


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal has no name
        return f"signal {signum}"


def _forward(signum: int, children: Sequence[Child]) -> None:
    name = _signal_name(signum)
    pids = []
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signum)
            pids.append(child.proc.pid)
    log.info("forwarded signal to workers", signal=name, pids=pids)


def _spawn(program: Sequence[str], argv: Sequence[str], index: int, base_port: int) -> Child:
    env = {
        **os.environ,
        "STREAMER_METRICS__PORT": str(base_port + index),
        "STREAMER_WORKER_INDEX": str(index),
    }
    proc = subprocess.Popen(
        [*program, *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        # A session of its own: signals to the supervisor's process group (a terminal's Ctrl-C,
        # kill -- -PGID) do not reach the worker directly; the supervisor forwards them once.
        start_new_session=True,
        # The hook is two calls resolved before the fork; streamer starts no thread in the
        # supervisor (only an app that starts threads at import would bring preexec_fn's risk).
        preexec_fn=_die_with_supervisor(os.getpid()),  # noqa: PLW1509
    )
    return Child(index, proc)


def _die_with_supervisor(supervisor: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when the supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Looked up before the fork: the child should run as little as possible before exec.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    death_signal = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != supervisor:
            # The supervisor died between the fork and the prctl: no death signal will come.
            os._exit(128 + death_signal)

    return preexec


def _check(
    child: Child, program: Sequence[str], argv: Sequence[str], base_port: int, stopping: Sequence[int]
) -> None:
    """Notice an exit, and restart a crashed worker when its backoff has passed."""
    now = time.monotonic()
    if child.restart_at is not None:
        if stopping:
            child.restart_at = None
        elif now >= child.restart_at:
            restarted = _spawn(program, argv, child.index, base_port)
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
    details: dict[str, object] = {"exit_code": exit_status(code)}
    if code < 0:
        details["signal"] = _signal_name(-code)
    crashed = code not in (EXIT_OK, EXIT_USAGE)
    if stopping or not crashed:
        log.info("worker exited", worker=child.index, pid=child.proc.pid, **details)
        return
    # A worker that ran a while before crashing starts its backoff over.
    if now - child.started > 60:
        child.backoff = 1.0
    child.restart_at = now + child.backoff
    log.error("worker crashed; restarting", worker=child.index, restart_in=child.backoff, **details)
    child.backoff = min(child.backoff * 2, _BACKOFF_MAX)

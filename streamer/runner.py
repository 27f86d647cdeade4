"""Run one worker in this process: logging, signals, the drain watchdog and the progress display."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from streamer.exitcodes import EXIT_DRAIN_TIMEOUT
from streamer.logs import configure_logging
from streamer.metrics import HealthServer
from streamer.progress import Progress
from streamer.settings import Settings
from streamer.tracing import tracing_on
from streamer.worker import Worker

if TYPE_CHECKING:
    from streamer.app import App

log = structlog.get_logger("streamer.runner")


def run_worker(app: App, settings: Settings, *, until_end: bool = False, progress: bool | None = None) -> int:
    """Run a worker for ``app`` until it stops; return the process exit code.

    SIGTERM or SIGINT stops fetching and lets the record in hand finish; if that takes longer than
    ``[shutdown] drain_timeout``, the loop commits what finished and the process exits with code 3.
    A second signal (not a repeat within 2 s) exits at once with 128 + the signal number.
    """
    configure_logging(secrets=settings.secret_values(), trace=tracing_on(settings.tracing))
    log.info("settings", **settings.redacted())
    worker = Worker(settings, app.chains(settings), until_end=until_end, key_fn=app.key_fn)
    restore = _install_signal_handlers(worker, settings.shutdown.drain_timeout)
    health = None
    if settings.metrics.enabled:
        max_poll_ms = float(settings.kafka.librdkafka_client().get("max.poll.interval.ms", 300_000))
        health = HealthServer(worker, settings.metrics, max_poll_ms / 1000)
        health.start()
    show = progress if progress is not None else (until_end and sys.stderr.isatty())
    display = Progress(worker.stats, sys.stderr) if show else None
    if display is not None:
        display.start()
    try:
        return worker.run()
    finally:
        if display is not None:
            display.stop()
        if health is not None:
            health.stop()
        restore()


#: Seconds after the drain timeout before the backstop ends a process whose loop cannot finish
#: (a final commit or a close that hangs on an unreachable broker). The loop itself commits what
#: finished when the drain timeout runs out; the backstop never commits.
_BACKSTOP_S = 8.0
#: A repeat of the same signal within this many seconds is one delivery, not a second request:
#: a signal to the whole process group (systemd's KillMode, ``kill -- -PGID``) may reach a worker
#: both directly and through its supervisor.
_REPEAT_S = 2.0


def _install_signal_handlers(worker: Worker, drain_timeout: float) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals can only be handled on the main thread; the caller owns them
    first: dict[int, float] = {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if worker.stop_requested:
            if signum in first and now - first[signum] < _REPEAT_S:
                return
            os.write(2, f"second {signal.Signals(signum).name}: exiting at once\n".encode())
            os._exit(128 + signum)
        first[signum] = now
        worker.request_stop(signal.Signals(signum).name)
        timer = threading.Timer(drain_timeout + _BACKSTOP_S, _backstop, args=(drain_timeout,))
        timer.daemon = True
        timer.start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _backstop(drain_timeout: float) -> None:
    """The loop did not finish stopping within the drain timeout and the backstop: leave now."""
    waited = drain_timeout + _BACKSTOP_S
    os.write(2, f"streamer: stop did not finish {waited:.0f} s after the signal; exiting\n".encode())
    os._exit(EXIT_DRAIN_TIMEOUT)

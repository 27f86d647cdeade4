"""The keep-alive: polls on the loop's behalf while a handler runs long."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from streamer.worker import Worker

log = structlog.get_logger("streamer.keepalive")


class KeepAlive:
    """Polls on the loop's behalf while one chain runs long, so that the worker stays in its group.

    A handler that runs past ``max.poll.interval.ms`` would get the worker evicted. Once a chain
    has run for a third of that, this thread takes the loop's lock (the loop releases it while a
    chain runs), pauses every partition and polls: heartbeats and rebalances are served, no record
    is taken. When the chain returns, the loop resumes the partitions.
    """

    def __init__(self, worker: Worker, after_seconds: float) -> None:
        self._worker = worker
        self._after = after_seconds
        self._stopped = threading.Event()
        #: True while this thread has the partitions paused; read by the loop after every chain.
        self.active = False
        self._thread = threading.Thread(target=self._run, name="streamer-keepalive", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stopped.set()

    def _run(self) -> None:
        w = self._worker
        while not self._stopped.wait(min(1.0, self._after / 2)):
            started = w.chain_started
            if started is None or time.perf_counter() - started < self._after:
                continue
            if not w.lock.acquire(timeout=0.5):
                continue
            try:
                if w.chain_started is None:
                    continue
                if not self.active:
                    self.active = True
                    log.warning(
                        "handler running long; polling with partitions paused to stay in the group",
                        running_seconds=round(time.perf_counter() - started, 1),
                    )
                    w.pause_all("keepalive")
                w.poll_paused(0.1, "keepalive")
            finally:
                w.lock.release()

    def chain_returned(self) -> None:
        """Called by the loop (holding the lock) after every chain: resume if this paused them."""
        if self.active:
            self.active = False
            self._worker.resume_all("keepalive")

"""A terminal progress line for bounded runs: records done / total, rate, ETA."""

from __future__ import annotations

import threading
import time
from typing import TextIO

from streamer.stats import WorkerStats


class Progress:
    """Redraws one status line on a terminal from a worker's counters, from a daemon thread."""

    def __init__(self, stats: WorkerStats, out: TextIO, interval: float = 0.25) -> None:
        self._stats = stats
        self._out = out
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamer-progress", daemon=True)

    def start(self) -> None:
        """Start drawing."""
        self._thread.start()

    def stop(self) -> None:
        """Draw the final state and stop."""
        self._stopped.set()
        self._thread.join(timeout=2)
        self._out.write(self.render() + "\n")
        self._out.flush()

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval):
            self._out.write("\r" + self.render() + "\x1b[K")
            self._out.flush()

    def render(self, width: int = 30) -> str:
        """The status line, e.g. ``[#####-----] 50,000/100,000  50%  41,230 rec/s  ETA 0:01``."""
        done = self._stats.finished
        total = self._stats.total
        elapsed = max(time.monotonic() - self._stats.started_at, 1e-9)
        rate = done / elapsed
        if not total:
            return f"{done:,} records  {rate:,.0f} rec/s"
        fraction = min(done / total, 1.0)
        filled = int(fraction * width)
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_text = "--:--" if eta == float("inf") else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        return (
            f"[{'#' * filled}{'-' * (width - filled)}] {done:,}/{total:,}  "
            f"{fraction:4.0%}  {rate:,.0f} rec/s  ETA {eta_text}"
        )

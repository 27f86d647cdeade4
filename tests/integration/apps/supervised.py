"""The recording app (``tests/integration/apps/recording.py``) for workers under a supervisor.

Under ``streamer run --workers N`` every worker inherits the same ``RECORDING_EFFECTS``; this app
appends the worker's index (``STREAMER_WORKER_INDEX``, set by the supervisor for each worker) to
it, so a test can tell which worker handled what: ``<RECORDING_EFFECTS>.<index>``.

It also counts the signals the worker process receives, one line with the signal number per
delivery, in ``<RECORDING_EFFECTS>.<index>.signals``. Deliveries are counted where the C-level
signal handler runs (``signal.set_wakeup_fd`` writes a byte per delivery), not where Python's
handler runs: two deliveries in a row may reach the Python handler as one call, and the test is
about how many the process was sent.
"""

from __future__ import annotations

import os
import signal
import threading


def _count_deliveries(path: str) -> None:
    """Append the number of each signal delivered to this process to ``path``."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def copy() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        while data := os.read(read_end, 64):
            os.write(fd, b"".join(b"%d\n" % signum for signum in data))

    threading.Thread(target=copy, name="signal-counter", daemon=True).start()


# The supervisor imports the app too (to read its settings) and must pass the variable on unchanged.
if "STREAMER_WORKER_INDEX" in os.environ:
    os.environ["RECORDING_EFFECTS"] += f".{os.environ['STREAMER_WORKER_INDEX']}"
    _count_deliveries(os.environ["RECORDING_EFFECTS"] + ".signals")

from tests.integration.apps.recording import app  # noqa: E402 - it reads RECORDING_EFFECTS at import

__all__ = ["app"]

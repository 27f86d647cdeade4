"""The worker side of ``bench/economics.py``: a handler with a known CPU cost per record that
counts how many times each record was handled, in memory shared with the benchmark.

Configured by environment variables, read at import time:

``ECON_TOPIC``
    the topic to consume (required).
``ECON_WORK_US``
    CPU microseconds each record burns: this thread's CPU time (``time.thread_time``), so that
    time the thread spends waiting for the GIL or for a core does not count as work done.
``ECON_COUNTS``
    a file of ``uint16`` counters, one per record: ``partition * ECON_STRIDE + offset`` (offsets
    of a fresh topic start at 0). The handler adds 1 to its record's counter after the work. The
    file is mapped shared, so an increment is in the kernel's page cache the moment it is made
    and survives a SIGKILL right after: processed - durable progress = re-read, exactly.
``ECON_STRIDE``
    counters per partition.
``ECON_MARK``
    this worker process's own file of ``int64`` slots, also mapped shared: ``[0]`` the
    ``time.monotonic_ns()`` of its first record (CLOCK_MONOTONIC is one clock for every process
    of the machine: the benchmark's "up" moment of the process), ``[1]`` the processing thread's
    native id (its ``/proc/PID/task/TID/schedstat`` says how long it waited for a core), then per
    partition the first offset it handled (-1: none yet; the committed offset it resumed from),
    then per partition the last offset it handled.
``ECON_PARTITIONS``
    partitions of the topic (the size of the two per-partition arrays of ``ECON_MARK``).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Literal

from streamer import App, Message

_TOPIC = os.environ.get("ECON_TOPIC", "economics")
_WORK_S = float(os.environ.get("ECON_WORK_US", "0")) / 1e6
_STRIDE = int(os.environ.get("ECON_STRIDE", "0"))
_PARTITIONS = int(os.environ.get("ECON_PARTITIONS", "1"))


def _map(path: str, fmt: Literal["H", "q"]) -> memoryview[int]:
    with Path(path).open("r+b") as file:
        return memoryview(mmap.mmap(file.fileno(), 0)).cast(fmt)


_COUNTS = _map(os.environ["ECON_COUNTS"], "H") if "ECON_COUNTS" in os.environ else None
_MARK = _map(os.environ["ECON_MARK"], "q") if "ECON_MARK" in os.environ else None
_FIRST = 2
_LAST = 2 + _PARTITIONS

app = App(name="economics")


def burn(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU time."""
    clock = time.thread_time
    deadline = clock() + seconds
    while clock() < deadline:
        pass


@app.handler(_TOPIC)
def handle(msg: Message) -> None:
    """Burn the per-record cost, then count the record as handled once more."""
    if _WORK_S:
        burn(_WORK_S)
    partition, offset = msg.partition, msg.offset
    if _COUNTS is not None:
        _COUNTS[partition * _STRIDE + offset] += 1
    mark = _MARK
    if mark is not None:
        mark[_LAST + partition] = offset
        if mark[_FIRST + partition] < 0:
            mark[_FIRST + partition] = offset
            if not mark[0]:
                mark[1] = threading.get_native_id()
                mark[0] = time.monotonic_ns()

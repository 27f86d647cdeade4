"""A worker app for the observability tests: one effects line per handled record, and a record
it can block on so a test can SIGKILL the worker at a known point.

Configured by environment variables, read at import time:

``METRICS_APP_TOPIC``
    the topic to consume (required).
``METRICS_APP_EFFECTS``
    the effects file: one line ``"partition offset id\\n"`` per handled record, appended with
    ``os.write`` on an ``O_APPEND`` descriptor, so a line written survives a SIGKILL right after.
``METRICS_APP_BLOCK_ID`` and ``METRICS_APP_BLOCKED``
    on the record with this id (the ``message-id`` header of
    ``tests.support.kafka.produce_records``), write ``"partition offset id\\n"`` to the file
    ``METRICS_APP_BLOCKED`` and then hang, before writing an effect: the worker is stuck inside
    that record's handler until it is killed.
``METRICS_APP_OUTPUT``
    if set, a topic: each handled record is also sent there (a ``streamer.Record``), so the
    output metrics have samples.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from streamer import App, Message, Record

TOPIC = os.environ["METRICS_APP_TOPIC"]
_EFFECTS = os.environ["METRICS_APP_EFFECTS"]
_BLOCK_ID = int(os.environ["METRICS_APP_BLOCK_ID"]) if os.environ.get("METRICS_APP_BLOCK_ID") else None
_BLOCKED = os.environ.get("METRICS_APP_BLOCKED", "")
_OUTPUT = os.environ.get("METRICS_APP_OUTPUT", "")

app = App(name="metrics")
_fd: int | None = None


@app.handler(TOPIC)
def handle(msg: Message) -> Record | None:
    """Append ``partition offset id`` to the effects file (or hang on the blocking id)."""
    global _fd  # noqa: PLW0603 - one descriptor per worker process, opened on first use
    header = msg.header("message-id")
    record_id = int(header) if header is not None else -1
    line = b"%d %d %d\n" % (msg.partition, msg.offset, record_id)
    if record_id == _BLOCK_ID:
        # Write the marker to a temporary name and rename it, so a reader never sees half a line.
        tmp = Path(_BLOCKED + ".tmp")
        tmp.write_bytes(line)
        tmp.replace(_BLOCKED)
        threading.Event().wait()  # until SIGKILL
    if _fd is None:
        _fd = os.open(_EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, line)
    return Record(_OUTPUT, msg.value, key=msg.key) if _OUTPUT else None

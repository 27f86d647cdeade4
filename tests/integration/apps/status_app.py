"""A worker app for the status page tests: handles every record, refuses the poison ones.

``STATUS_APP_TOPIC`` names the topic (read at import time). A record whose value starts with
``poison`` raises ``ValueError`` quoting the whole value: not retryable, so it is parked at once,
and the page must show where it was without the message (it quotes the record).
"""

from __future__ import annotations

import os

from streamer import App, Message

TOPIC = os.environ["STATUS_APP_TOPIC"]

app = App(name="status")


@app.handler(TOPIC)
def handle(msg: Message) -> None:
    """Take the record, or refuse it (poison), naming its value as applications do."""
    if (msg.value or b"").startswith(b"poison"):
        raise ValueError(f"cannot take {msg.value!r}")

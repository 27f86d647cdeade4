"""A per-record timeout: an attempt that runs too long fails with HandlerTimeoutError (retryable).

It uses SIGALRM, so it interrupts Python code in the main thread (where the worker runs chains);
a blocking call in C code is interrupted when it returns to Python. Elsewhere it does nothing.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from streamer.chain import Handler, Middleware
from streamer.errors import HandlerTimeoutError
from streamer.message import Message


def timeout(seconds: float) -> Middleware:
    """Fail an attempt that runs longer than ``seconds``."""

    def middleware(next_handler: Handler) -> Handler:
        def handler(msg: Message) -> None:
            if threading.current_thread() is not threading.main_thread():
                next_handler(msg)
                return

            def expired(_signum: int, _frame: FrameType | None) -> None:
                raise HandlerTimeoutError(f"handler ran longer than {seconds} s")

            previous = signal.signal(signal.SIGALRM, expired)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                next_handler(msg)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

        return handler

    return middleware

"""A per-attempt timeout: an attempt that runs too long fails with HandlerTimeoutError (retryable).

An async attempt is cancelled at its deadline (``asyncio.timeout``). A sync one runs on the
processing thread (or a thread of the worker's pool), so a signal (SIGALRM) cannot reach them. One watchdog
thread keeps the deadlines of running attempts and, when one passes, raises HandlerTimeoutError
inside the attempt's thread (``PyThreadState_SetAsyncExc``): it interrupts Python code; a call
blocked in C code is interrupted when it returns to Python.

The race a timer has with the handler's return is closed: the deadline is disarmed under the
watchdog's lock, which clears an injection not yet delivered, and an injection delivered after
the handler returned (it lands in this middleware's own frame, not the handler's) counts as the
success it was. A record that succeeded is never retried because its timer fired late.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import itertools
import os
import select
import threading
import time
from collections.abc import Awaitable
from typing import cast

from streamer.chain import Handler, Middleware, Output, is_async
from streamer.errors import HandlerTimeoutError
from streamer.message import Message

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
# The same C function with a pointer argument: passing None passes NULL, which clears.
_clear_async_exc = ctypes.PyDLL(None).PyThreadState_SetAsyncExc
_clear_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)


class _Deadline:
    __slots__ = ("armed", "at", "fired", "thread_id")

    def __init__(self, at: float, thread_id: int) -> None:
        self.at = at
        self.thread_id = thread_id
        self.armed = True
        self.fired = False


class _Watchdog:
    """One thread that fires the deadlines of running attempts.

    The attempt's thread only ever holds a C-level lock inside a ``with`` block (the exception
    it may receive at any bytecode then releases it) and wakes the watchdog through a pipe: no
    Python-level synchronisation code (``threading.Condition``) runs in a thread that an
    injected exception can interrupt halfway.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> _Deadline:
        deadline = _Deadline(time.monotonic() + seconds, threading.get_ident())
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="streamer-timeouts", daemon=True)
                self._thread.start()
            earliest = not self._heap or deadline.at < self._heap[0][0]
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
        if earliest:
            with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
                os.write(self._wake_w, b"x")
        return deadline

    def disarm(self, deadline: _Deadline) -> None:
        """Stop ``deadline``; if it fired and its exception has not landed yet, take it back."""
        with self._lock:
            deadline.armed = False
            if deadline.fired:
                _clear_async_exc(deadline.thread_id, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                heap = self._heap
                while heap and not heap[0][2].armed:
                    heapq.heappop(heap)
                wait = heap[0][0] - time.monotonic() if heap else None
                if wait is not None and wait <= 0:
                    _, _, deadline = heapq.heappop(heap)
                    deadline.fired = True
                    _set_async_exc(deadline.thread_id, HandlerTimeoutError)
                    continue
            if select.select([self._wake_r], [], [], wait)[0]:
                os.read(self._wake_r, 4096)


_watchdog = _Watchdog()


def timeout(seconds: float) -> Middleware:
    """Fail an attempt that runs longer than ``seconds``."""

    def middleware(next_handler: Handler) -> Handler:
        if is_async(next_handler):
            # An async attempt is a task on the worker's event loop: cancel it at the deadline.

            async def async_handler(msg: Message) -> Output:
                limit = asyncio.timeout(seconds)
                try:
                    async with limit:
                        return await cast(Awaitable[Output], next_handler(msg))
                except TimeoutError:
                    if not limit.expired():
                        raise  # the handler's own TimeoutError (a client's), not ours
                    raise HandlerTimeoutError(f"handler ran longer than {seconds} s") from None

            return async_handler

        def handler(msg: Message) -> Output:
            deadline = _watchdog.arm(seconds)
            outcome: BaseException | None = None
            result: Output = None
            try:
                result = cast(Output, next_handler(msg))
            except BaseException as exc:  # noqa: BLE001 - re-raised below once the deadline is disarmed
                outcome = exc
            while True:
                try:
                    _watchdog.disarm(deadline)
                    break
                except HandlerTimeoutError:
                    continue  # the injection landed here, after the handler returned: disarm again
            if outcome is None:
                return result
            if isinstance(outcome, HandlerTimeoutError) and deadline.fired:
                tb = outcome.__traceback__
                if tb is not None and tb.tb_next is None:
                    return result  # it landed in this frame: the handler had already returned
                raise HandlerTimeoutError(f"handler ran longer than {seconds} s") from None
            raise outcome

        return handler

    return middleware

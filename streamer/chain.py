"""The one extension shape: a handler takes a message; a middleware wraps a handler.

A chain is sync or async as its handler is: an ``async def`` handler makes every middleware
around it return an ``async def`` wrapper too (the built-ins do, by looking at what they wrap),
and a mismatch is refused at start-up, never discovered on the first record.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from streamer.errors import ConfigError
from streamer.message import Message
from streamer.record import Record

#: What a handler returns: None, or the records to send (consume-transform-produce).
Output = Record | Iterable[Record] | None
#: A sync handler returns its output; an async one returns an awaitable of it.
Handler = Callable[[Message], "Output | Awaitable[Output]"]
Middleware = Callable[[Handler], Handler]
#: A batch handler takes the records of one batch, in fetch order (sync or async).
BatchHandler = Callable[[list[Message]], "Awaitable[None] | None"]


def is_async(func: Any) -> bool:
    """Whether ``func`` is an ``async def`` function (or an object whose ``__call__`` is one)."""
    call = None if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__call__
    return inspect.iscoroutinefunction(func) or (call is not None and inspect.iscoroutinefunction(call))


def compose(handler: Handler, middlewares: Iterable[Middleware], *, topic: str = "?") -> Handler:
    """Wrap ``handler`` in ``middlewares``; the first middleware is the outermost.

    Called once at start-up per topic, never per record. Raises ConfigError when a middleware
    returns a sync wrapper around an async handler, or an async one around a sync handler.
    """
    chain = handler
    want_async = is_async(handler)
    for middleware in reversed(list(middlewares)):
        wrapped = middleware(chain)
        if is_async(wrapped) != want_async:
            kind, other = ("async", "sync") if want_async else ("sync", "async")
            raise ConfigError(
                f"topic {topic!r}: middleware {_name(middleware)} returns a {other} handler around the "
                f"{kind} handler {_name(handler)}; a middleware must return `async def` for an async "
                "handler and `def` for a sync one (look at inspect.iscoroutinefunction(next_handler) "
                "to support both)"
            )
        chain = wrapped
    return chain


def _name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or getattr(type(func), "__qualname__", repr(func)))

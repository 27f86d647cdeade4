"""The one extension shape: a handler takes a message; a middleware wraps a handler."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import reduce

from streamer.message import Message

Handler = Callable[[Message], None]
Middleware = Callable[[Handler], Handler]


def compose(handler: Handler, middlewares: Iterable[Middleware]) -> Handler:
    """Wrap ``handler`` in ``middlewares``; the first middleware is the outermost.

    Called once at start-up per topic, never per record.
    """
    return reduce(lambda inner, middleware: middleware(inner), reversed(list(middlewares)), handler)

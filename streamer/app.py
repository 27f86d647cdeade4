"""The App: where an application team registers handlers and middlewares."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from streamer.chain import Handler, Middleware, compose
from streamer.dedup import KeyFunction
from streamer.middleware.assemble import builtin_middlewares
from streamer.settings import Settings, load_settings


class App:
    """A set of topic handlers and the middlewares that wrap them.

    >>> app = App()
    >>> @app.handler("orders")
    ... def handle(msg: Message) -> None: ...
    """

    def __init__(self, name: str | None = None, settings: Settings | None = None) -> None:
        self.name = name
        self.settings = settings
        self._handlers: dict[str, Handler] = {}
        self._topic_middlewares: dict[str, list[Middleware]] = {}
        self._middlewares: list[Middleware] = []
        self.key_fn: KeyFunction | None = None

    def handler(self, topic: str, *, middlewares: Sequence[Middleware] = ()) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of ``topic``.

        ``middlewares`` wrap this topic's handler only, inside the app-wide ones.
        """
        if not topic:
            raise ValueError("a handler needs a topic name")

        def register(func: Handler) -> Handler:
            if topic in self._handlers:
                raise ValueError(f"topic {topic!r} already has a handler")
            self._handlers[topic] = func
            self._topic_middlewares[topic] = list(middlewares)
            return func

        return register

    def use(self, middleware: Middleware) -> Middleware:
        """Add a middleware; the first added is the outermost. Usable as a decorator."""
        self._middlewares.append(middleware)
        return middleware

    def idempotency_key(self, func: KeyFunction) -> KeyFunction:
        """Register the function that gives a record's idempotency key when its header is absent.

        Return None from it to fall back to ``topic/partition/offset``. Usable as a decorator.
        """
        self.key_fn = func
        return func

    @property
    def topics(self) -> list[str]:
        """The topics a worker of this app subscribes to: those with a handler."""
        return sorted(self._handlers)

    def chains(self, settings: Settings | None = None) -> dict[str, Handler]:
        """Compose each topic's chain once per worker: built-in middlewares, the app's, the handler.

        With ``settings``, the built-ins (decode, retry, timeout; see ``streamer.middleware``) come
        first, configured per topic; without, only the app's own middlewares wrap the handler.
        """
        return {
            topic: compose(
                h,
                [*builtin_middlewares(topic, settings), *self._middlewares, *self._topic_middlewares[topic]],
                topic=topic,
            )
            for topic, h in self._handlers.items()
        }

    def resolve_settings(self, config: str | Path | None = None) -> Settings:
        """The settings a worker of this app runs with: the app's own, else file + environment."""
        if config is None and self.settings is not None:
            return self.settings
        return load_settings(config)

    def run(self, config: str | Path | None = None, *, until_end: bool = False) -> int:
        """Run a worker in this process until stopped by SIGTERM/SIGINT; return its exit code."""
        from streamer.runner import run_worker

        return run_worker(self, self.resolve_settings(config), until_end=until_end)

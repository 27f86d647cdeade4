"""The App: where an application team registers handlers and middlewares."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from streamer.chain import BatchHandler, Handler, Middleware, compose
from streamer.dedup import KeyFunction
from streamer.engine.batches import BatchChain
from streamer.errors import ConfigError
from streamer.middleware.assemble import builtin_middlewares, retry_policy
from streamer.middleware.decode import resolve_decoder
from streamer.middleware.retry import RetryPolicy
from streamer.settings import Settings, load_settings
from streamer.typed import typed_handler

#: A handler as registered: plain (``(msg) -> output``) or typed (``(model[, msg]) -> output``).
F = TypeVar("F", bound=Callable[..., Any])


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
        self._batch_handlers: dict[str, tuple[BatchHandler, int, float]] = {}
        self._topic_middlewares: dict[str, list[Middleware]] = {}
        self._middlewares: list[Middleware] = []
        self.key_fn: KeyFunction | None = None

    def handler(self, topic: str, *, middlewares: Sequence[Middleware] = ()) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``topic``.

        ``middlewares`` wrap this topic's handler only, inside the app-wide ones. A handler whose
        first parameter is annotated with a pydantic model or a msgspec Struct gets the validated
        value instead of the Message (see ``streamer.typed``); the function is returned unchanged.
        """
        if not topic:
            raise ValueError("a handler needs a topic name")

        def register(func: F) -> F:
            if topic in self._handlers or topic in self._batch_handlers:
                raise ValueError(f"topic {topic!r} already has a handler")
            self._handlers[topic] = typed_handler(func) or func
            self._topic_middlewares[topic] = list(middlewares)
            return func

        return register

    def batch_handler(
        self, topic: str, *, max_records: int = 500, max_wait: float = 0.1
    ) -> Callable[[BatchHandler], BatchHandler]:
        """Register the decorated function as the batch handler of ``topic``.

        It gets a ``list[Message]`` of up to ``max_records`` records, in fetch order, once that
        many arrived or the oldest waited ``max_wait`` seconds. Raise ``streamer.BatchFailed``
        with the indexes of the records that failed to have only those retried (then parked);
        any other exception retries the whole batch. The topic's decoder and retry settings
        apply; middlewares (which take one record) do not.
        """
        if not topic:
            raise ValueError("a handler needs a topic name")
        if max_records < 1 or max_wait < 0:
            raise ValueError("max_records must be at least 1 and max_wait at least 0")

        def register(func: BatchHandler) -> BatchHandler:
            if topic in self._handlers or topic in self._batch_handlers:
                raise ValueError(f"topic {topic!r} already has a handler")
            self._batch_handlers[topic] = (func, max_records, max_wait)
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
        return sorted([*self._handlers, *self._batch_handlers])

    def chains(self, settings: Settings | None = None) -> dict[str, Handler]:
        """Compose each topic's chain once per worker: built-in middlewares, the app's, the handler.

        With ``settings``, the built-ins (decode, retry, timeout; see ``streamer.middleware``) come
        first, configured per topic; without, only the app's own middlewares wrap the handler.
        """
        chains: dict[str, Handler] = {
            topic: compose(
                h,
                [*builtin_middlewares(topic, settings), *self._middlewares, *self._topic_middlewares[topic]],
                topic=topic,
            )
            for topic, h in self._handlers.items()
        }
        for topic, (func, max_records, max_wait) in self._batch_handlers.items():
            chains[topic] = self._batch_chain(topic, func, max_records, max_wait, settings)
        return chains

    @staticmethod
    def _batch_chain(
        topic: str, func: BatchHandler, max_records: int, max_wait: float, settings: Settings | None
    ) -> BatchChain:
        overrides = settings.topic(topic) if settings is not None else None
        if settings is not None and (
            (overrides is not None and (overrides.concurrency or 0) > 1)
            or settings.processing.concurrency > 1
        ):
            raise ConfigError(
                f"topic {topic!r}: batch handlers run one batch at a time; [processing] concurrency "
                "(and [topics.NAME] concurrency) must be 1 in an app with a batch handler"
            )
        decoder = resolve_decoder(overrides.decoder) if overrides is not None and overrides.decoder else None
        policy = (
            retry_policy((overrides.retry if overrides else None) or settings.retry) if settings else None
        )
        return BatchChain(
            func,
            max_records=max_records,
            max_wait=max_wait,
            decoder=decoder,
            policy=policy or RetryPolicy(max_attempts=1),
        )

    def resolve_settings(self, config: str | Path | None = None) -> Settings:
        """The settings a worker of this app runs with: the app's own, else file + environment."""
        if config is None and self.settings is not None:
            return self.settings
        return load_settings(config)

    def run(self, config: str | Path | None = None, *, until_end: bool = False) -> int:
        """Run a worker in this process until stopped by SIGTERM/SIGINT; return its exit code."""
        from streamer.runner import run_worker

        return run_worker(self, self.resolve_settings(config), until_end=until_end)

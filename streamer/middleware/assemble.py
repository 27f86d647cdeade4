"""Build a topic's built-in middlewares from the settings, in DEFAULT_ORDER."""

from __future__ import annotations

import importlib

from streamer.chain import Middleware
from streamer.errors import ConfigError, RetryableError
from streamer.middleware.decode import decode, resolve_decoder
from streamer.middleware.retry import RetryPolicy, retry
from streamer.middleware.timeout import timeout
from streamer.settings import RetrySettings, Settings
from streamer.tracing import tracing_on


def builtin_middlewares(topic: str, settings: Settings | None) -> list[Middleware]:
    """trace (if tracing is on), decode (if the topic has a decoder), retry (if more than one
    attempt), timeout (if set)."""
    if settings is None:
        return []
    overrides = settings.topic(topic)
    chain: list[Middleware] = []
    if tracing_on(settings.tracing):
        # Imported only now: it imports opentelemetry, which a worker without tracing never loads.
        from streamer.middleware.trace import trace

        chain.append(trace(topic, settings.kafka.group_id, settings.dedup.key_header))
    if overrides.decoder:
        chain.append(decode(resolve_decoder(overrides.decoder)))
    policy = retry_policy(overrides.retry or settings.retry)
    if policy.max_attempts > 1 or settings.dead_letter.enabled:
        # Even without retries, the middleware turns unexpected exceptions into PermanentError,
        # which the worker parks in the dead-letter topic.
        chain.append(retry(policy))
    if overrides.timeout_seconds > 0:
        chain.append(timeout(overrides.timeout_seconds))
    return chain


def retry_policy(cfg: RetrySettings) -> RetryPolicy:
    """A RetryPolicy from settings, importing the exception types named in ``retry_on``."""
    return RetryPolicy(
        max_attempts=cfg.max_attempts,
        initial_backoff=cfg.initial_backoff,
        max_backoff=cfg.max_backoff,
        multiplier=cfg.multiplier,
        jitter=cfg.jitter,
        retry_on=(RetryableError, *(_exception_type(path) for path in cfg.retry_on)),
    )


def _exception_type(path: str) -> type[BaseException]:
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name or "builtins"), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"retry.retry_on: cannot import exception type {path!r}") from None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ConfigError(f"retry.retry_on: {path!r} is not an exception type")
    return found

"""Retries: a failed record runs again after an exponential backoff with jitter, then is parked."""

from __future__ import annotations

import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

from streamer.chain import Handler, Middleware, Output, is_async
from streamer.errors import DropRecord, PermanentError, RetryableError, RetryRecord
from streamer.message import Message


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed record is tried again."""

    max_attempts: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 30.0
    multiplier: float = 2.0
    #: Fraction of the backoff randomised either way, so that retries do not move in lockstep.
    jitter: float = 0.2
    #: Exception types worth retrying; RetryableError always is, PermanentError never.
    retry_on: tuple[type[BaseException], ...] = (RetryableError, TimeoutError, ConnectionError)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))  # noqa: S311 - not crypto

    def retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt."""
        return not isinstance(exc, PermanentError) and isinstance(exc, self.retry_on)


def retry(policy: RetryPolicy) -> Middleware:
    """Turn a retryable failure into ``RetryRecord`` until ``max_attempts``, then a PermanentError."""

    def verdict(msg: Message, exc: Exception) -> Exception:
        if not policy.retryable(exc):
            return PermanentError(f"{type(exc).__name__}: {exc}")
        if msg.attempt >= policy.max_attempts:
            return PermanentError(f"gave up after {msg.attempt} attempts: {type(exc).__name__}: {exc}")
        return RetryRecord(policy.backoff(msg.attempt), exc)

    def middleware(next_handler: Handler) -> Handler:
        if is_async(next_handler):

            async def async_handler(msg: Message) -> Output:
                try:
                    return await cast(Awaitable[Output], next_handler(msg))
                except (DropRecord, RetryRecord, PermanentError):
                    raise
                except Exception as exc:
                    raise verdict(msg, exc) from exc

            return async_handler

        def handler(msg: Message) -> Output:
            try:
                return cast(Output, next_handler(msg))
            except (DropRecord, RetryRecord, PermanentError):
                raise
            except Exception as exc:
                raise verdict(msg, exc) from exc

        return handler

    return middleware

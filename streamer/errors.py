"""Exceptions: the named ones handlers raise, and the ones streamer raises at users."""

from __future__ import annotations


class StreamerError(Exception):
    """Base class of every exception streamer raises."""


class ConfigError(StreamerError):
    """A setting is missing, unknown or malformed; the message names the key and the expected form."""


class HandlerSignal(StreamerError):
    """Base of the exceptions a handler or middleware raises on purpose to steer a record."""


class DropRecord(HandlerSignal):
    """Drop this record on purpose: it counts as finished, and its offset may be committed."""


class RetryableError(HandlerSignal):
    """A transient failure (a timeout, a downstream 503): the record may succeed if tried again."""


class PermanentError(HandlerSignal):
    """A failure that retrying cannot fix (bad data, a rejected request): park the record at once."""


class HandlerTimeoutError(RetryableError):
    """The handler chain ran longer than its per-record timeout."""


class RetryRecord(HandlerSignal):
    """Run this record again after ``delay`` seconds (raised by the retry middleware).

    The worker pauses the record's partition meanwhile, keeps polling (so it stays in the group)
    and keeps processing other partitions; nothing at or after this offset is committed.
    """

    def __init__(self, delay: float, cause: BaseException | None = None) -> None:
        super().__init__(
            f"retry in {delay:.3f} s" + (f" after {type(cause).__name__}: {cause}" if cause else "")
        )
        self.delay = delay
        self.cause = cause


class RecordFailed(StreamerError):
    """A record's handler chain failed and nothing parked it; the worker stops before committing it."""

    def __init__(self, topic: str, partition: int, offset: int, cause: BaseException) -> None:
        super().__init__(f"handler failed on {topic}[{partition}]@{offset}: {type(cause).__name__}: {cause}")
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.cause = cause

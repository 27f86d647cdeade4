"""streamer: long-running, checkpointed Kafka consumers."""

from streamer.app import App
from streamer.chain import BatchHandler, Handler, Middleware
from streamer.engine.batches import BatchFailed
from streamer.errors import (
    ConfigError,
    DropRecord,
    HandlerSignal,
    PermanentError,
    RecordFailed,
    RetryableError,
    StreamerError,
)
from streamer.message import Message
from streamer.record import Record
from streamer.settings import Settings, load_settings

__all__ = [
    "App",
    "BatchFailed",
    "BatchHandler",
    "ConfigError",
    "DropRecord",
    "Handler",
    "HandlerSignal",
    "Message",
    "Middleware",
    "PermanentError",
    "Record",
    "RecordFailed",
    "RetryableError",
    "Settings",
    "StreamerError",
    "load_settings",
]

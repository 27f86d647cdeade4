"""Logging: structlog, JSON lines in production and a readable console format in a terminal.

Every line from the loop carries the worker id and group (contextvars bound by the worker); lines
logged while a record is in the chain also carry its topic, partition and offset, and with
tracing on the ``trace_id`` and ``span_id`` of its span (``streamer.tracing``). The stdlib
``logging`` records (libraries, librdkafka through confluent-kafka's ``logger``) go through the
same processors. Secrets are redacted from every line: values of secret-looking keys, passwords in
URLs, and the literal secret values from the settings.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from streamer.message import Message

_SECRET_KEY = re.compile(r"pass(word)?|secret|token|credential|api[_-]?key|sasl|redis_url", re.IGNORECASE)
_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]+)@", re.IGNORECASE
)
REDACTED = "**********"


_record: ContextVar[Message | None] = ContextVar("streamer_record", default=None)


class _CurrentRecord:
    """The record in the chain right now.

    Serial dispatch writes ``serial`` (one attribute write per record on the hot path); concurrent
    records (asyncio tasks, pool threads) each set their own in a context variable.
    """

    __slots__ = ("serial",)

    def __init__(self) -> None:
        self.serial: Message | None = None

    @property
    def msg(self) -> Message | None:
        return _record.get() or self.serial

    @msg.setter
    def msg(self, msg: Message | None) -> None:
        _record.set(msg)


#: Set by the worker around each chain call; read by the ``add_record_context`` processor.
current_record = _CurrentRecord()
#: The same, without the property: for the concurrent dispatcher's hot path.
set_record = _record.set


def add_record_context(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """Add topic, partition and offset of the record being handled, if any."""
    msg = current_record.msg
    if msg is not None:
        event.setdefault("topic", msg.topic)
        event.setdefault("partition", msg.partition)
        event.setdefault("offset", msg.offset)
    return event


def trace_context() -> Processor:
    """A processor that adds ``trace_id`` and ``span_id`` of the current span, if there is one.

    Imports opentelemetry: ``configure_logging`` adds it only when tracing is on.
    """
    from opentelemetry.trace import get_current_span

    def add_trace_context(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        ids = get_current_span().get_span_context()
        if ids.is_valid:
            event.setdefault("trace_id", format(ids.trace_id, "032x"))
            event.setdefault("span_id", format(ids.span_id, "016x"))
        return event

    return add_trace_context


class SecretRedactor:
    """A processor that removes secrets from every field of every log line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Short values would redact innocent text; real secrets are longer than this.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        """Redact in place and return the event."""
        return self._scrub_mapping(event)

    def _scrub_mapping(self, mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in mapping.items():
            if _SECRET_KEY.search(str(key)) and isinstance(value, str | bytes) and value:
                mapping[key] = REDACTED
            else:
                mapping[key] = self.scrub(value)
        return mapping

    def scrub(self, value: Any) -> Any:
        """Return ``value`` with secrets removed (strings, and strings inside dicts and lists)."""
        if isinstance(value, str):
            text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
            for secret in self._secrets:
                text = text.replace(secret, REDACTED)
            return text
        if isinstance(value, dict):
            return self._scrub_mapping(dict(value))
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        return value


def configure_logging(
    level: str | None = None,
    *,
    json: bool | None = None,
    secrets: Iterable[str] = (),
    trace: bool = False,
) -> None:
    """Route structlog and stdlib logging to stderr; JSON unless stderr is a terminal.

    ``STREAMER_LOG_LEVEL`` and ``STREAMER_LOG_FORMAT`` (``json`` or ``console``) override the
    defaults; ``secrets`` are literal values never to print (passwords from the settings);
    ``trace`` adds the current span's ids to every line (tracing on: opentelemetry is installed).
    """
    level_name = (level or os.environ.get("STREAMER_LOG_LEVEL", "INFO")).upper()
    fmt = os.environ.get("STREAMER_LOG_FORMAT")
    use_json = json if json is not None else (fmt == "json" or (fmt is None and not sys.stderr.isatty()))
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_record_context,
        *([trace_context()] if trace else []),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        SecretRedactor(secrets),
    ]
    if use_json:
        shared.append(structlog.processors.format_exc_info)
    renderer: Processor = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name)

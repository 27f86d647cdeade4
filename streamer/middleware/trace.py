"""Tracing: a consumer span per record, continuing the trace context of the record's headers.

The outermost built-in middleware, composed only when tracing is on (``streamer.tracing``), so a
worker without it pays nothing per record. Each attempt of a record is one span of kind CONSUMER
named ``process <topic>``, with OpenTelemetry's messaging attributes (the names of the semantic
conventions that opentelemetry-semantic-conventions 0.66b ships with SDK 1.45), whose parent is
the context the global propagator (W3C ``traceparent`` / ``tracestate`` by default) extracts from
the headers. Inside it the span is current: log lines carry its ids (``streamer.logs``), spans
the handler starts are its children.

What leaves the span carries it on: the records the handler returns get its context in their
headers (a header the handler set itself wins), and a failure gets it as an attribute that the
dead-letter copy of its record puts in its headers (``streamer.deadletter.failure_headers``). A
retry is an event on the failed attempt's span; the next attempt is a span of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from contextvars import Token
from importlib.metadata import PackageNotFoundError, version
from typing import cast

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from streamer.chain import Handler, Middleware, Output, is_async
from streamer.errors import DropRecord, RetryRecord
from streamer.message import Headers, Message
from streamer.record import Record, outputs_of
from streamer.tracing import TRACE_HEADERS_ATTR

Attributes = dict[str, AttributeValue]
HeaderList = list[tuple[str, bytes | None]]
_new_tuple = tuple.__new__


class KafkaHeadersGetter(Getter[Headers]):
    """Reads propagation fields from a record's headers (a sequence of ``(name, bytes)`` pairs)."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        """The values of header ``key`` as text (Kafka allows repeats), or None when absent."""
        values = [value.decode("utf-8", "replace") for name, value in carrier if name == key and value]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        """The header names."""
        return [name for name, _ in carrier]


class KafkaHeadersSetter(Setter[HeaderList]):
    """Writes propagation fields into a list of ``(name, bytes)`` header pairs."""

    def set(self, carrier: HeaderList, key: str, value: str) -> None:
        """Replace header ``key`` with ``value``."""
        carrier[:] = [(name, data) for name, data in carrier if name != key]
        carrier.append((key, value.encode()))


GETTER = KafkaHeadersGetter()
SETTER = KafkaHeadersSetter()


def consumer_attributes(msg: Message, group: str, key_header: str = "") -> Attributes:
    """The span attributes of a record: OpenTelemetry's messaging and Kafka conventions.

    The key is set when it is UTF-8 text; the message id is the idempotency-key header when the
    record has one; ``streamer.attempt`` from the first retry on. Each attribute costs the SDK
    ~0.7 µs per span: the opt-in ones (``messaging.message.body.size``) are left out.
    """
    attributes: Attributes = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": msg.topic,
        "messaging.destination.partition.id": str(msg.partition),
        "messaging.kafka.offset": msg.offset,
        "messaging.consumer.group.name": group,
    }
    if msg.attempt > 1:
        attributes["streamer.attempt"] = msg.attempt
    key = msg.key
    if key is not None:
        with contextlib.suppress(UnicodeDecodeError):  # no canonical text form: not set
            attributes["messaging.kafka.message.key"] = key.decode()
    if msg.value is None:
        attributes["messaging.kafka.message.tombstone"] = True
    if key_header:
        message_id = msg.header(key_header)
        if message_id is not None:
            attributes["messaging.message.id"] = message_id.decode("utf-8", "replace")
    return attributes


def context_headers() -> Headers:
    """The current context as the global propagator writes it: ``traceparent``, ``tracestate``, ..."""
    carrier: HeaderList = []
    propagate.inject(carrier, setter=SETTER)
    return tuple(carrier)


def stamped(records: Iterable[Record], headers: Headers, fields: AbstractSet[str]) -> list[Record]:
    """``records`` with ``headers`` added, except to a record that sets any of ``fields`` itself."""
    return [
        record
        if record.headers and not fields.isdisjoint([name for name, _ in record.headers])
        # tuple.__new__ instead of _replace: several times cheaper, once per output.
        else _new_tuple(Record, (record[0], record[1], record[2], (*record[3], *headers), record[4]))
        for record in records
    ]


def error_type(exc: BaseException) -> str:
    """The class of a failure, as the span's ``error.type``: its cause's, when it has one."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return f"{type(cause).__module__}.{type(cause).__qualname__}"


class _Spans:
    """What one topic's spans share: the tracer, their name, the group, the message-id header."""

    __slots__ = ("group", "key_header", "name", "start_span")

    def __init__(self, tracer: otel_trace.Tracer, topic: str, group: str, key_header: str) -> None:
        self.start_span = tracer.start_span
        self.name = f"process {topic}"
        self.group = group
        self.key_header = key_header

    def start(self, msg: Message) -> tuple[Span, Token[Context]]:
        """Start ``msg``'s span as a child of its headers' context and make it current."""
        parent: Context | None = propagate.extract(msg[5], getter=GETTER) if msg[5] else None
        span = self.start_span(
            self.name,
            parent,
            SpanKind.CONSUMER,
            consumer_attributes(msg, self.group, self.key_header),
            record_exception=False,
            set_status_on_exception=False,
        )
        return span, otel_context.attach(otel_trace.set_span_in_context(span, parent))

    @staticmethod
    def returned(result: Output, msg: Message) -> Output:
        """``result`` with the span's context on every record it holds."""
        if result is None:
            return None
        records = outputs_of(result, msg)
        return stamped(records, context_headers(), propagate.get_global_textmap().fields)

    @staticmethod
    def raised(span: Span, msg: Message, exc: Exception) -> None:
        """Record ``exc`` on the span: a drop, a retry (an event) or a failure."""
        if isinstance(exc, DropRecord):
            span.add_event("dropped", {"streamer.reason": str(exc)})
            return
        failure = exc.cause or exc if isinstance(exc, RetryRecord) else exc
        span.record_exception(failure)
        if isinstance(exc, RetryRecord):
            span.add_event(
                "retry",
                {
                    "streamer.attempt": msg.attempt,
                    "streamer.retry.delay_seconds": exc.delay,
                    "exception.type": error_type(exc),
                    "exception.message": str(failure),
                },
            )
        else:
            # The dead-letter copy of the record continues this span's trace.
            with contextlib.suppress(AttributeError):  # an exception type without a __dict__
                setattr(exc, TRACE_HEADERS_ATTR, context_headers())
        span.set_attribute("error.type", error_type(exc))
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _instrumentation_version() -> str | None:
    try:
        return version("streamer")
    except PackageNotFoundError:
        return None


def trace(
    topic: str,
    group: str,
    key_header: str = "",
    tracer_provider: otel_trace.TracerProvider | None = None,
) -> Middleware:
    """A span per record of ``topic`` (``group`` consuming it), from the global provider unless
    ``tracer_provider`` is given."""
    tracer = otel_trace.get_tracer("streamer", _instrumentation_version(), tracer_provider)
    spans = _Spans(tracer, topic, group, key_header)
    start, returned, raised, detach = spans.start, spans.returned, spans.raised, otel_context.detach

    def middleware(next_handler: Handler) -> Handler:
        if is_async(next_handler):
            call = cast(Callable[[Message], Awaitable[Output]], next_handler)

            async def async_handler(msg: Message) -> Output:
                span, token = start(msg)
                try:
                    return returned(await call(msg), msg)
                except Exception as exc:
                    raised(span, msg, exc)
                    raise
                finally:
                    detach(token)
                    span.end()

            return async_handler

        def handler(msg: Message) -> Output:
            span, token = start(msg)
            try:
                return returned(cast(Output, next_handler(msg)), msg)
            except Exception as exc:
                raised(span, msg, exc)
                raise
            finally:
                detach(token)
                span.end()

        return handler

    return middleware

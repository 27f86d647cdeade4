"""OpenTelemetry for tests: an SDK provider with an in-memory exporter, globally for one test.

OpenTelemetry lets a process set its global TracerProvider once. ``global_tracer_provider``
sets it for the duration of a ``with`` block and then puts the API's default back (a proxy, so
``[tracing] enabled = "auto"`` is off again for every other test), the way
opentelemetry-test-utils' ``reset_trace_globals`` does it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

TRACEPARENT = "traceparent"


def sdk_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """An SDK TracerProvider exporting every finished span to memory, at once."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@contextlib.contextmanager
def global_tracer_provider() -> Iterator[InMemorySpanExporter]:
    """Set an in-memory SDK provider as the global one inside the block; reset it after."""
    provider, exporter = sdk_provider()
    _reset_globals()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_globals()


def _reset_globals() -> None:
    # Private globals of opentelemetry.trace: there is no public way to unset the provider.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


def traceparent(trace_id: int, span_id: int, sampled: bool = True) -> bytes:
    """A W3C traceparent header value."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}".encode()


def parsed(header: bytes | None) -> tuple[int, int]:
    """The trace id and parent span id of a traceparent header value."""
    assert header is not None, "no traceparent header"
    _version, trace_id, span_id, _flags = header.decode().split("-")
    return int(trace_id, 16), int(span_id, 16)


def consumer_spans(exporter: InMemorySpanExporter, topic: str) -> list[ReadableSpan]:
    """The finished spans named ``process <topic>``, oldest first."""
    return [s for s in exporter.get_finished_spans() if s.name == f"process {topic}"]

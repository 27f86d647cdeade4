"""OpenTelemetry tracing: whether it is on, and the trace context a failure carries to the DLQ.

Tracing is the ``trace`` middleware (``streamer.middleware.trace``): a consumer span per record
that continues the W3C ``traceparent`` of the record's headers, and puts its own context on the
records the handler emits. It is composed into a topic's chain at start-up when ``[tracing]
enabled`` says so, and not at all otherwise: with tracing off a record costs nothing more, and
this module never imports opentelemetry unless asked whether it is on.

``enabled = "auto"`` (the default) turns it on when opentelemetry is importable and the app set a
TracerProvider of its own (``trace.set_tracer_provider``, or ``opentelemetry-instrument``) before
the worker starts; the API's default proxy, a no-op, leaves it off. ``true`` turns it on whatever
the provider (spans of the API's no-op provider still carry the context on) and refuses to start
without ``pip install 'streamer[otel]'``.
"""

from __future__ import annotations

from streamer.errors import ConfigError
from streamer.message import Headers
from streamer.settings import TracingSettings

#: The attribute of a failure on which the middleware leaves the context of the span it failed
#: in (header pairs), for the dead-letter copy of its record.
TRACE_HEADERS_ATTR = "streamer_trace_headers"

_MISSING = (
    "tracing.enabled = true, but opentelemetry is not installed: "
    "pip install 'streamer[otel]' (or set tracing.enabled = \"auto\" or false)"
)


def tracing_on(settings: TracingSettings) -> bool:
    """Whether records get a span: per ``settings.enabled`` and what is installed and configured.

    Raises ConfigError when tracing is asked for (``true``) and opentelemetry is not installed.
    """
    if settings.enabled is False:
        return False
    installed = _importable()
    if settings.enabled is True:
        if not installed:
            raise ConfigError(_MISSING)
        return True
    return installed and provider_configured()


def provider_configured() -> bool:
    """Whether the global TracerProvider is a real one, not the API's default proxy or no-op."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def carried_headers(error: BaseException) -> Headers:
    """The trace headers a failure carries from its span (none when tracing is off)."""
    headers: Headers = getattr(error, TRACE_HEADERS_ATTR, ())
    return headers


def _importable() -> bool:
    """Whether the parts of the OpenTelemetry API the middleware uses import."""
    try:
        import opentelemetry.propagate
        import opentelemetry.trace  # noqa: F401 - imported to see that it imports
    except ImportError:
        return False
    return True

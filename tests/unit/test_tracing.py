"""Tracing: the header getter and setter, the span attributes, the trace middleware with the SDK's
in-memory exporter, the switch, the log processor, and streamer without opentelemetry."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from streamer import App, DropRecord, Message, PermanentError, Record, RetryableError
from streamer.chain import Handler, Middleware, compose
from streamer.deadletter import H_ERROR_TYPE, failure_headers
from streamer.errors import ConfigError, RetryRecord
from streamer.logs import trace_context
from streamer.middleware import DEFAULT_ORDER
from streamer.middleware.assemble import builtin_middlewares
from streamer.middleware.retry import RetryPolicy, retry
from streamer.middleware.trace import (
    GETTER,
    SETTER,
    consumer_attributes,
    context_headers,
    stamped,
    trace,
)
from streamer.settings import Settings, TracingSettings
from streamer.testing import ChainRunner, message
from streamer.tracing import carried_headers, tracing_on
from tests.support.tracing import (
    consumer_spans,
    global_tracer_provider,
    parsed,
    sdk_provider,
    traceparent,
)

pytestmark = pytest.mark.unit

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
UPSTREAM = traceparent(TRACE_ID, PARENT_ID)


def record(
    headers: tuple[tuple[str, bytes | None], ...] = (("traceparent", UPSTREAM),),
    *,
    key: bytes | None = b"order-7",
    value: bytes | None = b'{"amount": 3}',
    attempt: int = 1,
) -> Message:
    return Message("orders", 2, 41, key, value, headers, 1_700_000_000_000, attempt)


@dataclass
class Traced:
    """An SDK provider handed to the middleware itself (the global provider stays unset)."""

    provider: TracerProvider
    exporter: InMemorySpanExporter

    def chain(self, handler: Handler, *inner: Middleware) -> Handler:
        """``handler`` in the trace middleware of topic orders, ``inner`` middlewares inside it."""
        return compose(handler, [trace("orders", "billing", "message-id", self.provider), *inner])

    def span(self) -> ReadableSpan:
        """The one span finished."""
        (span,) = self.exporter.get_finished_spans()
        return span


@pytest.fixture
def otel() -> Traced:
    return Traced(*sdk_provider())


# --- headers and attributes -------------------------------------------------------------------


def test_the_getter_reads_every_value_of_a_header_as_text_and_none_when_absent() -> None:
    headers = (("traceparent", b"a"), ("other", b"x"), ("traceparent", b"b"), ("empty", None))
    assert GETTER.get(headers, "traceparent") == ["a", "b"]
    assert GETTER.get(headers, "tracestate") is None
    assert GETTER.get(headers, "empty") is None
    assert GETTER.keys(headers) == ["traceparent", "other", "traceparent", "empty"]


def test_the_setter_replaces_a_header_and_encodes_its_value() -> None:
    carrier: list[tuple[str, bytes | None]] = [("traceparent", b"old"), ("keep", b"1")]
    SETTER.set(carrier, "traceparent", "new")
    SETTER.set(carrier, "tracestate", "k=v")
    assert carrier == [("keep", b"1"), ("traceparent", b"new"), ("tracestate", b"k=v")]


def test_the_attributes_follow_the_messaging_conventions_for_kafka() -> None:
    msg = record((("message-id", b"id-7"),), attempt=2)
    assert consumer_attributes(msg, "billing", "message-id") == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 41,
        "messaging.consumer.group.name": "billing",
        "messaging.kafka.message.key": "order-7",
        "messaging.message.id": "id-7",
        "streamer.attempt": 2,
    }


def test_a_key_that_is_not_text_is_left_out_and_a_tombstone_is_flagged() -> None:
    attributes = consumer_attributes(record((), key=b"\xff\xfe", value=None), "g", "message-id")
    assert "messaging.kafka.message.key" not in attributes
    assert "messaging.message.id" not in attributes
    assert attributes["messaging.kafka.message.tombstone"] is True
    assert "streamer.attempt" not in attributes, "set from the first retry on"


def test_stamping_adds_the_context_to_records_except_those_that_set_it_themselves() -> None:
    mine = Record("out", b"v", headers=(("traceparent", b"mine"),))
    plain = Record("out", b"v", headers=(("a", b"1"),))
    context = (("traceparent", b"ctx"), ("tracestate", b"k=v"))
    assert stamped([plain, mine], context, {"traceparent", "tracestate"}) == [
        plain._replace(headers=(("a", b"1"), ("traceparent", b"ctx"), ("tracestate", b"k=v"))),
        mine,
    ]


def test_outside_a_span_there_is_no_context_to_inject() -> None:
    assert context_headers() == ()


# --- the middleware ---------------------------------------------------------------------------


def test_a_record_runs_in_a_consumer_span_that_continues_the_traceparent_of_its_headers(
    otel: Traced,
) -> None:
    seen: list[Any] = []

    def handle(msg: Message) -> None:
        seen.append(otel_trace.get_current_span().get_span_context())

    otel.chain(handle)(record((("traceparent", UPSTREAM), ("tracestate", b"vendor=1"))))
    span = otel.span()
    assert span.name == "process orders"
    assert span.kind is SpanKind.CONSUMER
    assert span.context.trace_id == TRACE_ID
    assert span.parent is not None
    assert span.parent.span_id == PARENT_ID
    assert span.parent.is_remote
    assert span.context.trace_state.get("vendor") == "1"
    assert span.attributes["messaging.destination.name"] == "orders"
    assert span.attributes["messaging.kafka.offset"] == 41
    assert span.status.status_code is StatusCode.UNSET
    assert seen == [span.context], "the span is not current inside the handler"
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN, "the context leaked out"


def test_a_record_without_a_traceparent_starts_a_trace(otel: Traced) -> None:
    otel.chain(lambda msg: None)(record(()))
    span = otel.span()
    assert span.parent is None
    assert span.context.trace_id != TRACE_ID


def test_records_the_handler_returns_carry_its_span_context_and_keep_a_traceparent_of_their_own(
    otel: Traced,
) -> None:
    own = traceparent(1, 2)

    def handle(msg: Message) -> list[Record]:
        return [
            Record("out", b"a", headers=(("x", b"1"),)),
            Record("out", b"b", headers=(("traceparent", own),)),
        ]

    first, second = otel.chain(handle)(record())  # type: ignore[misc]
    span = otel.span()
    assert parsed(dict(first.headers)["traceparent"]) == (TRACE_ID, span.context.span_id)
    assert dict(first.headers)["x"] == b"1"
    assert second.headers == (("traceparent", own),)


def test_a_single_record_returned_is_stamped_too(otel: Traced) -> None:
    (out,) = otel.chain(lambda msg: Record("out", b"a"))(record())  # type: ignore[misc]
    assert parsed(dict(out.headers)["traceparent"]) == (TRACE_ID, otel.span().context.span_id)


def test_a_handler_error_sets_the_status_records_the_exception_and_travels_to_the_dead_letter_copy(
    otel: Traced,
) -> None:
    def handle(msg: Message) -> None:
        raise PermanentError("negative amount")

    msg = record((("traceparent", UPSTREAM), ("keep", b"1")))
    with pytest.raises(PermanentError) as caught:
        otel.chain(handle)(msg)
    span = otel.span()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "PermanentError: negative amount"
    assert span.attributes["error.type"] == "streamer.errors.PermanentError"
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "streamer.errors.PermanentError"
    assert event.attributes["exception.message"] == "negative amount"

    carried = carried_headers(caught.value)
    assert parsed(dict(carried)["traceparent"]) == (TRACE_ID, span.context.span_id)
    headers = failure_headers(msg, caught.value, "billing", "w-1")
    assert [v for k, v in headers if k == "traceparent"] == [dict(carried)["traceparent"]]
    assert ("keep", b"1") in headers
    assert dict(headers)[H_ERROR_TYPE] == b"streamer.errors.PermanentError"


def test_a_failure_without_tracing_keeps_the_original_traceparent_in_the_dead_letter_copy() -> None:
    msg = record()
    headers = failure_headers(msg, ValueError("bad"), "billing", "w-1")
    assert [v for k, v in headers if k == "traceparent"] == [UPSTREAM]


def test_a_retry_is_an_event_on_the_span_of_the_attempt_that_failed(otel: Traced) -> None:
    def handle(msg: Message) -> None:
        raise RetryableError("payment service slow")

    chain = otel.chain(handle, retry(RetryPolicy(max_attempts=3, initial_backoff=0.5, jitter=0)))
    with pytest.raises(RetryRecord) as caught:
        chain(record())
    assert carried_headers(caught.value) == (), "a retry is no dead-letter write"
    span = otel.span()
    exception, retried = span.events
    assert exception.name == "exception"
    assert exception.attributes["exception.type"] == "streamer.errors.RetryableError"
    assert retried.name == "retry"
    assert dict(retried.attributes) == {
        "streamer.attempt": 1,
        "streamer.retry.delay_seconds": 0.5,
        "exception.type": "streamer.errors.RetryableError",
        "exception.message": "payment service slow",
    }
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "streamer.errors.RetryableError"


def test_a_dropped_record_is_an_event_and_not_an_error(otel: Traced) -> None:
    def handle(msg: Message) -> None:
        raise DropRecord("tombstone")

    with pytest.raises(DropRecord):
        otel.chain(handle)(record())
    span = otel.span()
    assert [e.name for e in span.events] == ["dropped"]
    assert span.status.status_code is StatusCode.UNSET


def test_an_async_handler_runs_in_its_span(otel: Traced) -> None:
    seen: list[Any] = []

    async def handle(msg: Message) -> Record:
        await asyncio.sleep(0)
        seen.append(otel_trace.get_current_span().get_span_context())
        return Record("out", b"v")

    chain = otel.chain(handle)
    (out,) = asyncio.run(chain(record()))  # type: ignore[arg-type]
    span = otel.span()
    assert seen == [span.context]
    assert span.context.trace_id == TRACE_ID
    assert parsed(dict(out.headers)["traceparent"]) == (TRACE_ID, span.context.span_id)


# --- the switch and the composition -----------------------------------------------------------


def settings(enabled: Any = "auto", **sections: Any) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": "127.0.0.1:9092", "group_id": "g"},
        tracing={"enabled": enabled},
        **sections,
    )


@pytest.fixture(autouse=True)
def _clean(clean_environment: None) -> None:
    """Keep STREAMER_* variables of the machine out of the settings built here."""


def test_auto_is_off_while_no_tracer_provider_is_set_and_on_once_one_is() -> None:
    assert tracing_on(TracingSettings()) is False
    with global_tracer_provider():
        assert tracing_on(TracingSettings()) is True
        assert tracing_on(TracingSettings(enabled=False)) is False
    assert tracing_on(TracingSettings()) is False


def test_true_turns_tracing_on_with_the_api_alone() -> None:
    assert tracing_on(TracingSettings(enabled=True)) is True


def test_with_tracing_on_the_trace_step_is_the_outermost_builtin() -> None:
    s = settings(True, topics={"orders": {"decoder": "json", "timeout_seconds": 2.5}})
    kinds = [m.__qualname__.split(".")[0] for m in builtin_middlewares("orders", s)]
    assert kinds == list(DEFAULT_ORDER) == ["trace", "decode", "retry", "timeout"]
    assert [m.__qualname__.split(".")[0] for m in builtin_middlewares("orders", settings(False))] == ["retry"]


def test_chain_runner_under_a_global_provider_traces_and_parks_with_the_span_context() -> None:
    app = App()

    @app.handler("orders")
    def handle(msg: Message) -> None:
        raise RetryableError("payment service slow")

    with global_tracer_provider() as exporter:
        runner = ChainRunner(app, "orders", settings(retry={"max_attempts": 2, "initial_backoff": 0}))
        outcome = runner.run(message(b"{}", headers=(("traceparent", UPSTREAM),)))
    assert outcome.dead_lettered
    first, second = consumer_spans(exporter, "orders")
    assert [e.name for e in first.events] == ["exception", "retry"]
    assert second.attributes["streamer.attempt"] == 2
    assert {first.context.trace_id, second.context.trace_id} == {TRACE_ID}
    assert parsed((outcome.header("traceparent") or "").encode()) == (TRACE_ID, second.context.span_id)


# --- logs -------------------------------------------------------------------------------------


def test_the_log_processor_adds_the_ids_of_the_current_span_and_nothing_outside_one() -> None:
    add = trace_context()
    provider, _ = sdk_provider()
    assert add(None, "info", {"event": "x"}) == {"event": "x"}
    with provider.get_tracer("t").start_as_current_span("s") as span:
        ids = span.get_span_context()
        event = add(None, "info", {"event": "x"})
    assert event == {"event": "x", "trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}"}


def test_a_structlog_line_inside_a_handler_carries_the_ids(otel: Traced) -> None:
    lines: list[dict[str, Any]] = []

    def keep(_logger: Any, _name: str, event: Any) -> Any:
        lines.append(dict(event))
        raise structlog.DropEvent

    def handle(msg: Message) -> None:
        structlog.get_logger("app").info("inside the handler")

    previous = structlog.get_config()
    structlog.configure(processors=[trace_context(), keep])
    try:
        otel.chain(handle)(record())
    finally:
        structlog.configure(**previous)
    span = otel.span()
    assert lines == [
        {
            "event": "inside the handler",
            "trace_id": f"{TRACE_ID:032x}",
            "span_id": f"{span.context.span_id:016x}",
        }
    ]


# --- without opentelemetry --------------------------------------------------------------------

WITHOUT_OTEL = textwrap.dedent(
    """
    import sys
    sys.modules["opentelemetry"] = None  # as if streamer[otel] were not installed

    from streamer import App, Message, Record
    from streamer.errors import ConfigError
    from streamer.logs import configure_logging
    from streamer.settings import load_settings
    from streamer.testing import ChainRunner, MemorySource, message
    from streamer.worker import EXIT_OK, Worker

    app = App()

    @app.handler("t")
    def handle(msg: Message) -> Record:
        return Record("out", msg.value)

    cfg = load_settings(kafka={"bootstrap_servers": "in-memory", "group_id": "g"}, metrics={"enabled": False})
    configure_logging("WARNING")
    outcome = ChainRunner(app, "t", cfg).run(message(b"v", headers=(("traceparent", b"x"),)))
    assert outcome.handled and outcome.outputs == [Record("out", b"v")], outcome
    quiet = App()
    quiet.handler("t")(lambda msg: None)
    source = MemorySource({"t": [[b"a", b"b"]]})
    assert Worker(cfg, quiet.chains(cfg), source=source, until_end=True).run() == EXIT_OK
    try:
        app.chains(load_settings(kafka=cfg.kafka.model_dump(), tracing={"enabled": True}))
    except ConfigError as exc:
        print(exc)
    assert not any(name.startswith("opentelemetry") for name in sys.modules if sys.modules[name] is not None)
    """
)


def test_streamer_runs_without_opentelemetry_and_true_asks_for_the_extra() -> None:
    env_free = {k: v for k, v in __import__("os").environ.items() if not k.startswith("STREAMER_")}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env_free,
    )
    assert done.returncode == 0, done.stderr
    assert "tracing.enabled = true" in done.stdout
    assert "pip install 'streamer[otel]'" in done.stdout


def test_true_without_the_extra_is_a_config_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigError, match=r"tracing\.enabled = true.*pip install 'streamer\[otel\]'"):
        tracing_on(TracingSettings(enabled=True))
    assert tracing_on(TracingSettings()) is False

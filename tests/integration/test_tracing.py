"""Tracing against the real broker: the trace context travels producer -> worker -> output ->
worker, onto dead-letter copies and into log lines; retries are span events.

Workers run in this process until their topics' end offsets, under an SDK TracerProvider with an
in-memory exporter set globally (``[tracing] enabled = "auto"`` then composes the trace
middleware at start-up, as in production); the test's own "producer" span is the trace's root.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import structlog
from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from streamer import App, Message, PermanentError, Record, RetryableError
from streamer.exitcodes import EXIT_OK
from streamer.runner import run_worker
from streamer.settings import Settings, load_settings
from streamer.worker import Worker
from tests.conftest import TopicFactory
from tests.support.kafka import delete_topics, read_all
from tests.support.tracing import consumer_spans, global_tracer_provider, parsed

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 60.0
ID = "message-id"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory SDK provider set globally for the test (and unset after it)."""
    with global_tracer_provider() as exporter:
        yield exporter


def worker_settings(bootstrap: str, group: str, **sections: Any) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": group},
        metrics={"enabled": False},
        **sections,
    )


def produce_traced(bootstrap: str, topic: str, count: int) -> ReadableSpan:
    """Produce ``count`` records to partition 0 of ``topic`` inside one producer span, each with
    its traceparent and a message id; return that span, finished."""
    tracer = trace.get_tracer("tests")
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    errors: list[KafkaError] = []
    with tracer.start_as_current_span(f"send {topic}", kind=SpanKind.PRODUCER) as span:
        for i in range(count):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            headers = [(ID, str(i).encode()), *((k, v.encode()) for k, v in carrier.items())]
            producer.produce(
                topic,
                value=json.dumps({"id": i}).encode(),
                key=f"k-{i}".encode(),
                partition=0,
                headers=headers,
                on_delivery=lambda err, _m: errors.append(err) if err is not None else None,
            )
        assert producer.flush(30) == 0, "records to the source topic still undelivered after 30 s"
    assert not errors, errors
    assert isinstance(span, ReadableSpan)
    return span


def headers_of(raw: KafkaMessage, name: str) -> list[bytes | None]:
    return [value for key, value in raw.headers() or [] if key == name]


def by_id(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    """Consumer spans by the message id of their record."""
    return {str((s.attributes or {})["messaging.message.id"]): s for s in spans}


def parent_of(span: ReadableSpan) -> tuple[int, int]:
    assert span.parent is not None, f"{span.name} has no parent"
    return span.parent.trace_id, span.parent.span_id


def ids_of(span: ReadableSpan) -> tuple[int, int]:
    return span.context.trace_id, span.context.span_id


@pytest.mark.parametrize("concurrency", [1, 4], ids=["serial", "concurrent"])
def test_the_trace_goes_on_from_producer_to_worker_to_its_output_to_the_next_worker(
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    group_id: str,
    spans: InMemorySpanExporter,
    concurrency: int,
) -> None:
    source, middle = topic_factory(1), topic_factory(1)
    sent = produce_traced(kafka_bootstrap, source, 3)
    first = App()

    def forward(msg: Message) -> Record:
        return Record(middle, msg.value, key=msg.key)

    async def forward_async(msg: Message) -> Record:
        return forward(msg)

    first.handler(source)(forward if concurrency == 1 else forward_async)
    cfg = worker_settings(kafka_bootstrap, f"{group_id}-1", processing={"concurrency": concurrency})
    assert Worker(cfg, first.chains(cfg), until_end=True).run() == EXIT_OK

    second = App()
    seen: list[tuple[str, int]] = []

    @second.handler(middle)
    def consume(msg: Message) -> None:
        seen.append(((msg.header(ID) or b"").decode(), trace.get_current_span().get_span_context().span_id))

    cfg = worker_settings(kafka_bootstrap, f"{group_id}-2")
    assert Worker(cfg, second.chains(cfg), until_end=True).run() == EXIT_OK

    hop1, hop2 = by_id(consumer_spans(spans, source)), by_id(consumer_spans(spans, middle))
    assert sorted(hop1) == sorted(hop2) == ["0", "1", "2"]
    produced = read_all(kafka_bootstrap, middle, 3, timeout=READ_TIMEOUT_S)
    outputs = {(headers_of(raw, ID)[0] or b"").decode(): raw for raw in produced}
    for record_id, span in hop1.items():
        # Worker 1's span is a child of the test's producer span ...
        assert span.kind is SpanKind.CONSUMER
        assert parent_of(span) == ids_of(sent)
        assert span.attributes is not None
        assert span.attributes["messaging.consumer.group.name"] == f"{group_id}-1"
        assert span.attributes["messaging.destination.name"] == source
        assert span.attributes["messaging.destination.partition.id"] == "0"
        assert span.attributes["messaging.kafka.offset"] == int(record_id)
        assert span.attributes["messaging.kafka.message.key"] == f"k-{record_id}"
        # ... its output carries its context ...
        (header,) = headers_of(outputs[record_id], "traceparent")
        assert parsed(header) == ids_of(span)
        # ... and worker 2's span is a child of worker 1's, in the producer's trace.
        assert parent_of(hop2[record_id]) == ids_of(span)
        assert hop2[record_id].context.trace_id == sent.context.trace_id
    assert sorted(seen) == sorted((i, s.context.span_id) for i, s in hop2.items()), "span not current"


def test_a_retried_record_has_a_span_per_attempt_and_the_retry_as_an_event(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str, spans: InMemorySpanExporter
) -> None:
    source = topic_factory(1)
    sent = produce_traced(kafka_bootstrap, source, 1)
    app = App()

    @app.handler(source)
    def flaky(msg: Message) -> None:
        if msg.attempt == 1:
            raise RetryableError("payment service slow")

    cfg = worker_settings(kafka_bootstrap, group_id, retry={"initial_backoff": 0.05, "jitter": 0})
    worker = Worker(cfg, app.chains(cfg), until_end=True)
    assert worker.run() == EXIT_OK
    assert worker.stats.retries == 1
    failed, succeeded = consumer_spans(spans, source)
    assert [e.name for e in failed.events] == ["exception", "retry"]
    retry = failed.events[1].attributes
    assert retry is not None
    assert retry["streamer.attempt"] == 1
    assert retry["streamer.retry.delay_seconds"] == pytest.approx(0.05)
    assert retry["exception.type"] == "streamer.errors.RetryableError"
    assert failed.status.status_code is StatusCode.ERROR
    assert succeeded.status.status_code is StatusCode.UNSET
    assert succeeded.events == ()
    assert (succeeded.attributes or {})["streamer.attempt"] == 2
    assert parent_of(failed) == parent_of(succeeded) == ids_of(sent)


def test_a_dead_lettered_record_carries_the_context_of_the_span_it_failed_in(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str, spans: InMemorySpanExporter
) -> None:
    source = topic_factory(1)
    dlq = f"{source}.dlq"
    sent = produce_traced(kafka_bootstrap, source, 1)
    app = App()

    @app.handler(source)
    def reject(msg: Message) -> None:
        raise PermanentError("negative amount")

    try:
        cfg = worker_settings(kafka_bootstrap, group_id, dead_letter={"enabled": True})
        worker = Worker(cfg, app.chains(cfg), until_end=True)
        assert worker.run() == EXIT_OK
        assert worker.stats.dead_lettered == 1
        (span,) = consumer_spans(spans, source)
        assert span.status.status_code is StatusCode.ERROR
        assert [e.name for e in span.events] == ["exception"]
        assert (span.attributes or {})["error.type"] == "streamer.errors.PermanentError"
        (parked,) = read_all(kafka_bootstrap, dlq, 1, timeout=READ_TIMEOUT_S)
        (header,) = headers_of(parked, "traceparent")  # in place of the original's
        assert parsed(header) == ids_of(span)
        assert span.context.trace_id == sent.context.trace_id
    finally:
        delete_topics(kafka_bootstrap, [dlq])


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog's and the root logger's configuration back after run_worker changed them."""
    config, root = structlog.get_config(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_a_log_line_inside_a_handler_carries_the_trace_and_span_ids(
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    group_id: str,
    spans: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = topic_factory(1)
    sent = produce_traced(kafka_bootstrap, source, 1)
    app = App()

    @app.handler(source)
    def handle(msg: Message) -> None:
        structlog.get_logger("orders").info("inside the handler")
        logging.getLogger("orders.stdlib").warning("stdlib line inside the handler")

    cfg = worker_settings(kafka_bootstrap, group_id)
    assert run_worker(app, cfg, until_end=True, progress=False) == EXIT_OK
    (span,) = consumer_spans(spans, source)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    inside = [line for line in lines if "inside the handler" in line["event"]]
    assert len(inside) == 2, lines
    for line in inside:
        assert line["trace_id"] == f"{sent.context.trace_id:032x}"
        assert line["span_id"] == f"{span.context.span_id:016x}"
    assert not any("trace_id" in line for line in lines if line not in inside), "ids outside a span"

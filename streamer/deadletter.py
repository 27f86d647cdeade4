"""The dead-letter topic: where a record that cannot be processed is parked, bytes intact.

A parked record keeps its original key, value and headers (so its idempotency key survives a
replay) and gains ``streamer.*`` headers that say what failed, where and when. The worker commits
past a parked record only after the broker acknowledged the dead-letter write (acks=all,
idempotent producer).

A record the dead-letter topic refuses for its size or content (larger than the producer's
``message.max.bytes`` or the topic's ``max.message.bytes``; ``MSG_SIZE_TOO_LARGE``,
``RECORD_LIST_TOO_LARGE``, ``INVALID_RECORD``) is parked as a *reference*: the same failure
headers (which name its topic, partition and offset), no value, and ``streamer.value.omitted``
saying why; its key and original headers too when they fit, else ``streamer.key.omitted`` /
``streamer.headers.omitted``. ``streamer dlq replay`` reads the original bytes back from the
source topic. Retrying such a write could never succeed, and would hold every partition.

How a failed write is classified (``classify``): transient errors (timeouts, leaders moving, a
missing topic) raise DeadLetterUnavailableError and the worker retries; errors no retry and no
reference can cure (authorization, an invalid topic) raise DeadLetterRejectedError, which names
the topic, the record and the broker's reason, so the worker stops with it instead of hanging.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer

from streamer.errors import StreamerError
from streamer.message import Headers, Message
from streamer.tracing import carried_headers

log = structlog.get_logger("streamer.deadletter")

#: Headers added to a parked record.
H_ERROR_TYPE = "streamer.error.type"
H_ERROR_MESSAGE = "streamer.error.message"
H_TOPIC = "streamer.original.topic"
H_PARTITION = "streamer.original.partition"
H_OFFSET = "streamer.original.offset"
H_TIMESTAMP = "streamer.original.timestamp"
H_ATTEMPTS = "streamer.attempts"
H_GROUP = "streamer.group"
H_WORKER = "streamer.worker"
H_FAILED_AT = "streamer.failed_at"
FAILURE_HEADERS = (
    H_ERROR_TYPE,
    H_ERROR_MESSAGE,
    H_TOPIC,
    H_PARTITION,
    H_OFFSET,
    H_TIMESTAMP,
    H_ATTEMPTS,
    H_GROUP,
    H_WORKER,
    H_FAILED_AT,
)
#: Headers of a reference record: why its value (key, original headers) is not in it.
H_VALUE_OMITTED = "streamer.value.omitted"
H_KEY_OMITTED = "streamer.key.omitted"
H_HEADERS_OMITTED = "streamer.headers.omitted"
REFERENCE_HEADERS = (H_VALUE_OMITTED, H_KEY_OMITTED, H_HEADERS_OMITTED)
_MAX_MESSAGE = 2000
#: librdkafka's default message.max.bytes.
_DEFAULT_MAX_BYTES = 1_000_000
#: Bytes a record's framing may add beyond its key, value and headers (a generous bound).
_FRAMING = 512


class Disposition(enum.Enum):
    """What a failed dead-letter write calls for."""

    #: Try again later: the broker or the topic may come back (the worker pauses meanwhile).
    RETRY = "retry"
    #: The record itself is refused (size, content): park a reference to it instead.
    REFERENCE = "reference"
    #: Nothing written to this topic can succeed (authorization, an invalid topic): stop.
    REJECT = "reject"


#: Errors caused by the record's size or content: the same bytes will always be refused.
_RECORD_ERRORS = frozenset(
    (
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG_SIZE,
    )
)
#: Permanent errors no record would escape: retrying or writing a reference cannot help.
_REJECTING_ERRORS = frozenset(
    (
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.INVALID_REQUIRED_ACKS,
    )
)


def classify(error: KafkaError) -> Disposition:
    """What a failed dead-letter write with ``error`` calls for; errors not known to be permanent retry."""
    code = error.code()
    if code in _RECORD_ERRORS:
        return Disposition.REFERENCE
    if code in _REJECTING_ERRORS:
        return Disposition.REJECT
    return Disposition.RETRY


class DeadLetterUnavailableError(StreamerError):
    """The dead-letter topic could not be written; the worker retries and commits nothing past it."""


class DeadLetterRejectedError(StreamerError):
    """The dead-letter topic refuses the record for good (authorization, size): it cannot be parked.

    Neither the record nor a reference to it can be written; retrying cannot help. The message
    names the dead-letter topic, the record's coordinates and the broker's reason.
    """

    def __init__(self, dead_letter_topic: str, msg: Message, reason: str) -> None:
        super().__init__(
            f"dead-letter topic {dead_letter_topic!r} refuses {msg.topic}[{msg.partition}]@{msg.offset} "
            f"for good: {reason}"
        )
        self.dead_letter_topic = dead_letter_topic
        self.topic = msg.topic
        self.partition = msg.partition
        self.offset = msg.offset
        self.reason = reason


class DeadLetterSink(Protocol):
    """Where parked records go (a Kafka topic, or an in-memory twin in tests)."""

    def park(self, msg: Message, error: BaseException, dlq_topic: str, group: str, worker: str) -> None:
        """Write ``msg`` to ``dlq_topic`` and return once it is durably acknowledged."""
        ...


def failure_headers(msg: Message, error: BaseException, group: str, worker: str) -> Headers:
    """The original headers plus the ``streamer.*`` headers describing the failure.

    With tracing on, the trace context of the span the record failed in replaces the original's
    (``traceparent``, ``tracestate``): the dead-letter copy continues the record's trace.
    """
    traced = carried_headers(error)
    replaced = {name for name, _ in traced}
    cause = error.__cause__ if error.__cause__ is not None else error
    text = str(error)[:_MAX_MESSAGE]
    added = [
        (H_ERROR_TYPE, f"{type(cause).__module__}.{type(cause).__qualname__}"),
        (H_ERROR_MESSAGE, text),
        (H_TOPIC, msg.topic),
        (H_PARTITION, str(msg.partition)),
        (H_OFFSET, str(msg.offset)),
        (H_TIMESTAMP, "" if msg.timestamp is None else str(msg.timestamp)),
        (H_ATTEMPTS, str(msg.attempt)),
        (H_GROUP, group),
        (H_WORKER, worker),
        (H_FAILED_AT, f"{time.time():.3f}"),
    ]
    kept = tuple(
        (k, v)
        for k, v in msg.headers
        if k not in FAILURE_HEADERS and k not in REFERENCE_HEADERS and k not in replaced
    )
    return kept + traced + tuple((k, v.encode()) for k, v in added)


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """Bytes of a record's key, value and headers (names and values), as message.max.bytes counts them."""
    return (
        len(key or b"")
        + len(value or b"")
        + sum(len(name.encode()) + len(data or b"") for name, data in headers)
    )


def references(
    msg: Message, headers: Headers, error: KafkaError, max_bytes: int
) -> Iterator[tuple[bytes | None, Headers]]:
    """Key and headers of the reference records to try, fullest first, for ``msg`` refused with ``error``.

    ``headers`` are the failure headers of the refused write. The first keeps the key and the
    original headers, or the original headers alone when the key would not fit in ``max_bytes``
    (the producer's limit; the topic's is learnt from its refusal); the last keeps only streamer's
    failure headers. Each says what it omits and why.
    """
    size = record_size(msg.key, msg.value, headers)
    omitted = ((H_VALUE_OMITTED, f"{error.name()}: {size} bytes ({error.str()})".encode()),)
    key_note: Headers = ()
    if msg.key is not None:
        key_note = ((H_KEY_OMITTED, f"{error.name()}: key of {len(msg.key)} bytes".encode()),)
    failure_only = tuple(h for h in headers if h[0] in FAILURE_HEADERS)
    originals = len(headers) - len(failure_only)
    headers_note: Headers = ()
    if originals:
        headers_note = ((H_HEADERS_OMITTED, f"{error.name()}: {originals} original headers".encode()),)
    full = (*headers, *omitted)
    smallest = (None, (*failure_only, *omitted, *key_note, *headers_note))
    first: tuple[bytes | None, Headers] | None = None
    if record_size(msg.key, None, full) + _FRAMING <= max_bytes:
        first = (msg.key, full)
    elif record_size(None, None, (*full, *key_note)) + _FRAMING <= max_bytes:
        first = (None, (*full, *key_note))
    if first is not None:
        yield first
    if first != smallest:
        yield smallest


class KafkaDeadLetterSink:
    """Parks records in Kafka with an idempotent, acks=all producer; one flush per parked record."""

    def __init__(
        self,
        connection: dict[str, Any],
        timeout: float = 10.0,
        *,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
        shared: bool = False,
    ) -> None:
        #: The producer belongs to someone else (exactly-once: the worker's transactional one):
        #: never closed or replaced here.
        self._shared = shared
        self._config = {
            **connection,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 0,
            "message.timeout.ms": int(timeout * 1000),
            "logger": logging.getLogger("streamer.librdkafka"),
        }
        self._factory = producer_factory
        self._producer = producer_factory(self._config)
        self._timeout = timeout
        self._max_bytes = int(connection.get("message.max.bytes", _DEFAULT_MAX_BYTES))

    def park(self, msg: Message, error: BaseException, dlq_topic: str, group: str, worker: str) -> None:
        """Write ``msg`` (or a reference to it) to ``dlq_topic`` and return once it is acknowledged.

        Raises DeadLetterUnavailableError when the write may succeed later, DeadLetterRejectedError
        when neither the record nor a reference to it can ever be written.
        """
        headers = failure_headers(msg, error, group, worker)
        refused = self._write(dlq_topic, msg.key, msg.value, headers)
        if refused is None:
            return
        self._unless_referable(refused, dlq_topic, msg)
        last = refused
        for key, reference in references(msg, headers, refused, self._max_bytes):
            failed = self._write(dlq_topic, key, None, reference)
            if failed is None:
                log.warning(
                    "dead-letter topic refused the record; parked a reference to it instead",
                    topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                    dead_letter_topic=dlq_topic,
                    reason=header_text(reference, H_VALUE_OMITTED),
                    key_kept=key is not None,
                )
                return
            self._unless_referable(failed, dlq_topic, msg)
            last = failed
        raise DeadLetterRejectedError(
            dlq_topic, msg, f"{refused.str()}, and a reference to it too: {last.str()}"
        )

    def _write(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> KafkaError | None:
        """Write one record and wait for it: None once acknowledged, else the error that refused it.

        Raises DeadLetterUnavailableError when no verdict came (nothing acknowledged in time).
        """
        outcome: list[KafkaError | None] = []
        try:
            self._producer.produce(
                topic,
                key=key,
                value=value,
                headers=list(headers),
                on_delivery=lambda err, _m: outcome.append(err),
            )
        except BufferError as exc:
            raise DeadLetterUnavailableError(f"cannot write to {topic}: {exc}") from exc
        except KafkaException as exc:
            # Refused before sending, e.g. larger than message.max.bytes: classified like a broker's no.
            if exc.args and isinstance(exc.args[0], KafkaError):
                return exc.args[0]
            raise DeadLetterUnavailableError(f"cannot write to {topic}: {exc}") from exc
        # Wait past message.timeout.ms: then librdkafka has reported the delivery either way, and a
        # retry never writes a second copy of a record whose first write did land.
        self._producer.flush(self._timeout + 5)
        if not outcome:
            raise DeadLetterUnavailableError(f"no acknowledgement from {topic} within {self._timeout} s")
        return outcome[0]

    def _unless_referable(self, refused: KafkaError, dlq_topic: str, msg: Message) -> None:
        """Return if a reference may succeed where ``refused`` failed; else raise what the error calls for."""
        if refused.fatal() and self._shared:
            raise DeadLetterUnavailableError(f"cannot write to {dlq_topic}: {refused.str()}")
        if refused.fatal():
            # An idempotent producer with a fatal error refuses every later write: start afresh.
            self._producer.close()
            self._producer = self._factory(self._config)
            raise DeadLetterUnavailableError(f"cannot write to {dlq_topic}: {refused.str()} (new producer)")
        disposition = classify(refused)
        if disposition is Disposition.REFERENCE:
            return
        if disposition is Disposition.REJECT:
            raise DeadLetterRejectedError(dlq_topic, msg, f"{refused.name()}: {refused.str()}")
        raise DeadLetterUnavailableError(f"cannot write to {dlq_topic}: {refused.str()}")

    def close(self) -> None:
        """Flush anything outstanding."""
        self._producer.flush(self._timeout)


class MemoryDeadLetterSink:
    """An in-memory twin: keeps what was parked, for unit tests and plugin authors."""

    def __init__(self) -> None:
        self.parked: list[tuple[str, Message, Headers]] = []

    def park(self, msg: Message, error: BaseException, dlq_topic: str, group: str, worker: str) -> None:
        """Remember the parked record and its headers."""
        self.parked.append((dlq_topic, msg, failure_headers(msg, error, group, worker)))


def header_text(headers: Sequence[tuple[str, bytes | None]], name: str) -> str | None:
    """The value of header ``name`` decoded as UTF-8, or None."""
    for key, value in reversed(headers):
        if key == name:
            return None if value is None else value.decode("utf-8", "replace")
    return None

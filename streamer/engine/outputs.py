"""Outputs: the records handlers emit, sent through one producer per worker.

At-least-once (the default): an idempotent producer (acks=all). An input counts as finished only
once every output it emitted was acknowledged, so a commit never passes an input whose output
is not on the broker. Serial dispatch lands a poll batch's outputs with one flush before it
publishes the batch's watermarks; concurrent dispatch awaits each input's acknowledgements in
its lane. A delivery that fails (librdkafka retried it until ``output_timeout_seconds``, or the
broker refused it for good) fails its input, which is parked like any failed record.

Exactly-once: the producer is transactional. The outputs and dead-letter writes of everything
since the last checkpoint are one transaction, committed together with the input offsets
(``send_offsets_to_transaction`` with the consumer's group metadata, KIP-447), so the group's
generation fences a zombie. The processing thread holds the ``TransactionGate`` while it has
emitted outputs whose inputs are not yet published; the checkpoint closes the gate, so a
transaction never holds the output of an input its offsets do not cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from streamer.engine.partition import TP
from streamer.errors import StreamerError
from streamer.message import Message
from streamer.record import Record, encode_value
from streamer.stats import WorkerStats

log = structlog.get_logger("streamer.outputs")


class OutputDeliveryError(StreamerError):
    """An output of the record was not acknowledged: the record failed (it is parked)."""


class TransactionFailedError(StreamerError):
    """The transaction was aborted or the producer fenced: the worker stops without committing.

    Its restart resumes at the last committed offsets, which is the rewind: the aborted outputs
    are invisible to read_committed readers, and the inputs behind them run again.
    """


class _Ticket:
    """The outputs of one input still unacknowledged, and the first delivery error among them."""

    __slots__ = ("done", "error", "failures", "left", "msg", "records")

    def __init__(
        self, msg: Message, records: Sequence[Record], done: Callable[[str | None], None] | None
    ) -> None:
        self.msg = msg
        self.records = records
        self.left = len(records)
        self.failures = 0
        self.error: str | None = None
        self.done = done


class Outputs:
    """One producer per worker: sends outputs, tracks their acknowledgements, runs transactions."""

    def __init__(
        self,
        config: Mapping[str, Any],
        stats: WorkerStats,
        *,
        key_header: str,
        transactional_id: str | None = None,
        timeout_s: float = 120.0,
        buffer: int = 100_000,
        transaction_timeout_s: float = 60.0,
        errors_only: bool = False,
    ) -> None:
        conf: dict[str, Any] = {
            **config,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "queue.buffering.max.messages": buffer,
            "delivery.timeout.ms": int(timeout_s * 1000),
        }
        #: Serial dispatch waits for all outputs with one flush per landing: librdkafka then
        #: reports failed deliveries only, and a successful output costs no Python callback.
        self._errors_only = errors_only
        if errors_only:
            conf["delivery.report.only.error"] = True
        #: errors_only: outputs sent since the last flush, by topic; when that window opened.
        self._unflushed: dict[str, int] = {}
        self._window_start: float | None = None
        if transactional_id is not None:
            conf["transactional.id"] = transactional_id
            conf["transaction.timeout.ms"] = int(transaction_timeout_s * 1000)
            # librdkafka: an output may not outlive the transaction it belongs to.
            conf["delivery.timeout.ms"] = min(conf["delivery.timeout.ms"], conf["transaction.timeout.ms"])
        self._producer = Producer(conf)
        self._stats = stats
        self._key_header = key_header
        self._lock = threading.Lock()
        self._failed: list[_Ticket] = []
        self._config = conf
        #: Concurrent dispatch resends a failed input's outputs alone on a producer of their own.
        self._resender: Producer | None = None
        self._resend_lock = threading.Lock()
        self.transactional = transactional_id is not None
        self.gate = TransactionGate()
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        if self.transactional:
            self._producer.init_transactions(30.0)
            self._producer.begin_transaction()
            self._txn_started = time.monotonic()

    @property
    def producer(self) -> Producer:
        """The producer itself (exactly-once: the dead-letter sink writes inside the transaction)."""
        return self._producer

    def start(self) -> None:
        """Serve delivery reports on a thread of their own (concurrent dispatch awaits them;
        serial dispatch's flushes serve its error reports, and a thread would only contend for
        the interpreter)."""
        if self._errors_only:
            return
        self._poller = threading.Thread(target=self._poll, name="streamer-outputs", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    # -- sending ----------------------------------------------------------------------------------

    def send(
        self, msg: Message, records: Sequence[Record], done: Callable[[str | None], None] | None = None
    ) -> None:
        """Produce ``msg``'s outputs. ``done(error)`` runs once all are acknowledged (any thread);
        without it, failures wait for the next ``flush``."""
        self._send(self._producer, _Ticket(msg, records, done))

    def _send(self, producer: Producer, ticket: _Ticket) -> None:
        msg, records = ticket.msg, ticket.records
        # The input's idempotency key, or its coordinates: what a downstream dedup keys on.
        inherited = (msg.header(self._key_header) if self._key_header else None) or (
            f"{msg[0]}/{msg[1]}/{msg[2]}".encode()
        )
        for i, record in enumerate(records):
            headers = list(record.headers)
            if self._key_header and not any(name == self._key_header for name, _ in headers):
                # Each output of an input gets an id of its own that a replay reproduces.
                headers.append((self._key_header, inherited if i == 0 else inherited + b"/%d" % i))
            key = record.key.encode() if isinstance(record.key, str) else record.key
            if self._errors_only:
                report = partial(self._refused, ticket, record.topic)
                unflushed = self._unflushed
                unflushed[record.topic] = unflushed.get(record.topic, 0) + 1
                if self._window_start is None:
                    self._window_start = time.monotonic()
            else:
                report = partial(self._delivered, ticket, record.topic, time.monotonic())
            self._produce(producer, record, key, headers, report)

    def _produce(
        self, producer: Producer, record: Record, key: bytes | None, headers: list[Any], report: Any
    ) -> None:
        value = encode_value(record.value)
        while True:
            try:
                if record.partition is None:
                    producer.produce(record.topic, value, key, headers=headers, on_delivery=report)
                else:
                    producer.produce(
                        record.topic, value, key, record.partition, headers=headers, on_delivery=report
                    )
            except BufferError:
                # The producer holds output_buffer unacknowledged outputs: wait for room.
                self._stats.output_waits += 1
                producer.poll(0.05)
            else:
                return

    def _delivered(self, ticket: _Ticket, topic: str, sent: float, err: KafkaError | None, _m: Any) -> None:
        stats = self._stats
        if err is None:
            stats.outputs[topic] = stats.outputs.get(topic, 0) + 1
            stats.output_seconds.observe(time.monotonic() - sent)
        else:
            ticket.failures += 1
            if ticket.error is None:
                ticket.error = f"output to {topic!r} failed: {err.name()}: {err.str()}"
        with self._lock:
            ticket.left -= 1
            if ticket.left:
                return
            if ticket.done is None and ticket.error is not None:
                self._failed.append(ticket)
        if ticket.done is not None:
            ticket.done(ticket.error)

    def _refused(self, ticket: _Ticket, topic: str, err: KafkaError, _m: Any) -> None:
        """errors_only: librdkafka reports a failed delivery (successes are not reported)."""
        with self._lock:
            ticket.failures += 1
            self._unflushed[topic] -= 1
            if ticket.error is None:
                ticket.error = f"output to {topic!r} failed: {err.name()}: {err.str()}"
                self._failed.append(ticket)

    def _flushed(self) -> None:
        """errors_only: every output sent is reported: count the acknowledged ones."""
        stats = self._stats
        with self._lock:
            unflushed, self._unflushed = self._unflushed, {}
        for topic, count in unflushed.items():
            stats.outputs[topic] = stats.outputs.get(topic, 0) + count
        if self._window_start is not None:
            # One observation per flush: an upper bound of its outputs' delivery latency.
            stats.output_seconds.observe(time.monotonic() - self._window_start)
            self._window_start = None

    def _resend(self, producer: Producer, failed: _Ticket, stop: threading.Event) -> str | None:
        """Send a failed input's outputs again, alone on ``producer`` (its outputs may have failed
        only because a batchmate was refused, e.g. too large): None once acknowledged, else why not.
        """
        ticket = _Ticket(failed.msg, failed.records, None)
        self._send(producer, ticket)
        while producer.flush(0.2) and not stop.is_set():
            pass
        unacknowledged = len(producer) if self._errors_only else ticket.left
        if self._errors_only:
            self._flushed()
        with self._lock:
            if ticket in self._failed:
                self._failed.remove(ticket)
        if ticket.error is not None or unacknowledged:
            self._stats.output_errors += max(ticket.failures, 1)
            return ticket.error or "stopped before the outputs were acknowledged"
        return None

    def resend_alone(self, msg: Message, records: Sequence[Record], stop: threading.Event) -> str | None:
        """Concurrent dispatch: resend an input's failed outputs on a producer used for nothing else."""
        with self._resend_lock:
            if self._resender is None:
                self._resender = Producer({**self._config, "linger.ms": 0})
            return self._resend(self._resender, _Ticket(msg, records, None), stop)

    async def deliver(self, msg: Message, records: Sequence[Record]) -> str | None:
        """Send ``msg``'s outputs and wait for their acknowledgements; the first error, or None."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def done(error: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: the worker stopped
                loop.call_soon_threadsafe(_settle, future, error)

        self.send(msg, records, done)
        return await future

    def flush(self, stop: threading.Event) -> list[tuple[Message, str]]:
        """Wait until every output sent so far is acknowledged (or a stop); the inputs whose outputs
        failed, after one more try each, alone."""
        while self._producer.flush(0.2) and not stop.is_set():
            pass
        if self._errors_only:
            self._flushed()
        with self._lock:
            failed, self._failed = self._failed, []
        out = []
        for ticket in failed:
            error = self._resend(self._producer, ticket, stop)
            if error is not None:
                out.append((ticket.msg, error))
        return out

    @property
    def unacknowledged(self) -> int:
        """Outputs sent and not yet acknowledged."""
        return len(self._producer)

    # -- transactions ------------------------------------------------------------------------------

    def commit_transaction(
        self, offsets: Mapping[TP, int], metadata: Mapping[TP, str], group_metadata: Any, timeout: float
    ) -> None:
        """Commit the open transaction with ``offsets``, then open the next one.

        Raises TransactionFailedError when the transaction was aborted (an error that needs it,
        or retriable errors past ``timeout``) or the producer is fenced.
        """
        producer = self._producer
        tps = [TopicPartition(t, p, o, metadata=metadata.get((t, p))) for (t, p), o in offsets.items()]
        started = self._txn_started
        deadline = time.monotonic() + timeout
        # Each step is retried in place while its error is retriable: after a failed
        # commit_transaction librdkafka accepts nothing but commit_transaction again, so the
        # transaction either commits here or is aborted.
        for step in (
            lambda left: producer.send_offsets_to_transaction(tps, group_metadata, left),
            producer.commit_transaction,
        ):
            while True:
                try:
                    step(max(deadline - time.monotonic(), 0.1))
                    break
                except KafkaException as exc:
                    err = exc.args[0] if exc.args else None
                    if not isinstance(err, KafkaError) or err.fatal():
                        self._stats.transactions_aborted += 1
                        raise TransactionFailedError(
                            f"the transactional producer failed for good: {err}"
                        ) from exc
                    if err.retriable() and time.monotonic() < deadline:
                        continue
                    self._abort(err)
                    raise TransactionFailedError(f"transaction aborted: {err.name()}: {err.str()}") from exc
        now = time.monotonic()
        self._stats.transactions += 1
        self._stats.transaction_seconds.observe(now - started)
        producer.begin_transaction()
        self._txn_started = now

    def _abort(self, err: KafkaError) -> None:
        self._stats.transactions_aborted += 1
        log.error("aborting the transaction; the worker stops and its restart rewinds", error=err.str())
        with contextlib.suppress(KafkaException):
            self._producer.abort_transaction(10.0)

    def abort(self) -> None:
        """Abort the open transaction (the worker stops without committing it)."""
        if self.transactional:
            self._stats.transactions_aborted += 1
            with contextlib.suppress(KafkaException):
                self._producer.abort_transaction(10.0)

    def produce_raw(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Sequence[Any], report: Any
    ) -> None:
        """Produce one record as is (a dead-letter write inside the transaction)."""
        self._producer.produce(topic, value, key, headers=list(headers), on_delivery=report)

    def close(self) -> None:
        """Stop serving delivery reports and send what is queued (at-least-once) within 10 s."""
        self._closed.set()
        if self._poller is not None:
            self._poller.join(5.0)
        if not self.transactional:
            self._producer.flush(10.0)
        if self._resender is not None:
            self._resender.flush(10.0)


def _settle(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():
        future.set_result(error)


class TransactionGate:
    """Keeps a checkpoint's transaction commit out of a window of emitted, unpublished outputs.

    The processing thread ``enter``s before it emits and ``leave``s once the inputs behind those
    outputs are published; ``wanted`` asks it to leave soon. The loop's ``closed`` waits for it
    to leave and keeps it out while the transaction commits.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._inside = False
        self.wanted = False

    def enter(self) -> None:
        if self._inside:
            return
        with self._cv:
            self._cv.wait_for(lambda: not self.wanted)
            self._inside = True

    def leave(self) -> None:
        if not self._inside:
            return
        with self._cv:
            self._inside = False
            self._cv.notify_all()

    @contextlib.contextmanager
    def closed(self, timeout: float) -> Iterator[bool]:
        """Close the gate for the duration; yields False if the processing thread did not leave."""
        with self._cv:
            self.wanted = True
            ok = self._cv.wait_for(lambda: not self._inside, timeout)
        try:
            yield ok
        finally:
            with self._cv:
                self.wanted = False
                self._cv.notify_all()

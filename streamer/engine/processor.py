"""The processing thread: admission, dedup claim, handler chain, outcome and dedup mark.

It takes work from the loop (a poll batch, or a record whose retry is due) and runs records
through their topic's chain, one at a time, in fetch order — the serial dispatch, and the fast
path. It never touches the consumer: what the loop needs to know travels through each
partition's ``done_next`` watermark and a few events (a retry to schedule, an offset reset).
Waiting for a store that is down (dedup, dead-letter) happens here, between records, on a
timer that a stop request cuts short; the loop meanwhile keeps the worker in its group.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from streamer.chain import Handler
from streamer.deadletter import DeadLetterRejectedError, DeadLetterSink, DeadLetterUnavailableError
from streamer.dedup import ClaimStatus, DedupKey, DedupStage, StopDuringOutageError
from streamer.engine.outputs import OutputDeliveryError, Outputs
from streamer.engine.partition import TP, PartitionState
from streamer.errors import DropRecord, RecordFailed, RetryRecord
from streamer.highwater import HighWaterStore
from streamer.logs import current_record
from streamer.message import Message, message_from_kafka
from streamer.record import outputs_of
from streamer.stats import DeadLettered, TopicStats, WorkerStats, error_types

log = structlog.get_logger("streamer.processor")


@dataclass(frozen=True, slots=True)
class Retry:
    """A record whose next attempt is due: run it before anything after it in its partition."""

    msg: Message
    state: PartitionState
    key: DedupKey | None


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """Event: ``msg`` asked to run again after ``delay`` seconds; its partition waits for it."""

    retry: Retry
    delay: float


@dataclass(frozen=True, slots=True)
class RetrySettled:
    """Event: the retried record of ``state`` finished; its partition may fetch again."""

    state: PartitionState


@dataclass(frozen=True, slots=True)
class OffsetsReset:
    """Event: a record came below the partition's finished offsets (a reset, a recreated topic)."""

    state: PartitionState
    previous: int
    offset: int


@dataclass(frozen=True, slots=True)
class OffsetMapFull:
    """Event: ``state``'s map of finished offsets is at its limit (``full``) or has room again."""

    state: PartitionState
    full: bool


Event = RetryScheduled | RetrySettled | OffsetsReset | OffsetMapFull


def overran(topic_stats: TopicStats, elapsed: float) -> None:
    """Count and report an attempt that outlived its timeout (it could not be interrupted)."""
    topic_stats.overruns += 1
    log.warning(
        "handler ran past its timeout: it was blocked where the timeout cannot interrupt it "
        "(a call in C code, a coroutine that does not yield)",
        running_seconds=round(elapsed, 3),
        timeout_seconds=round(topic_stats.overrun_after - OVERRUN_GRACE_S, 3),
    )


#: Seconds past its timeout before an attempt counts as an overrun.
OVERRUN_GRACE_S = 0.5
#: Records of a poll batch whose claim the processor waits for before the first runs; the rest's
#: claim is sent along and read when they come up (Redis works on it while the first run).
CLAIM_FIRST = 64
#: Longest that finished records whose outputs were sent wait for one flush and publication.
LAND_EVERY_S = 0.1


def retry_text(attempt: int, retry: RetryRecord) -> str:
    """What the status page says of a failed attempt: its number, the backoff, the error's types."""
    cause = "" if retry.cause is None else f": {error_types(retry.cause)}"
    return f"attempt {attempt} failed, retry in {retry.delay:.3g} s{cause}"


class Batch(list[Any]):
    """A poll batch (raw confluent-kafka messages) and the partition states it was fetched under.

    Records are admitted against these states, not the current ones: a record fetched before a
    revoke never runs under the state of a later assignment of the same partition.
    """

    __slots__ = ("states",)

    def __init__(self, raws: list[Any], states: Mapping[TP, PartitionState]) -> None:
        super().__init__(raws)
        self.states = states


Work = Batch | Retry


class Processor:
    """Runs records through their chains on its own thread; the loop submits and collects."""

    def __init__(
        self,
        chains: Mapping[str, Handler],
        states: Mapping[TP, PartitionState],
        stats: WorkerStats,
        *,
        dedup: DedupStage | None = None,
        dead_letter: DeadLetterSink | None,
        dead_letter_topic: Callable[[str], str],
        highwater: HighWaterStore | None,
        group: str,
        worker_id: str,
        outputs: Outputs | None = None,
        outputs_factory: Callable[[], Outputs] | None = None,
    ) -> None:
        self._chains = dict(chains)
        #: The worker's producer for what handlers emit: given (exactly-once), else made by
        #: ``outputs_factory`` when a handler first returns a record.
        self.outputs = outputs
        self._outputs_factory = outputs_factory
        #: Outputs were sent since the last landing: what finished waits for their flush.
        self._emitted = False
        self._land_at = 0.0
        self._never = threading.Event()
        self._states = states  # the current assignment (high-water marks); batches carry their own
        self._stats = stats
        self._topic_stats: dict[str, TopicStats] = stats.topics
        self.dedup = dedup
        self._dead_letter = dead_letter
        self._dlq_topic = dead_letter_topic
        self._highwater = highwater
        self._group = group
        self._worker_id = worker_id
        self._inbox: deque[Work] = deque()
        self._cv = threading.Condition()
        #: Records submitted and not yet taken up (guarded by the condition): with the batch
        #: running, what is in flight.
        self._backlog = 0
        self._busy = False
        self._closed = False
        self._stop = threading.Event()
        #: Seconds the processing thread waited for work so far (what a commit may cost it).
        self.idle_seconds = 0.0
        self._flush_wanted = False
        #: What the loop reads back: events, the failure that stops the worker, the running record.
        self.events: deque[Event] = deque()
        self.failure: BaseException | None = None
        self.current: PartitionState | None = None
        self.current_key: DedupKey | None = None
        self.chain_started: float | None = None
        #: "dedup" or "dead-letter" while waiting for that store to come back.
        self.blocked: str | None = None
        self._thread = threading.Thread(target=self._run, name="streamer-processor", daemon=True)

    # -- the loop's side ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the processing thread."""
        self._thread.start()

    def submit(self, work: Work) -> None:
        """Queue a poll batch (raw confluent-kafka messages) or a due retry."""
        size = 1 if isinstance(work, Retry) else len(work)
        with self._cv:
            self._inbox.append(work)
            self._backlog += size
            self._cv.notify_all()

    @property
    def backlog(self) -> int:
        """Records queued behind the batch running (approximate outside the lock; for gating)."""
        return self._backlog

    def wait_room(self, limit: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for the backlog to drop below ``limit``; True if it did."""
        with self._cv:
            return self._cv.wait_for(lambda: self._backlog < limit or self._closed, timeout)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing queued."""
        return not self._busy and not self._inbox

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until nothing runs or is queued."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._busy and not self._inbox, timeout)

    def settle(self, states: Sequence[PartitionState], timeout: float) -> bool:
        """Before a revoke: land pending marks and wait until no record of ``states`` is running.

        Returns False if a record of theirs still runs after ``timeout`` (it keeps its dedup
        claim, which the loop keeps renewing, so a new owner waits for it).
        """
        revoked = set(map(id, states))
        with self._cv:
            self._flush_wanted = True
            self._cv.notify_all()
            return self._cv.wait_for(
                lambda: (
                    (not self._busy and not self._inbox)
                    or (not self._flush_wanted and id(self.current) not in revoked)
                ),
                timeout,
            )

    def lost(self, states: Sequence[PartitionState]) -> None:
        """Partitions lost without a handover (``revoked`` is set): serial dispatch skips them."""

    def stop(self) -> None:
        """Finish the record in hand, then run nothing more (queued work is dropped)."""
        self._stop.set()
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # -- the processing thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._inbox and not self._closed:
                    waited = time.monotonic()
                    self._cv.wait_for(lambda: bool(self._inbox) or self._closed)
                    self.idle_seconds += time.monotonic() - waited
                if self._stop.is_set() or not self._inbox:
                    self._inbox.clear()
                    self._backlog = 0
                    self._busy = False
                    self._cv.notify_all()
                    return
                work = self._inbox.popleft()
                self._backlog = max(self._backlog - (1 if isinstance(work, Retry) else len(work)), 0)
                self._busy = True
                self._cv.notify_all()  # room for the next batch: the loop hands it over now
            try:
                if isinstance(work, Retry):
                    self._retry(work)
                elif self.dedup is None:
                    self._batch(work)
                else:
                    self._batch_dedup(work, self.dedup)
            except StopDuringOutageError as stop:
                log.warning("stopping during an outage; only what finished counts", reason=str(stop))
            except BaseException as exc:  # noqa: BLE001 - anything else is a bug: stop the worker with it
                if self.failure is None:
                    self.failure = exc
                self._stop.set()
            finally:
                self.current = self.current_key = None
                if self._emitted and self.outputs is not None and not self.outputs.transactional:
                    # Left without landing (a failure): what is unpublished stays uncommitted.
                    # Exactly-once keeps the gate shut instead: the open transaction holds outputs
                    # of unpublished records, so it must never commit (it is aborted at the stop).
                    self._emitted = False
                    self.outputs.gate.leave()
                with self._cv:
                    self._busy = False
                    self._flush_wanted = False
                    self._cv.notify_all()
            if self.failure is not None:
                self.stop()

    def _admit(self, raw: Any, states: Mapping[TP, PartitionState]) -> tuple[Message, PartitionState] | None:
        """The record and its partition, unless it is not ours to run now."""
        return self._admit_message(message_from_kafka(raw), states)

    def _admit_message(
        self, msg: Message, states: Mapping[TP, PartitionState]
    ) -> tuple[Message, PartitionState] | None:
        """``msg`` and its partition, unless it is not ours to run now."""
        state = states.get((msg[0], msg[1]))
        if state is None or state.revoked or state.done:
            return None
        offset = msg[2]
        hold = state.hold
        if hold is not None and offset > hold:
            return None
        if state.end is not None and offset >= state.end:
            state.done = True
            return None
        done_next = state.done_next
        if done_next is not None and offset < done_next:
            self.events.append(OffsetsReset(state, done_next, offset))
            state.done_next = None
        if state.first_offset is None:
            state.first_offset = offset
        if offset < state.reprocess_below:
            self._topic_stats[msg[0]].reprocessed += 1
        return msg, state

    def _batch(self, raws: Batch) -> None:
        """Serial dispatch without dedup: each finished record moves its partition's watermark.

        A partition that needs no check but an offset range runs on the fast path (``_fast_run``);
        anything else goes through ``_record``, the general path, one record at a time.
        """
        stop, states = self._stop, raws.states
        msgs = list(map(message_from_kafka, raws))
        pending: dict[PartitionState, Message] = {}
        i, n = 0, len(msgs)
        try:
            while i < n and not stop.is_set():  # a stop lands what finished: a clean stop commits it
                msg = msgs[i]
                state = states.get((msg[0], msg[1]))
                if state is not None and self._fast(state):
                    low, high = _admissible(state)
                    if low <= msg[2] < high:
                        i = self._fast_run(msgs, i, state, low, high, pending)
                        continue
                self._record(msg, states, pending)
                i += 1
        finally:
            self.current = current_record.serial = None
            self.chain_started = None
        if pending:
            self._land(None, [], pending)
        self._save_highwater(raws)

    def _fast_run(
        self,
        msgs: list[Message],
        i: int,
        state: PartitionState,
        low: int,
        high: int,
        pending: dict[PartitionState, Message],
    ) -> int:
        """The fast path: run ``msgs[i:]`` while they are records of ``state``'s partition within
        ``[low, high)`` that return nothing and take less than the first histogram bucket; return
        the index of the first record it did not run.

        Everything it needs is in locals, and the outcome counters are added once at the end. A
        record that fails, returns outputs or runs long is finished by the general path.
        """
        topic, partition = state.tp
        chain, stop, serial, perf = self._chains[topic], self._stop, current_record, time.perf_counter
        run = _Run(self._topic_stats[topic])
        first_bound, ok, n = run.first_bound, 0, len(msgs)
        last: Message | None = None
        self.current = state
        # One clock read per record: a record starts when the one before it ended.
        began = started = perf()
        try:
            while i < n:
                msg = msgs[i]
                offset = msg[2]
                if msg[1] != partition or msg[0] != topic or not low <= offset < high or state.revoked:
                    return i
                # Each record here took less than first_bound: a stop waits for 16 at most.
                if not ok & 15 and stop.is_set():
                    return i
                i += 1
                serial.serial = msg
                self.chain_started = started
                try:
                    result = chain(msg)
                except Exception as exc:  # noqa: BLE001 - a failure of app code: the general path
                    self._after_chain(msg, state, self._chain_raised(msg, state, None, exc, started), pending)
                    return i
                now = perf()
                if result is not None or now - started >= first_bound:
                    finished = self._chain_returned(msg, state, None, result, started)
                    self._after_chain(msg, state, finished, pending)
                    return i
                started = now
                ok += 1
                low = nxt = offset + 1
                state.done_next = nxt
                last = msg
                if nxt >= high:
                    state.done = True  # a bounded run reached its end offset
                    return i
            return i
        finally:
            if last is not None:
                state.last_ts = last[6]
            run.add(ok, started - began)

    def _fast(self, state: PartitionState) -> bool:
        """Whether ``state``'s records may take the fast path of ``_batch``."""
        return not (
            state.revoked
            or state.done
            or state.hold is not None
            or state.skip
            or state.first_offset is None
            or self._emitted
        )

    def _record(
        self, msg: Message, states: Mapping[TP, PartitionState], pending: dict[PartitionState, Message]
    ) -> None:
        """The general path of one record of a batch without dedup."""
        admitted = self._admit_message(msg, states)
        if admitted is None:
            return
        msg, state = admitted
        if state.skip and msg[2] in state.skip:
            self._topic_stats[msg[0]].skipped += 1  # an earlier owner finished it
            self._after_chain(msg, state, True, pending)
        else:
            self._after_chain(msg, state, self._run_chain(msg, state, None), pending)

    def _after_chain(
        self, msg: Message, state: PartitionState, finished: bool, pending: dict[PartitionState, Message]
    ) -> None:
        """Publish a finished record, or, behind outputs not yet acknowledged, keep it pending."""
        if not finished:
            return
        if self._emitted:  # published once the outputs are acknowledged
            pending[state] = msg
            if self._land_due():
                self._land(None, [], pending)
        else:
            self._finished(state, msg)

    def _land_due(self) -> bool:
        outputs = self.outputs
        return (
            self._flush_wanted
            or (outputs is not None and outputs.gate.wanted)
            or time.monotonic() >= self._land_at
        )

    def _batch_dedup(self, raws: Batch, dedup: DedupStage) -> None:
        """Serial dispatch with dedup: claim the batch's keys, run, mark done, then move watermarks.

        Marks go out without waiting every ``mark_every`` records (not while outputs are
        unacknowledged: an output that fails parks its input, which must stay unmarked); their
        replies are read before the watermarks move."""
        admitted = [a for raw in raws if (a := self._admit(raw, raws.states)) is not None]
        keys = [dedup.key(msg) for msg, _ in admitted]
        claims = _BatchClaims(dedup, keys, [state for _, state in admitted])
        finished: set[object] = set()  # idents finished in this batch: a second copy is a dedup hit
        marks: list[DedupKey] = []
        pending: dict[PartitionState, Message] = {}
        every = dedup.mark_every
        for i, (msg, state) in enumerate(admitted):
            key = keys[i]
            claimed = claims.status(i)
            if self._stop.is_set() or state.revoked or (state.hold is not None and msg[2] > state.hold):
                if claimed is ClaimStatus.CLAIMED:
                    dedup.release([key])  # not run here: the next owner (or a re-fetch) claims it
                continue
            if state.skip and msg[2] in state.skip:
                self._topic_stats[msg[0]].skipped += 1  # an earlier owner finished it
                if claimed is ClaimStatus.CLAIMED:
                    dedup.release([key])
                pending[state] = msg
                continue
            status = ClaimStatus.DONE if key.ident in finished else claimed
            if status is ClaimStatus.CONTESTED:
                status = dedup.resolve_contested(key)
            if status is ClaimStatus.DONE:
                self._topic_stats[msg[0]].deduplicated += 1
                pending[state] = msg
                continue
            self.current_key = key
            if self._run_chain(msg, state, key):
                marks.append(key)
                finished.add(key.ident)
                pending[state] = msg
            self.current_key = None
            if dedup.per_record or self._flush_wanted or (self._emitted and self._land_due()):
                self._land(dedup, marks, pending)
            elif every and len(marks) >= every and not self._emitted:
                dedup.send_marks(marks)
                marks.clear()
        self._land(dedup, marks, pending)
        self._save_highwater(raws)

    def _land(
        self, dedup: DedupStage | None, marks: list[DedupKey], pending: dict[PartitionState, Message]
    ) -> None:
        """Wait for the outputs sent (parking inputs whose outputs failed), mark finished keys done
        (retrying while the store is down), then publish the watermarks."""
        stopped_at: dict[PartitionState, int] = {}
        if self._emitted and self.outputs is not None:
            # Not cut short by a stop: a clean stop commits what finished, outputs acknowledged
            # (bounded by the delivery timeout; the loop's drain timeout bounds the stop).
            for msg, error in self.outputs.flush(self._never):
                self._output_failed(msg, error, dedup, marks, pending, stopped_at)
        if dedup is not None:
            dedup.mark_done(marks)  # and wait for the marks sent before
            marks.clear()
        for state, msg in pending.items():
            if state in stopped_at:
                state.done_next = max(state.done_next or 0, stopped_at[state])
            else:
                self._finished(state, msg)
        pending.clear()
        if self._emitted:
            self._emitted = False
            if self.outputs is not None:
                self.outputs.gate.leave()
        if self._flush_wanted:
            with self._cv:
                self._flush_wanted = False
                self._cv.notify_all()

    def _output_failed(
        self,
        msg: Message,
        error: str,
        dedup: DedupStage | None,
        marks: list[DedupKey],
        pending: dict[PartitionState, Message],
        stopped_at: dict[PartitionState, int],
    ) -> None:
        """An input whose output was not acknowledged failed after all: park it (or stop at it)."""
        state = next((s for s in pending if s.tp == (msg[0], msg[1])), None)
        if state is None:
            state = self._states.get((msg[0], msg[1]))
        if state is None:
            return  # no longer ours: its offset was never published, the next owner runs it
        key = dedup.key(msg) if dedup is not None else None
        if key is not None and key in marks:
            marks.remove(key)
        topic_stats = self._topic_stats[msg[0]]
        topic_stats.ok -= 1
        if not self._park(msg, state, key, OutputDeliveryError(error), topic_stats):
            earlier = stopped_at.get(state)
            stopped_at[state] = msg[2] if earlier is None else min(earlier, msg[2])

    def _emit(self, msg: Message, result: object) -> None:
        """Send what the chain returned for ``msg`` (None, a Record or an iterable of them)."""
        records = outputs_of(result, msg)
        if not records:
            return
        outputs = self.producer()
        if not self._emitted:
            outputs.gate.enter()
            self._emitted = True
            self._land_at = time.monotonic() + LAND_EVERY_S
        outputs.send(msg, records)

    def producer(self) -> Outputs:
        """The producer for outputs, made on first use."""
        if self.outputs is None:
            if self._outputs_factory is None:
                raise TypeError("this worker has no producer for outputs")
            self.outputs = self._outputs_factory()
            self.outputs.start()
        return self.outputs

    def _enter_transaction(self) -> None:
        """Exactly-once: a dead-letter write joins the transaction like an output."""
        outputs = self.outputs
        if outputs is not None and outputs.transactional and not self._emitted:
            outputs.gate.enter()
            self._emitted = True
            self._land_at = time.monotonic() + LAND_EVERY_S

    @staticmethod
    def _claim(dedup: DedupStage, keys: list[DedupKey]) -> list[ClaimStatus]:
        return dedup.claim(keys) if keys else []

    def _retry(self, retry: Retry) -> None:
        """Run a record whose retry is due; its partition waits for the outcome."""
        msg, state, key = retry.msg, retry.state, retry.key
        if state.revoked or self._stop.is_set():
            if key is not None and self.dedup is not None:
                self.dedup.release([key])
            return
        state.hold = None
        if key is not None and self.dedup is not None:
            (status,) = self._claim(self.dedup, [key])
            if status is ClaimStatus.CONTESTED:
                status = self.dedup.resolve_contested(key)
            if status is ClaimStatus.DONE:
                self._topic_stats[msg[0]].deduplicated += 1
                self._finished(state, msg)
                self.events.append(RetrySettled(state))
                return
        self.current_key = key
        if self._run_chain(msg, state, key):
            marks = [key] if key is not None else []
            self._land(self.dedup, marks, {state: msg})
            self.events.append(RetrySettled(state))

    def _finished(self, state: PartitionState, msg: Message) -> None:
        """Publish that ``msg`` and everything before it in its partition finished."""
        nxt = msg[2] + 1
        state.done_next = nxt
        state.last_ts = msg[6]
        if state.end is not None and nxt >= state.end:
            state.done = True

    def _run_chain(self, msg: Message, state: PartitionState, key: DedupKey | None) -> bool:
        """Run the chain; True when the record finished (handled, dropped or parked)."""
        self.current = state
        current_record.serial = msg
        self.chain_started = started = time.perf_counter()
        try:
            result = self._chains[msg[0]](msg)
        except Exception as exc:  # noqa: BLE001 - a failure of app code is parked or stops the worker
            return self._chain_raised(msg, state, key, exc, started)
        return self._chain_returned(msg, state, key, result, started)

    def _chain_returned(
        self, msg: Message, state: PartitionState, key: DedupKey | None, result: object, started: float
    ) -> bool:
        """The chain returned ``result``: send its outputs; True when the record finished."""
        topic_stats = self._topic_stats[msg[0]]
        if result is not None:
            try:
                self._emit(msg, result)
            except Exception as exc:  # noqa: BLE001 - what the app returned cannot be sent: park it
                return self._chain_raised(msg, state, key, exc, started)
        topic_stats.ok += 1
        return self._chain_ended(started, topic_stats, True)

    def _chain_raised(
        self, msg: Message, state: PartitionState, key: DedupKey | None, exc: Exception, started: float
    ) -> bool:
        """The chain raised ``exc``: drop, retry or park the record; True when it finished."""
        topic_stats = self._topic_stats[msg[0]]
        if isinstance(exc, DropRecord):
            topic_stats.dropped += 1
            return self._chain_ended(started, topic_stats, True)
        self._chain_ended(started, topic_stats, False)
        if isinstance(exc, RetryRecord):
            self._schedule_retry(msg, state, key, exc)
            return False
        return self._park(msg, state, key, exc, topic_stats)

    def _chain_ended(self, started: float, topic_stats: TopicStats, result: bool) -> bool:
        elapsed = time.perf_counter() - started
        self.chain_started = None
        self.current = None
        current_record.serial = None
        hist = topic_stats.handler_seconds
        hist.counts[bisect_left(hist.bounds, elapsed)] += 1
        hist.sum += elapsed
        if elapsed > topic_stats.overrun_after > 0:
            overran(topic_stats, elapsed)
        return result

    def _schedule_retry(
        self, msg: Message, state: PartitionState, key: DedupKey | None, retry: RetryRecord
    ) -> None:
        """Hold the partition at ``msg`` and ask the loop to run it again after the backoff."""
        state.hold = msg[2]
        self._stats.retries += 1
        self.events.append(RetryScheduled(Retry(msg._replace(attempt=msg[7] + 1), state, key), retry.delay))
        self._stats.error("record", retry_text(msg[7], retry), msg[0], msg[1], msg[2])
        log.info(
            "record will be retried",
            topic=msg[0],
            partition=msg[1],
            offset=msg[2],
            attempt=msg[7],
            retry_in=round(retry.delay, 3),
            error=None if retry.cause is None else f"{type(retry.cause).__name__}: {retry.cause}",
        )

    def _park(
        self,
        msg: Message,
        state: PartitionState,
        key: DedupKey | None,
        exc: Exception,
        topic_stats: TopicStats,
    ) -> bool:
        """Park a failed record in its dead-letter topic; without one (or if refused), stop at it."""
        if key is not None and self.dedup is not None:
            self.dedup.release([key])  # a parked record's key stays free: a replay must run it
        sink = self._dead_letter
        if sink is not None:
            self._enter_transaction()
            dlq_topic = self._dlq_topic(msg[0])
            try:
                self._until_written(lambda: sink.park(msg, exc, dlq_topic, self._group, self._worker_id))
            except DeadLetterRejectedError as rejected:
                exc = rejected
            else:
                topic_stats.dead_lettered += 1
                self._stats.dead_letters.add(
                    DeadLettered(time.time(), msg[0], msg[1], msg[2], error_types(exc), dlq_topic, msg[7])
                )
                self._stats.error(
                    "record", f"parked in {dlq_topic}: {error_types(exc)}", msg[0], msg[1], msg[2]
                )
                log.warning(
                    "record parked in the dead-letter topic",
                    topic=msg[0],
                    partition=msg[1],
                    offset=msg[2],
                    dead_letter_topic=dlq_topic,
                    attempts=msg[7],
                    error=f"{type(exc).__name__}: {exc}",
                )
                return True
        topic_stats.failed += 1
        state.hold = msg[2] - 1
        self._stats.error(
            "record",
            f"failed, nothing parked it (the worker stops): {error_types(exc)}",
            msg[0],
            msg[1],
            msg[2],
        )
        failure = RecordFailed(msg[0], msg[1], msg[2], exc)
        failure.__cause__ = exc
        self.failure = failure
        self._stop.set()
        return False

    def _until_written(self, park: Callable[[], None]) -> None:
        """Retry a dead-letter write until it is acknowledged; the loop keeps the group meanwhile."""
        delay = 0.2
        while True:
            try:
                park()
            except DeadLetterUnavailableError as exc:
                if self.blocked is None:
                    log.error("dead-letter write failed; nothing past it is committed", error=str(exc))
                    self._stats.error("dead-letter", f"dead-letter write failed, retrying: {exc}")
                else:
                    log.warning("dead-letter write still failing", error=str(exc), retry_in=round(delay, 2))
                self.blocked = "dead-letter"
                if self._stop.wait(delay):
                    raise StopDuringOutageError("stop requested while retrying a dead-letter write") from exc
                delay = min(delay * 2, 5.0)
                continue
            if self.blocked is not None:
                log.info("dead-letter write succeeded again")
                self.blocked = None
            return

    def _save_highwater(self, raws: Sequence[Any]) -> None:
        if self._highwater is None or not raws:
            return
        states = list(self._states.items())
        self._highwater.save({tp: s.done_next - 1 for tp, s in states if s.done_next is not None})

    def sleep(self, seconds: float) -> bool:
        """The dedup stage's wait between retries: False once a stop is requested."""
        return not self._stop.wait(seconds)

    def on_outage(self, started: bool) -> None:
        """The dedup stage's outage hook: say so to the loop (metrics, the backpressure log line)."""
        self.blocked = "dedup" if started else None
        if started:
            self._stats.error("dedup", "dedup store unreachable: records wait for it (fail closed)")


#: Past any offset: the upper bound of a partition with no end offset.
_NO_END = 1 << 62


def _admissible(state: PartitionState) -> tuple[int, int]:
    """Offsets ``[low, high)`` the fast path may run for ``state`` without the general checks.

    Below ``low``: a reset (lower than what finished) or a re-read (counted as reprocessed); from
    ``high`` on: past a bounded run's end offset.
    """
    low = max(state.done_next or 0, state.reprocess_below)
    return low, state.end if state.end is not None else _NO_END


class _Run:
    """The outcome counters of a fast-path run, added up once at its end."""

    __slots__ = ("first_bound", "hist", "topic_stats")

    def __init__(self, topic_stats: TopicStats) -> None:
        self.topic_stats = topic_stats
        self.hist = topic_stats.handler_seconds
        #: Records that took this long or more leave the fast path (histogram, overrun check).
        self.first_bound = self.hist.bounds[0]

    def add(self, ok: int, spent: float) -> None:
        """Count ``ok`` records handled, all in the first histogram bucket, in ``spent`` seconds."""
        if ok:
            self.topic_stats.ok += ok
            self.hist.counts[0] += ok
            self.hist.sum += spent


class _BatchClaims:
    """The claims of one poll batch's records, as the serial processor reaches them.

    The first ``CLAIM_FIRST`` records' claim is waited for; the rest's is sent along and read
    when they come up, while Redis works on it and the first records run. A batch running longer
    than half the lease claims its records not yet run again (renewing their leases)."""

    def __init__(self, dedup: DedupStage, keys: list[DedupKey], states: list[PartitionState]) -> None:
        self._dedup, self._keys, self._states = dedup, keys, states
        self._statuses = dedup.claim(keys[:CLAIM_FIRST]) if keys else []
        self._rest = dedup.claim_soon(keys[CLAIM_FIRST:]) if len(keys) > CLAIM_FIRST else None
        self._at = time.monotonic()

    def status(self, i: int) -> ClaimStatus:
        """The claim status of record ``i`` (renewed first when the batch has run long)."""
        if self._rest is not None and (i >= CLAIM_FIRST or self._long()):
            self._statuses += self._rest()
            self._rest = None
        if self._long():
            todo = [k for k, s in zip(self._keys[i:], self._states[i:], strict=True) if not s.revoked]
            renewed = iter(self._dedup.claim(todo) if todo else [])
            self._statuses[i:] = [
                next(renewed) if not s.revoked else st
                for st, s in zip(self._statuses[i:], self._states[i:], strict=True)
            ]
            self._at = time.monotonic()
        return self._statuses[i]

    def _long(self) -> bool:
        return time.monotonic() - self._at > self._dedup.lease_seconds / 2

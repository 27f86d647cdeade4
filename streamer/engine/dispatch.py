"""Concurrent dispatch: many records in flight, ordered by partition, by key, or not at all.

The processing thread runs an asyncio event loop. Each admitted record joins a *lane* (its
partition, its partition and key, or a lane of its own); a lane runs one record at a time, in
offset order. Up to ``concurrency`` worker coroutines take the first record of a ready lane, run
it, and take the next: ``async def`` chains are awaited on this event loop, ``def`` chains run
on a pool of as many threads (``_Pool``). A second copy of an idempotency key in flight (a
producer's retry) joins the first copy's lane and is a dedup hit once that finished.

Records finish out of order. Each partition's ``OutOfOrder`` tracker turns finishes into the
finished prefix (published as ``done_next``, as in serial dispatch) and the offsets finished above
it, which the checkpoint encodes in the commit metadata so that a new owner skips them. A record
is not started while its distance to the prefix would make that map too long for the metadata:
its partition pauses (``OffsetMapFull``) until the prefix moves.

Retries wait inside their lane (the key's later records wait behind them; other keys go on).
Redis (dedup) and the dead-letter sink are blocking clients: their calls run on one helper
thread each, so a slow store never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue as queues
import threading
import time
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import structlog

from streamer.chain import Handler, is_async
from streamer.dedup import ClaimStatus, DedupKey, DedupStage, StopDuringOutageError
from streamer.engine.offsetmap import max_span
from streamer.engine.outputs import OutputDeliveryError
from streamer.engine.partition import TP, OutOfOrder, PartitionState
from streamer.engine.processor import Batch, OffsetMapFull, Processor, Retry, overran, retry_text
from streamer.errors import DropRecord, RetryRecord
from streamer.logs import current_record, set_record
from streamer.message import Message
from streamer.record import outputs_of
from streamer.settings import Ordering
from streamer.stats import TopicStats

log = structlog.get_logger("streamer.dispatch")


#: What a record's run came to (``_attempts``).
_NOT_FINISHED, _MARK, _NO_MARK = 0, 1, 2


class _Entry:
    """An admitted record waiting in its lane."""

    __slots__ = ("key", "msg", "running", "state", "status")

    def __init__(
        self, msg: Message, state: PartitionState, key: DedupKey | None, status: ClaimStatus
    ) -> None:
        self.msg = msg
        self.state = state
        self.key = key
        self.status = status
        self.running = False


class ConcurrentProcessor(Processor):
    """Runs up to ``concurrency`` records at once, each lane in order; the loop submits and collects."""

    def __init__(
        self,
        chains: Mapping[str, Handler],
        states: Mapping[TP, PartitionState],
        *args: Any,
        concurrency: int,
        limits: Mapping[str, int],
        orderings: Mapping[str, Ordering],
        map_chars: int,
        batch_size: int = 500,
        every_records: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(chains, states, *args, **kwargs)
        self.concurrency = concurrency
        #: Records that may wait in lanes while slots are free (each partition's share is kept
        #: to about a poll batch by pausing it).
        self._cap = max(4 * batch_size, 2 * concurrency)
        #: Records published (finished, offsets handed to the loop) so far, and the count the
        #: last landed commit covers: no record starts while more than ``_gate`` lie between
        #: them, so a crash re-reads at most every_records + a poll batch + what is in flight,
        #: whatever the commits do (0: no count-based commits, no gate).
        self.published_total = 0
        self._gate_base = 0
        self._gate = every_records + batch_size if every_records else 0
        self._limits = dict(limits)
        self._orderings = dict(orderings)
        self._async = {topic: is_async(chain) for topic, chain in chains.items()}
        self._max_span = max_span(map_chars)
        self._aloop = asyncio.new_event_loop()
        self._pool = _Pool(concurrency, self._aloop) if not all(self._async.values()) else None
        # Blocking store clients, one thread each: calls to one store keep their order.
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="streamer-dedup")
        self._dlq_thread = ThreadPoolExecutor(1, thread_name_prefix="streamer-dead-letter")
        self._lanes: dict[Any, deque[_Entry]] = {}
        self._ready: deque[Any] = deque()  # lanes with a record to start and none running
        self._full: dict[int, tuple[PartitionState, list[Any]]] = {}  # lanes waiting for map room
        self._running = 0
        self._topic_running = dict.fromkeys(chains, 0)
        self._waiting = 0  # admitted, not started (written by the processing thread only)
        #: perf_counter() when each running attempt started.
        self._attempt_started: dict[_Entry, float] = {}
        #: Idempotency keys waiting or running: [their lane, how many copies]; keys finished here
        #: lately (a later copy is a dedup hit without asking Redis).
        self._held_keys: dict[DedupKey, list[Any]] = {}
        self._done_keys: OrderedDict[DedupKey, None] = OrderedDict()
        self._stopping = False
        #: The loop waits for fewer records not started than this (wait_room); a settle waits.
        self._room_wanted = 0
        self._settling = 0
        self._marks: list[DedupKey] = []
        #: Finished records whose marks are landing: (state, message, counted in its in_flight).
        self._finishes: list[tuple[PartitionState, Message, bool]] = []
        self._flushing = False
        self._lone = 0  # lane ids of ordering "none"
        self._wake: asyncio.Event | None = None
        self._workers = 0
        self._loop_ended = False  # the event loop finished (guarded by the condition)
        self._sleepers: list[asyncio.Future[None]] = []
        self.running_now = 0  # records in flight, for metrics (any thread)

    # -- the loop's side ---------------------------------------------------------------------------

    def submit(self, work: Batch | Retry) -> None:
        """Queue a poll batch; the event loop admits it on its next turn."""
        size = 1 if isinstance(work, Retry) else len(work)
        with self._cv:
            self._backlog += size
            self._busy = True
        try:
            self._aloop.call_soon_threadsafe(self._take, work)
        except RuntimeError:  # the processing thread ended (a failure): nothing runs any more
            with self._cv:
                self._backlog = 0
                self._busy = False

    @property
    def backlog(self) -> int:
        """What the loop weighs against the poll batch size before it hands the next batch over.

        While a slot is free, only the records not yet admitted count: records waiting behind
        a busy key or partition must not keep other partitions' records out (the loop pauses a
        partition with more than a batch waiting, which bounds them); up to a cap.
        """
        waiting = self._waiting
        if self._running < self.concurrency and waiting < self._cap:
            return self._backlog
        return self._backlog + waiting

    def wait_room(self, limit: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for the records not started to drop below ``limit``."""
        with self._cv:
            self._room_wanted = limit
            try:
                return self._cv.wait_for(lambda: self.backlog < limit or self._closed, timeout)
            finally:
                self._room_wanted = 0

    @property
    def idle(self) -> bool:
        """Nothing running, waiting or queued."""
        return not self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until nothing runs, waits or is queued."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._busy, timeout)

    def settle(self, states: Sequence[PartitionState], timeout: float) -> bool:
        """Before a revoke: wait for the records of ``states`` in flight, and land pending marks."""
        with self._cv:
            if self._loop_ended or not self._thread.is_alive():
                return True  # stopped: nothing runs, and every mark landed before it stopped
            self._flush_wanted = True
        with contextlib.suppress(RuntimeError):
            self._aloop.call_soon_threadsafe(self._revoked)
            self._aloop.call_soon_threadsafe(self._flush_soon)
        with self._cv:
            self._settling += 1
            try:
                return self._cv.wait_for(
                    lambda: (
                        self._loop_ended
                        or (not self._flush_wanted and not any(state.in_flight for state in states))
                    ),
                    timeout,
                )
            finally:
                self._settling -= 1

    @property
    def chain_started(self) -> float | None:
        """perf_counter() when the oldest running attempt started (any thread: one C call)."""
        return min(self._attempt_started.values(), default=None)

    @chain_started.setter
    def chain_started(self, value: float | None) -> None:
        pass  # serial dispatch's field; here it is derived from the running attempts

    @property
    def gated(self) -> bool:
        """Whether records wait to start until a commit covers the finished ones (any thread)."""
        return bool(self._gate) and self.published_total - self._gate_base >= self._gate

    def committed(self, published: int) -> None:
        """A commit covering the first ``published`` published records landed (the loop)."""
        if published > self._gate_base:
            self._gate_base = published
            with contextlib.suppress(RuntimeError):
                self._aloop.call_soon_threadsafe(self._pump)

    def lost(self, states: Sequence[PartitionState]) -> None:
        """Partitions lost: their waiting records are dropped, whatever held them."""
        with contextlib.suppress(RuntimeError):
            self._aloop.call_soon_threadsafe(self._revoked)

    def stop(self) -> None:
        """Start nothing more; records in flight finish (the loop waits up to the drain timeout)."""
        self._stopping = True
        super().stop()
        with contextlib.suppress(RuntimeError):  # the event loop already closed
            self._aloop.call_soon_threadsafe(self._stopped)

    # -- the processing thread -------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._aloop)
        self._wake = asyncio.Event()
        renewal = self._aloop.create_task(self._renew_leases())
        try:
            self._aloop.run_forever()
        finally:
            renewal.cancel()
            # Idle workers wait on futures: end them before the event loop closes.
            pending = asyncio.all_tasks(self._aloop)
            for task in pending:
                task.cancel()
            self._aloop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            with self._cv:
                self._busy = False
                self._backlog = 0
                self._loop_ended = True
                self._cv.notify_all()
            self._store_thread.shutdown(wait=False)
            self._dlq_thread.shutdown(wait=False)
            if self._pool is not None:
                self._pool.close()
            self._aloop.close()

    def _stopped(self) -> None:
        """Drop what has not started (its claims released); stop the event loop once idle."""
        # The first record of a running lane stays: its task takes it off when it ends.
        dropped: list[_Entry] = []
        for lane, queue in list(self._lanes.items()):
            keep = [e for e in queue if e.running]
            dropped.extend(e for e in queue if not e.running)
            if keep:
                self._lanes[lane] = deque(keep)
            else:
                del self._lanes[lane]
        self._ready.clear()
        self._full.clear()
        self._release([e.key for e in dropped if e.key is not None and e.status is ClaimStatus.CLAIMED])
        for e in dropped:
            self._unhold(e.key)
        with self._cv:
            self._waiting -= len(dropped)
            self._backlog = 0
        if self._wake is not None:
            self._wake.set()  # retries waiting out their backoff give up now
        for waiter in self._sleepers:
            if not waiter.done():
                waiter.set_result(None)  # idle workers end
        self._sleepers.clear()
        self._check_idle()

    def _revoked(self) -> None:
        """Lanes held for a revoked partition's full map go back to be dropped by the workers."""
        for key, (state, lanes) in list(self._full.items()):
            if state.revoked:
                del self._full[key]
                self._ready.extend(lanes)
        self._pump()

    def _check_idle(self) -> None:
        if self._running or self._waiting or self._finishes or self._flushing:
            return
        with self._cv:
            if self._backlog:
                return
            self._busy = False
            self._cv.notify_all()
        if self._stop.is_set():
            self._aloop.stop()

    def _take(self, work: Batch | Retry) -> None:
        """Admit a batch's records into their lanes (claiming their dedup keys first)."""
        if isinstance(work, Retry):
            return  # only serial dispatch schedules retries through the loop; ours wait in lanes
        raws = work
        admitted: list[tuple[Message, PartitionState]] = []
        skipped: list[tuple[Message, PartitionState]] = []
        for raw in raws:
            got = None if self._stop.is_set() else self._admit(raw, work.states)
            if got is None:
                continue
            msg, state = got
            tracker = state.tracker
            if tracker is None or msg[2] < tracker.next_offset:
                tracker = state.tracker = OutOfOrder()  # first record, or offsets reset under us
            tracker.start(msg[2])
            if state.skip and msg[2] in state.skip:
                skipped.append((msg, state))
            else:
                admitted.append((msg, state))
        with self._cv:
            self._backlog = max(self._backlog - len(raws), 0)
            self._waiting += len(admitted)
            self._cv.notify_all()
        for msg, state in skipped:
            self._topic_stats[msg[0]].skipped += 1
            self._finish(state, msg, None, counted=False)
        if not admitted:
            self._check_idle()
            return
        dedup = self.dedup
        if dedup is None:
            self._enqueue([_Entry(m, s, None, ClaimStatus.CLAIMED) for m, s in admitted])
        else:
            self._aloop.create_task(self._claim_then_enqueue(dedup, admitted))

    async def _claim_then_enqueue(
        self, dedup: DedupStage, admitted: list[tuple[Message, PartitionState]]
    ) -> None:
        keys = [dedup.key(msg) for msg, _ in admitted]
        try:
            statuses = await self._in(self._store_thread, dedup.claim, keys)
        except StopDuringOutageError:
            statuses = None
        if statuses is None or self._stop.is_set():
            with self._cv:
                self._waiting -= len(admitted)
            self._check_idle()
            return
        self._enqueue([_Entry(m, s, k, st) for (m, s), k, st in zip(admitted, keys, statuses, strict=True)])

    def _enqueue(self, entries: list[_Entry]) -> None:
        lanes, ready = self._lanes, self._ready
        for entry in entries:
            msg = entry.msg
            ordering = self._orderings[msg[0]]
            if ordering == "key" and msg[3] is not None:
                lane: Any = (msg[0], msg[1], msg[3])
            elif ordering == "none":
                self._lone += 1
                lane = self._lone
            else:
                lane = (msg[0], msg[1])
            key = entry.key
            if key is not None:
                # The same idempotency key already waiting or running (a producer's retry): this
                # copy joins that record's lane, and runs only if that one did not finish.
                held = self._held_keys.get(key)
                if held is None:
                    self._held_keys[key] = [lane, 1]
                else:
                    lane = held[0]
                    held[1] += 1
            entry.state.waiting += 1
            queue = lanes.get(lane)
            if queue is None:
                lanes[lane] = deque((entry,))
                ready.append(lane)
            else:
                queue.append(entry)
        self._pump()

    def _pump(self) -> None:
        """Wake idle workers (or start new ones, up to the concurrency) for the ready lanes."""
        wanted = len(self._ready)
        sleepers = self._sleepers
        while wanted and sleepers:
            waiter = sleepers.pop()
            if not waiter.done():
                waiter.set_result(None)
                wanted -= 1
        while wanted and self._workers < self.concurrency:
            self._workers += 1
            self._aloop.create_task(self._worker())
            wanted -= 1

    async def _worker(self) -> None:
        """One of up to ``concurrency`` workers: run ready records one after another."""
        sleepers, stop = self._sleepers, self._stop
        try:
            while True:
                got = self._next()
                if got is not None:
                    lane, entry = got
                    finished = _NOT_FINISHED
                    try:
                        finished = await self._attempts(entry)
                    except asyncio.CancelledError:
                        raise
                    except StopDuringOutageError as stopping:
                        log.warning(
                            "stopping during an outage; only what finished counts", reason=str(stopping)
                        )
                    except BaseException as exc:  # noqa: BLE001 - a bug: stop the worker with it
                        if self.failure is None:
                            self.failure = exc
                        self.stop()
                    self._ran(lane, entry, finished)
                    continue
                if stop.is_set():
                    return
                if self._room_wanted:
                    self._room_wanted = 0  # one wake-up per wait is enough
                    with self._cv:
                        self._cv.notify_all()  # a slot is free: the loop may hand a batch over
                waiter = self._aloop.create_future()
                sleepers.append(waiter)
                await waiter
        finally:
            self._workers -= 1

    def _next(self) -> tuple[Any, _Entry] | None:
        """The next record to start: the first of a ready lane whose topic and map have room."""
        if self._gate and self.published_total - self._gate_base >= self._gate:
            return None  # the finished records wait for a commit: start nothing until one lands
        ready, lanes = self._ready, self._lanes
        dropped = 0
        found: tuple[Any, _Entry] | None = None
        tries = len(ready)
        while tries:
            tries -= 1
            lane = ready.popleft()
            queue = lanes[lane]
            while queue and (queue[0].state.revoked or self._stopping):
                # Not ours any more (revoked, or stopping): the next owner claims and runs it.
                gone = queue.popleft()
                gone.state.waiting -= 1
                self._unhold(gone.key)
                dropped += 1
                if gone.key is not None and gone.status is ClaimStatus.CLAIMED:
                    self._release([gone.key])
            if not queue:
                del lanes[lane]
                continue
            entry = queue[0]
            msg, state = entry.msg, entry.state
            topic = msg[0]
            if self._topic_running[topic] >= self._limits[topic]:
                ready.append(lane)  # its topic is at its own limit: try the next lane
                continue
            tracker = state.tracker
            if tracker is not None and msg[2] - (tracker.prefix() or msg[2]) > self._max_span:
                self._map_full(state, lane)
                continue
            self._running += 1
            self._topic_running[topic] += 1
            entry.running = True
            state.in_flight += 1
            state.waiting -= 1
            found = lane, entry
            break
        if found is not None or dropped:
            # The processing thread alone writes _waiting: no lock, unless the loop waits on it.
            self._waiting -= dropped + (found is not None)
            if self._room_wanted and self.backlog < self._room_wanted:
                self._room_wanted = 0
                with self._cv:
                    self._cv.notify_all()  # the loop waits to hand the next batch over
            self.running_now = self._running
        if dropped and found is None:
            self._check_idle()
        return found

    def _map_full(self, state: PartitionState, lane: Any) -> None:
        held = self._full.get(id(state))
        if held is not None:
            held[1].append(lane)
            return
        self._full[id(state)] = (state, [lane])
        self.events.append(OffsetMapFull(state, True))
        log.warning(
            "offset map full: the partition takes no records until its oldest one finishes",
            partition=f"{state.tp[0]}[{state.tp[1]}]",
            oldest_unfinished=state.tracker.prefix() if state.tracker else None,
            max_span=self._max_span,
        )

    def _unhold(self, key: DedupKey | None) -> None:
        if key is not None:
            held = self._held_keys[key]
            held[1] -= 1
            if not held[1]:
                del self._held_keys[key]

    def _ran(self, lane: Any, entry: _Entry, finished: int) -> None:
        """A record's run ended: hand its lane the next record, publish it if it finished."""
        self._running -= 1
        self._topic_running[entry.msg[0]] -= 1
        self.running_now = self._running
        queue = self._lanes[lane]
        queue.popleft()
        if queue:
            self._ready.append(lane)
        else:
            del self._lanes[lane]
        key = entry.key
        self._unhold(key)
        if finished == _MARK and key is not None:
            done = self._done_keys
            done[key] = None
            if len(done) > self._cap:
                done.popitem(last=False)
        if finished:
            # Still counted as running in its partition until its offset is published.
            self._finish(entry.state, entry.msg, key if finished == _MARK else None, counted=True)
        else:
            self._not_running(entry.state)
        if not self._running:
            self._check_idle()

    def _not_running(self, state: PartitionState) -> None:
        state.in_flight -= 1
        if not state.in_flight and self._settling:
            with self._cv:
                self._cv.notify_all()

    async def _attempts(self, entry: _Entry) -> int:
        """Run the record's chain until it finished (_MARK: its dedup mark is due; _NO_MARK: a
        dedup hit, or parked) or must not run here any more (_NOT_FINISHED)."""
        msg, state, key = entry.msg, entry.state, entry.key
        dedup = self.dedup
        if key is not None and key in self._done_keys:
            entry.status = ClaimStatus.DONE  # an earlier copy of this key finished here
        if entry.status is ClaimStatus.CONTESTED and dedup is not None and key is not None:
            entry.status = await self._in(self._store_thread, dedup.resolve_contested, key)
        if entry.status is ClaimStatus.DONE:
            self._topic_stats[msg[0]].deduplicated += 1
            return _NO_MARK
        topic_stats = self._topic_stats[msg[0]]
        chain = self._chains[msg[0]]
        run_async = self._async[msg[0]]
        starts = self._attempt_started
        while True:
            if state.revoked or self._stopping:
                self._release([key] if key is not None else [])
                return _NOT_FINISHED
            token = entry
            started = starts[entry] = time.perf_counter()
            try:
                if run_async:
                    set_record(msg)
                    result = await cast(Awaitable[Any], chain(msg))
                else:
                    result = await cast(_Pool, self._pool).run(chain, msg)
                if result is not None:
                    await self._deliver(msg, result)
            except DropRecord:
                topic_stats.dropped += 1
                self._ended(token, started, topic_stats)
                return _MARK
            except RetryRecord as retry:
                self._ended(token, started, topic_stats)
                self._stats.retries += 1
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
                if not await self._backoff(state, retry.delay):
                    self._release([key] if key is not None else [])
                    return _NOT_FINISHED
                msg = msg._replace(attempt=msg[7] + 1)
                continue
            except Exception as exc:  # noqa: BLE001 - parked, or it stops the worker
                self._ended(token, started, topic_stats)
                parked = await self._in(self._dlq_thread, self._park, msg, state, key, exc, topic_stats)
                return _NO_MARK if parked else _NOT_FINISHED  # a parked key stays free for a replay
            topic_stats.ok += 1
            self._ended(token, started, topic_stats)
            return _MARK

    async def _deliver(self, msg: Message, result: object) -> None:
        """Send what the chain returned and wait until every output is acknowledged: the record
        stays in flight meanwhile, so the next record of its lane (its key) waits and outputs of
        one key keep their order. Raises what fails the record."""
        records = outputs_of(result, msg)
        if not records:
            return
        outputs = self.producer()
        error = await outputs.deliver(msg, records)
        if error is not None:  # once more, alone: a batchmate may have been the one refused
            error = await self._in(self._dlq_thread, outputs.resend_alone, msg, records, self._stop)
        if error is not None:
            raise OutputDeliveryError(error)

    async def _backoff(self, state: PartitionState, delay: float) -> bool:
        """Wait out a retry's backoff outside the running count; False if the record must not run."""
        self._not_running(state)
        wake = self._wake
        deadline = time.monotonic() + delay
        while not (state.revoked or self._stop.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if wake is None:
                await asyncio.sleep(remaining)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(remaining, 0.5))
        state.in_flight += 1
        return not (state.revoked or self._stop.is_set())

    def _ended(self, token: _Entry, started: float, topic_stats: TopicStats) -> None:
        elapsed = time.perf_counter() - started
        del self._attempt_started[token]
        hist = topic_stats.handler_seconds
        hist.counts[bisect_left(hist.bounds, elapsed)] += 1
        hist.sum += elapsed
        if elapsed > topic_stats.overrun_after > 0:
            overran(topic_stats, elapsed)

    # -- finishing: marks land before the offsets that depend on them are published ---------------

    def _finish(self, state: PartitionState, msg: Message, key: DedupKey | None, *, counted: bool) -> None:
        if key is None or self.dedup is None:
            # No mark to land first: publish now.
            self._published(state, msg)
            if counted:
                self._not_running(state)
            return
        self._marks.append(key)
        self._finishes.append((state, msg, counted))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flushing:
            return
        if not self._finishes and not self._marks:
            if self._flush_wanted:
                with self._cv:
                    self._flush_wanted = False
                    self._cv.notify_all()
            return
        self._flushing = True
        self._aloop.create_task(self._flush())

    async def _flush(self) -> None:
        """Land the pending marks in one round trip, then publish the finishes behind them."""
        try:
            await asyncio.sleep(0)  # let this turn's finishes join the round trip
            marks, finishes = self._marks, self._finishes
            self._marks, self._finishes = [], []
            if marks and self.dedup is not None:
                try:
                    await self._in(self._store_thread, self.dedup.mark_done, marks)
                except StopDuringOutageError:
                    return  # stopping while the store is down: these finishes never count
            for state, msg, counted in finishes:
                self._published(state, msg)
                if counted:
                    self._not_running(state)
        finally:
            self._flushing = False
        if self._marks or self._finishes:
            self._flush_soon()
        else:
            if self._flush_wanted:
                with self._cv:
                    self._flush_wanted = False
                    self._cv.notify_all()
            self._check_idle()

    def _published(self, state: PartitionState, msg: Message) -> None:
        tracker = state.tracker
        if tracker is None:
            return
        try:
            prefix = tracker.finish(msg[2])
        except ValueError:
            return  # started under a tracker that an offset reset replaced: it no longer counts
        state.finished_count += 1
        self.published_total += 1
        state.last_ts = msg[6]
        if prefix is not None:
            state.done_next = prefix
            if state.end is not None and prefix >= state.end:
                state.done = True
        held = self._full.get(id(state)) if self._full else None
        if held is not None and prefix is not None:
            lanes = held[1]
            if not lanes or self._lanes[lanes[0]][0].msg[2] - prefix <= self._max_span:
                del self._full[id(state)]
                self._ready.extendleft(reversed(lanes))
                self.events.append(OffsetMapFull(state, False))
                self._pump()

    # -- helpers ----------------------------------------------------------------------------------

    async def _in(self, executor: ThreadPoolExecutor, func: Callable[..., Any], *args: Any) -> Any:
        return await self._aloop.run_in_executor(executor, func, *args)

    def _release(self, keys: list[DedupKey]) -> None:
        if keys and self.dedup is not None:
            self._store_thread.submit(self.dedup.release, keys)

    async def _renew_leases(self) -> None:
        """Keep the claims of records admitted here (waiting or running) from expiring."""
        dedup = self.dedup
        if dedup is None:
            return
        while True:
            await asyncio.sleep(dedup.lease_seconds / 3)
            keys = [e.key for lane in self._lanes.values() for e in lane if e.key is not None]
            if keys:
                await self._in(self._store_thread, dedup.renew, keys)

    def sleep(self, seconds: float) -> bool:
        """The dedup stage's wait between retries (on the store's thread): False once stopping."""
        return not self._stop.wait(seconds)


class _Pool:
    """Threads that run sync chains for the event loop, started as needed up to ``size``.

    Lighter than ``run_in_executor``: a finished call is handed back through a list that the
    event loop drains, with one wake-up for all the calls that finished meanwhile.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self._size = size
        self._loop = loop
        self._calls: queues.SimpleQueue[tuple[asyncio.Future[Any], Handler, Message] | None] = (
            queues.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._threads = 0
        self._idle = 0

    def run(self, chain: Handler, msg: Message) -> asyncio.Future[Any]:
        """Run ``chain(msg)`` on a pool thread; the future completes (with what it returned) on
        the event loop."""
        future: asyncio.Future[Any] = self._loop.create_future()
        with self._lock:
            start = self._idle == 0 and self._threads < self._size
            if start:
                self._threads += 1
            else:
                self._idle -= 1
        if start:
            threading.Thread(target=self._serve, name="streamer-handler", daemon=True).start()
        self._calls.put((future, chain, msg))
        return future

    def close(self) -> None:
        """End the pool's threads once they finish what they run."""
        with self._lock:
            threads, self._size = self._threads, 0
        for _ in range(threads):
            self._calls.put(None)

    def _serve(self) -> None:
        calls, lock = self._calls, self._lock
        while True:
            call = calls.get()
            if call is None:
                return
            future, chain, msg = call
            current_record.msg = msg
            error: BaseException | None = None
            result: Any = None
            try:
                result = chain(msg)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting record
                error = exc
            current_record.msg = None
            with lock:
                self._done.append((future, result, error))
                wake = len(self._done) == 1
                self._idle += 1
            if wake:
                with contextlib.suppress(RuntimeError):  # the worker stopped: nobody awaits it
                    self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            finished, self._done = self._done, []
        for future, result, error in finished:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

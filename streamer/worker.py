"""The worker loop: poll a batch, dedup-claim it, run each record through its chain, mark it done,
and commit what finished whenever the policy says so."""

from __future__ import annotations

import enum
import json
import math
import os
import threading
import time
import uuid
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException

from streamer.chain import Handler
from streamer.commit import CommitPolicy, policy_from_settings
from streamer.deadletter import DeadLetterSink, DeadLetterUnavailableError, KafkaDeadLetterSink
from streamer.dedup import (
    ClaimStatus,
    DedupStage,
    KeyBuilder,
    KeyFunction,
    RedisDedupStore,
    StopDuringOutageError,
)
from streamer.errors import DropRecord, RecordFailed, RetryRecord
from streamer.exitcodes import EXIT_DRAIN_TIMEOUT, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from streamer.highwater import HighWaterStore
from streamer.keepalive import KeepAlive
from streamer.logs import current_record
from streamer.message import Message, message_from_kafka
from streamer.offsets import PartitionOffsets
from streamer.partitions import Item, PartitionState
from streamer.preflight import preflight
from streamer.redis_client import redis_client
from streamer.settings import Settings
from streamer.source import TP, Committed, KafkaSource, Source, admin_config
from streamer.stats import TopicStats, WorkerStats

log = structlog.get_logger("streamer.worker")

#: Asynchronous commits sent and not yet acknowledged, at most.
_MAX_COMMITS_IN_FLIGHT = 4

#: Seconds an asynchronous commit may go unacknowledged before it is worth a warning.
_COMMIT_ACK_WARN_S = 10.0


__all__ = ["EXIT_DRAIN_TIMEOUT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Worker", "WorkerStats"]


class Worker:
    """Consumes the topics of ``chains`` in one consumer group, checkpointing as the policy says."""

    def __init__(
        self,
        settings: Settings,
        chains: Mapping[str, Handler],
        *,
        until_end: bool = False,
        key_fn: KeyFunction | None = None,
        source: Source | None = None,
        policy: CommitPolicy | None = None,
        dedup: DedupStage | None = None,
        dead_letter: DeadLetterSink | None = None,
    ) -> None:
        if not chains:
            raise ValueError("a worker needs at least one topic handler")
        self.settings = settings
        self.stats = WorkerStats()
        self.worker_id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._chains = dict(chains)
        self._topic_stats = {topic: TopicStats() for topic in self._chains}
        self.stats.topics = self._topic_stats
        self._until_end = until_end
        if source is None:
            self._source: Source = KafkaSource(
                settings.kafka, on_commit=self._on_commit, on_stats=self._on_stats
            )
        else:
            source.bind(self._on_commit)
            self._source = source
        self._policy = policy or policy_from_settings(settings.commit)
        self._dedup = dedup or self._dedup_from_settings(key_fn)
        self._highwater = self._highwater_from_settings()
        self._watermarks_refreshed = time.monotonic()
        self.joined = False
        self._closing = False
        self._partitions: dict[TP, PartitionState] = {}
        self._pending: list[tuple[PartitionState, int, bytes]] = []  # chain done, mark not landed
        self._ever_assigned = False
        self._paused_for_outage = False
        self._lock = threading.RLock()  # held by the loop except while a chain runs
        self._chain_started: float | None = None
        self._dead_letter = dead_letter if dead_letter is not None else self._dead_letter_from_settings()
        self._keepalive = KeepAlive(self, _max_poll_interval(settings) / 3)
        self._stop_requested = threading.Event()
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._due_records: float = math.inf
        self._due_at = math.inf
        self._stopping = False  # a plain bool for the per-record check; the Event is for waits
        self._group_end: dict[TP, int] | None = None
        self._group_end_checked = 0.0
        self._final_commit_failed = False
        self._ack_warned = 0.0
        self._commit_sent: deque[float] = deque()
        self._run_start = int(time.time())

    def _dedup_from_settings(self, key_fn: KeyFunction | None) -> DedupStage | None:
        cfg = self.settings.dedup
        if not cfg.enabled:
            return None
        store = RedisDedupStore(redis_client(cfg))
        keys = KeyBuilder(cfg.namespace, self.settings.kafka.group_id, cfg.key_header, key_fn)
        # With static membership the instance id survives a restart, so a restarted worker takes
        # back the claims its killed predecessor left instead of waiting for their leases.
        token = str(self.settings.kafka.client.get("group.instance.id", self.worker_id))
        return DedupStage(store, cfg, keys, self.stats, token, self._serve_group, self._outage)

    def _dead_letter_from_settings(self) -> DeadLetterSink | None:
        if not self.settings.dead_letter.enabled:
            return None
        return KafkaDeadLetterSink(
            admin_config(self.settings.kafka), timeout=self.settings.dead_letter.timeout
        )

    def _highwater_from_settings(self) -> HighWaterStore | None:
        mode, dedup = self.settings.metrics.track_reprocessed, self.settings.dedup
        if mode == "off" or (mode == "auto" and not dedup.enabled):
            return None
        client = redis_client(dedup)
        return HighWaterStore(client, dedup.namespace, self.settings.kafka.group_id, dedup.window_seconds)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Consume until stopped (or, with ``until_end``, until the end offsets); return an exit code."""
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id, group=self.settings.kafka.group_id)
        log.info(
            "worker starting",
            topics=sorted(self._chains),
            until_end=self._until_end,
            every_records=self._policy.every_records,
            every_seconds=self._policy.every_seconds,
            dedup=self._dedup is not None,
        )
        self._lock.acquire()
        self._preflight()
        self._source.subscribe(list(self._chains), self._on_assign, self._on_revoke, self._on_lost)
        self._keepalive.start()
        self._last_commit = time.monotonic()
        self._refresh_due()
        batch_size = self.settings.kafka.poll_batch_size
        try:
            while not self._stopping and not self._finished_bounded_run():
                self._run_due_retries()
                batch = self._claim(self._admit(self._source.poll(batch_size, self._poll_timeout())))
                self.stats.last_poll = claimed_at = time.monotonic()
                for done, item in enumerate(batch):
                    if self._stopping:
                        self._release(batch[done:])
                        break
                    if self._dedup is not None and self._lease_half_gone(claimed_at):
                        claimed_at = self._renew(batch, done)
                    self._process(item)
                    # The commit policy, checked per record; inlined: this runs for every record.
                    if self._since_commit >= self._due_records or time.monotonic() >= self._due_at:
                        self._checkpoint()
                self._flush_marks()
                self._after_batch(bool(batch))
                if self._since_commit >= self._due_records or time.monotonic() >= self._due_at:
                    self._checkpoint()
        except RecordFailed as failure:
            log.exception(
                "stopping: a record failed and nothing parked it; its offset is not committed",
                topic=failure.topic,
                partition=failure.partition,
                offset=failure.offset,
            )
            self._shutdown()
            return EXIT_FAILED
        except StopDuringOutageError as stop:
            log.warning("stopping during an outage; committing only what finished", reason=str(stop))
        self._shutdown()
        return EXIT_FAILED if self._final_commit_failed else EXIT_OK

    def _poll_timeout(self) -> float:
        """The poll waits no longer than until the next retry is due."""
        timeout = self.settings.kafka.poll_timeout
        dues = [state.retry[0] for _, state in self.partitions() if state.retry is not None]
        if dues:
            timeout = min(timeout, max(min(dues) - time.monotonic(), 0.0))
        return timeout

    def _preflight(self) -> None:
        """Wait for the cluster; check topics, dead-letter topics and the dedup window."""
        preflight(
            self._source,
            self.settings,
            list(self._chains),
            self._stop_requested,
            dedup=self._dedup is not None,
            dead_letter=self._dead_letter is not None,
        )

    def _admit(self, raws: list[Any]) -> list[tuple[Message, PartitionState]]:
        """Keep the records of partitions this worker owns and has not finished (bounded runs)."""
        admitted = []
        parts = self._partitions
        for msg in map(message_from_kafka, raws):
            state = parts.get((msg[0], msg[1]))
            if state is None or state.done:
                continue
            if state.end is not None and msg[2] >= state.end:
                self._partition_done(msg[0], msg[1], state)
                continue
            admitted.append((msg, state))
        return admitted

    def _claim(self, admitted: list[tuple[Message, PartitionState]]) -> list[Item]:
        """With dedup on, claim every record's key in one round trip; otherwise pass them through."""
        if self._dedup is None:
            return [(m, state, None, None) for m, state in admitted]
        keys = [self._dedup.key(m) for m, _ in admitted]
        statuses = self._dedup.claim(keys) if keys else []
        return [(m, state, k, s) for (m, state), k, s in zip(admitted, keys, statuses, strict=True)]

    def _process(self, item: Item) -> None:
        """Run one record through its topic's chain (unless already done) and mark it finished."""
        msg, state, key, status = item
        if state.gone or state.retry is not None or status is ClaimStatus.CONTESTED:
            status = self._unblock(state, key, status)
            if status is None:
                return
        offset = msg.offset
        topic_stats = self._topic_stats[msg.topic]
        first = msg.attempt == 1
        if first:
            if state.first_offset is None:
                state.first_offset = offset
            # Not marked started before the chain: the committable offset cannot pass a record
            # that was never started, and in-order processing never starts a later one first.
            state.last_ts = msg.timestamp
            self._since_commit += 1
            if offset < state.reprocess_below:
                topic_stats.reprocessed += 1
        if status is ClaimStatus.DONE:
            topic_stats.deduplicated += 1
            self._finished(state, offset, first)
        else:
            outcome = self._run_chain(msg, key, topic_stats)
            if outcome is _DONE and key is None and first:
                state.offsets.complete(offset)  # the common case, inlined
            elif not self._settle(state, offset, first, key, outcome):
                return  # in flight until its retry; the partition waits for it
        if state.end is not None and offset + 1 >= state.end:
            self._partition_done(msg.topic, msg.partition, state)

    def _unblock(
        self, state: PartitionState, key: bytes | None, status: ClaimStatus | None
    ) -> ClaimStatus | None:
        """A record not to run now (None), or the claim status once another worker's claim is gone."""
        if status is ClaimStatus.CONTESTED and key is not None and self._dedup is not None and not state.gone:
            status = self._dedup.resolve_contested(key)  # polls meanwhile: a revoke may happen
        if state.gone or state.retry is not None:
            # Not ours any more (revoked), or behind a record awaiting its retry: give the claim back.
            if key is not None and status is ClaimStatus.CLAIMED and self._dedup is not None:
                self._dedup.release([key])
            return None
        return status

    def _settle(
        self, state: PartitionState, offset: int, first: bool, key: bytes | None, outcome: _Outcome
    ) -> bool:
        """Finish a record after its chain (or queue its dedup mark); False if it awaits a retry."""
        if outcome is _RETRY:
            if first:
                state.offsets.start(offset)  # in flight until the retry settles it
            return False
        if key is None or outcome is _PARKED:
            # A parked record's key is released, not marked done: a replay must run it again.
            if key is not None and self._dedup is not None:
                self._dedup.release([key])
            self._finished(state, offset, first)
        else:
            if first:
                state.offsets.start(offset)  # in flight until its mark lands
            self._pending.append((state, offset, key))
            if self._dedup is not None and self._dedup.per_record:
                self._flush_marks()
        return True

    @staticmethod
    def _finished(state: PartitionState, offset: int, first: bool) -> None:
        if first:
            state.offsets.complete(offset)
        else:
            state.offsets.finish(offset)

    def _run_chain(self, msg: Message, key: bytes | None, topic_stats: TopicStats) -> _Outcome:
        """Run the chain with the loop's lock released (the keep-alive may poll meanwhile).

        Returns _DONE, _RETRY (scheduled) or _PARKED (in the dead-letter topic); raises
        RecordFailed when the record failed and there is no dead-letter topic.
        """
        lock = self._lock
        current_record.msg = msg
        self._chain_started = started = time.perf_counter()
        outcome = _DONE
        lock.release()
        try:
            self._chains[msg.topic](msg)
        except DropRecord:
            lock.acquire()
            topic_stats.dropped += 1
        except RetryRecord as retry:
            lock.acquire()
            self._schedule_retry(msg, key, retry)
            outcome = _RETRY
        except Exception as exc:  # noqa: BLE001 - any failure of app code is parked or stops the worker
            lock.acquire()
            self._chain_ended(started, topic_stats)
            return self._fail(msg, key, exc, topic_stats)
        except BaseException:
            lock.acquire()
            raise
        else:
            lock.acquire()
            topic_stats.ok += 1
            # _chain_ended, inlined for the common case
            elapsed = time.perf_counter() - started
            self._chain_started = None
            current_record.msg = None
            hist = topic_stats.handler_seconds
            hist.counts[bisect_left(hist.bounds, elapsed)] += 1
            hist.sum += elapsed
            if self._keepalive.active:
                self._keepalive.chain_returned()
            return _DONE
        self._chain_ended(started, topic_stats)
        return outcome

    def _chain_ended(self, started: float, topic_stats: TopicStats) -> None:
        elapsed = time.perf_counter() - started
        self._chain_started = None
        current_record.msg = None
        hist = topic_stats.handler_seconds  # Histogram.observe, inlined for the hot path
        hist.counts[bisect_left(hist.bounds, elapsed)] += 1
        hist.sum += elapsed
        if self._keepalive.active:
            self._keepalive.chain_returned()

    def _fail(self, msg: Message, key: bytes | None, exc: Exception, topic_stats: TopicStats) -> _Outcome:
        """Park a failed record in its dead-letter topic, or stop the worker if there is none."""
        if self._dead_letter is None:
            topic_stats.failed += 1
            if key is not None and self._dedup is not None:
                self._dedup.release([key])
            raise RecordFailed(msg.topic, msg.partition, msg.offset, exc) from exc
        dlq_topic = self.settings.dead_letter_topic(msg.topic)
        sink = self._dead_letter
        self._blocking(
            "dead-letter write",
            lambda: sink.park(msg, exc, dlq_topic, self.settings.kafka.group_id, self.worker_id),
        )
        topic_stats.dead_lettered += 1
        log.warning(
            "record parked in the dead-letter topic",
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            dead_letter_topic=dlq_topic,
            attempts=msg.attempt,
            error=f"{type(exc).__name__}: {exc}",
        )
        return _PARKED

    # -- retries: the partition waits, the group and the other partitions do not ---------------------

    def _schedule_retry(self, msg: Message, key: bytes | None, retry: RetryRecord) -> None:
        """Hold ``msg`` for its next attempt; pause its partition and rewind to just after it."""
        tp = (msg.topic, msg.partition)
        state = self._partitions.get(tp)
        if state is None or state.gone:
            return
        self.stats.retries += 1
        nxt = msg._replace(attempt=msg.attempt + 1)
        state.retry = (
            time.monotonic() + retry.delay,
            (nxt, state, key, ClaimStatus.CLAIMED if key else None),
        )
        self._pause([tp], "retry")
        # Records after it that were already fetched are dropped from this batch and fetched again.
        self._source.seek(tp, msg.offset + 1)
        log.info(
            "record will be retried",
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            attempt=msg.attempt,
            retry_in=round(retry.delay, 3),
            error=None if retry.cause is None else f"{type(retry.cause).__name__}: {retry.cause}",
        )

    def _run_due_retries(self) -> None:
        now = time.monotonic()
        for tp, state in self.partitions():
            if state.retry is None or state.retry[0] > now or state.gone:
                continue
            _, (msg, _, key, _) = state.retry
            state.retry = None
            self._resume([tp], "retry")
            status = self._dedup.claim([key])[0] if key is not None and self._dedup is not None else None
            self._process((msg, state, key, status))

    def _after_batch(self, processed: bool) -> None:
        """Housekeeping once per batch: processed high-water marks, watermarks of paused partitions."""
        if processed and self._highwater is not None:
            self._highwater.save(
                {
                    tp: state.offsets.next_offset - 1
                    for tp, state in list(self._partitions.items())
                    if state.offsets.next_offset is not None
                }
            )
        if time.monotonic() - self._watermarks_refreshed >= self.settings.metrics.watermark_refresh_seconds:
            self._refresh_paused_watermarks()

    def _refresh_paused_watermarks(self) -> None:
        """librdkafka stops updating the watermarks of paused partitions: ask the broker."""
        self._watermarks_refreshed = time.monotonic()
        for tp, state in list(self._partitions.items()):
            if state.paused:
                try:
                    state.high_watermark = self._source.watermarks(tp, timeout=1.0)[1]
                except KafkaException as exc:
                    log.debug("watermark refresh failed", partition=f"{tp[0]}[{tp[1]}]", error=str(exc))

    def _on_stats(self, raw: str) -> None:
        """librdkafka statistics (inside poll): take each assigned partition's high watermark."""
        try:
            topics = json.loads(raw).get("topics", {})
        except ValueError:
            return
        for (topic, partition), state in list(self._partitions.items()):
            stats = topics.get(topic, {}).get("partitions", {}).get(str(partition))
            if stats and not state.paused and stats.get("hi_offset", -1) >= 0:
                state.high_watermark = stats["hi_offset"]
                state.stats_lag = stats.get("consumer_lag")

    def _lease_half_gone(self, claimed_at: float) -> bool:
        return self._dedup is not None and time.monotonic() - claimed_at > self._dedup.lease_seconds / 2

    def _renew(self, batch: list[Item], start: int) -> float:
        """Extend the leases of the batch's records not yet run (slow handlers); one round trip.

        A lease that expired meanwhile and was taken by another worker comes back CONTESTED, and
        that record then waits for the other worker instead of running twice.
        """
        if self._dedup is not None:
            todo = [(i, key) for i in range(start, len(batch)) if (key := batch[i][2]) is not None]
            statuses = self._dedup.claim([key for _, key in todo])
            for (i, _), status in zip(todo, statuses, strict=True):
                msg, state, key, _ = batch[i]
                batch[i] = (msg, state, key, status)
        return time.monotonic()

    def _release(self, items: list[Item]) -> None:
        """Give back the claims of records the loop will not run (stopping mid-batch)."""
        if self._dedup is not None:
            self._dedup.release(
                [key for _, _, key, status in items if key is not None and status is ClaimStatus.CLAIMED]
            )

    # -- marks and commits ------------------------------------------------------------------------

    def _flush_marks(self, *, block: bool = True) -> None:
        """Mark the keys of records whose chain succeeded done, then let their offsets be committed."""
        if not self._pending or self._dedup is None:
            return
        if not self._dedup.mark_done([key for _, _, key in self._pending], block=block):
            return  # the store is down and we may not wait: these offsets stay uncommitted
        for state, offset, _ in self._pending:
            state.offsets.finish(offset)
        self._pending.clear()

    def _refresh_due(self) -> None:
        """When the next commit is due, from the policy's interval in effect and the last commit."""
        every_records, every_seconds = self._policy.every_records, self._policy.every_seconds
        self._due_records = every_records or math.inf
        self._due_at = self._last_commit + every_seconds if every_seconds else math.inf

    def _checkpoint(self) -> None:
        """Steady-state checkpoint: land pending marks, then commit asynchronously.

        At most a few asynchronous commits in flight: the broker answers a group's commits one by
        one (a few ms each), and an unbounded queue of them delays heartbeats until the session
        times out. When the limit is reached the next commit waits; an acknowledgement makes it
        due at once.
        """
        self._flush_marks()
        if len(self._commit_sent) >= _MAX_COMMITS_IN_FLIGHT:
            now = time.monotonic()
            waited = now - self._commit_sent[0]
            if waited > _COMMIT_ACK_WARN_S and now - self._ack_warned > _COMMIT_ACK_WARN_S:
                self._ack_warned = now
                log.warning(
                    "asynchronous commit unacknowledged; the next one waits for it",
                    waited_seconds=round(waited, 1),
                )
            self._due_records, self._due_at = math.inf, now + 0.005
            return
        self._commit(asynchronous=True)

    def _commit(
        self,
        *,
        asynchronous: bool,
        only: list[TP] | None = None,
        state: str = "running",
        recommit: bool = True,
    ) -> None:
        """Commit every partition whose committable offset moved; reset the policy's counters.

        Synchronous commits (revoke, shutdown) also re-commit unmoved offsets, so that the
        metadata records how the run ended.
        """
        offsets: dict[TP, int] = {}
        for tp in only if only is not None else list(self._partitions):
            part = self._partitions.get(tp)
            if part is None:
                continue
            offset = part.offsets.to_commit()
            if offset is None and not asynchronous and recommit:
                offset = part.offsets.committed
            if offset is not None:
                offsets[tp] = offset
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._refresh_due()
        if not offsets:
            return
        metadata = f"streamer/1 state={state} run_start={self._run_start} at={int(time.time())}"
        started = time.monotonic()
        try:
            self._source.commit(offsets, metadata, asynchronous=asynchronous)
            if asynchronous:
                self._commit_sent.append(started)
        except KafkaException as exc:
            self.stats.commit_errors += 1
            log.warning("commit failed", error=str(exc), asynchronous=asynchronous)
            if not asynchronous:
                raise
            return
        for tp, offset in offsets.items():
            self._partitions[tp].offsets.mark_committed(offset)
        if not asynchronous:
            cost = time.monotonic() - started
            self.stats.commits += 1
            self.stats.commit_seconds_sync.observe(cost)
            self._policy.committed(cost)
            self._acknowledged(offsets.items())
            log.info("committed", offsets=_show(offsets), reason=state)

    def _on_commit(self, err: KafkaError | None, partitions: list[Any]) -> None:
        """Asynchronous commit result (runs inside poll)."""
        sent = self._commit_sent.popleft() if self._commit_sent else None
        self._refresh_due()
        failed = [p for p in partitions if p.error is not None]
        if (err is not None and err.code() != KafkaError._NO_OFFSET) or failed:
            self.stats.commit_errors += 1
            log.warning(
                "asynchronous commit failed",
                error=err.str() if err else str(failed[0].error),
                partitions=_show_tps([(p.topic, p.partition) for p in failed or partitions]),
            )
            # Not committed after all: let the next commit send these offsets again.
            for p in failed or partitions:
                state = self._partitions.get((p.topic, p.partition))
                if state is not None:
                    state.offsets.revert_committed(state.acked_offset)
            if err is not None:
                return
        self.stats.commits += 1
        if sent is not None:
            self.stats.commit_seconds_async.observe(time.monotonic() - sent)
            self._policy.committed(time.monotonic() - sent)
        self._acknowledged(((p.topic, p.partition), p.offset) for p in partitions if p.error is None)

    def _acknowledged(self, offsets: Iterable[tuple[TP, int]]) -> None:
        now = time.time()
        for tp, offset in offsets:
            state = self._partitions.get(tp)
            # Acknowledgements arrive in order, but a late one must never move the gauge back.
            if (
                state is not None
                and offset >= 0
                and (state.acked_offset is None or offset >= state.acked_offset)
            ):
                state.acked_offset, state.acked_at = offset, now

    # -- rebalance --------------------------------------------------------------------------------

    def _on_assign(self, partitions: list[TP]) -> None:
        self.stats.rebalances += 1
        self.stats.assigned += 1
        self._ever_assigned = True
        self.joined = True
        committed = self._source.committed(partitions) if partitions else {}
        self._observe_failures(committed)
        marks = self._highwater.load(partitions) if self._highwater is not None else {}
        for tp in partitions:
            start = committed[tp].offset if tp in committed else None
            state = PartitionState(PartitionOffsets(committed=start), acked_offset=start)
            state.reprocess_below = marks.get(tp, -1) + 1
            if self._until_end:
                low, high = self._source.watermarks(tp)
                reset_to_low = self.settings.kafka.auto_offset_reset == "earliest"
                first = start if start is not None else (low if reset_to_low else high)
                state.end = high
                self.stats.total = (self.stats.total or 0) + max(high - first, 0)
                state.done = first >= high
            self._partitions[tp] = state
        done = [tp for tp in partitions if self._partitions[tp].done]
        if done:
            self._pause(done, "done")
        if self._paused_for_outage:
            self._pause(partitions, "outage")
        log.info(
            "partitions assigned",
            partitions=_show_tps(partitions),
            resume_from=_show({tp: c.offset for tp, c in committed.items()}),
        )

    def _on_revoke(self, partitions: list[TP]) -> None:
        """Commit what finished in ``partitions`` before handing them over; no chain is running."""
        self.stats.rebalances += 1
        self.stats.revoked += 1
        mine = [tp for tp in partitions if tp in self._partitions]
        self._flush_marks(block=False)
        try:
            # When closing, the final commit has just recorded a clean stop: commit only what moved.
            self._commit(asynchronous=False, only=mine, state="handoff", recommit=not self._closing)
        except KafkaException as exc:
            log.warning(
                "commit on revoke failed; the next owner re-reads since the last commit", error=str(exc)
            )
        for tp in mine:
            state = self._partitions.pop(tp)
            state.gone = True
            if state.retry is not None and state.retry[1][2] is not None and self._dedup is not None:
                self._dedup.release([state.retry[1][2]])  # abandoned: the next owner retries it
        log.info("partitions revoked", partitions=_show_tps(partitions))

    def _on_lost(self, partitions: list[TP]) -> None:
        """Partitions taken away without a handover: another worker may own them, never commit."""
        self.stats.rebalances += 1
        self.stats.lost += 1
        for tp in partitions:
            state = self._partitions.pop(tp, None)
            if state is not None:
                state.gone = True
        log.warning("partitions lost", partitions=_show_tps(partitions))

    def _observe_failures(self, committed: Mapping[TP, Committed]) -> None:
        """Count earlier runs that stopped without a clean commit: the adaptive policy's MTBF."""
        failed_runs: dict[str, float] = {}
        for entry in committed.values():
            meta = _parse_metadata(entry.metadata)
            if meta.get("state") == "running" and "run_start" in meta and "at" in meta:
                uptime = float(meta["at"]) - float(meta["run_start"])
                failed_runs[meta["run_start"]] = max(uptime, failed_runs.get(meta["run_start"], 0))
        for run_start, uptime in failed_runs.items():
            if run_start != str(self._run_start):
                log.info("earlier run ended without a clean stop", uptime_seconds=uptime)
                self._policy.failure_observed(uptime)

    # -- dedup outages: stay in the group with partitions paused ----------------------------------

    @property
    def lock(self) -> threading.RLock:
        """The loop's lock: held by the loop except while a chain runs."""
        return self._lock

    @property
    def chain_started(self) -> float | None:
        """perf_counter() when the running chain started, or None between chains."""
        return self._chain_started

    def pause_all(self, reason: str) -> None:
        """Pause every assigned partition for ``reason``."""
        self._pause(list(self._partitions), reason)

    def resume_all(self, reason: str) -> None:
        """Lift ``reason`` from every assigned partition."""
        self._resume(list(self._partitions), reason)

    def _outage(self, started: bool) -> None:
        """Pause every assigned partition while a store is down; resume when it is back."""
        self._paused_for_outage = started
        (self._pause if started else self._resume)(list(self._partitions), "outage")

    def _blocking(self, what: str, call: Callable[[], None]) -> None:
        """Retry ``call`` until it succeeds, failing closed meanwhile (partitions paused, no commit)."""
        delay, down = 0.2, False
        while True:
            try:
                call()
            except DeadLetterUnavailableError as exc:
                if not down:
                    down = True
                    log.error(
                        "failed; pausing partitions, committing nothing past it", op=what, error=str(exc)
                    )
                    self._outage(True)
                else:
                    log.warning("still failing", op=what, error=str(exc), retry_in=round(delay, 2))
                if not self._serve_group(delay):
                    raise StopDuringOutageError(f"stop requested while retrying the {what}") from exc
                delay = min(delay * 2, 5.0)
                continue
            if down:
                log.info("succeeded again; resuming partitions", op=what)
                self._outage(False)
            return

    def _pause(self, partitions: list[TP], reason: str) -> None:
        """Pause ``partitions`` for ``reason``; a partition is fetched again once no reason is left."""
        newly = []
        for tp in partitions:
            state = self._partitions.get(tp)
            if state is not None:
                if not state.paused_for:
                    newly.append(tp)
                state.paused_for.add(reason)
        if newly:
            self._source.pause(newly)

    def _resume(self, partitions: list[TP], reason: str) -> None:
        freed = []
        for tp in partitions:
            state = self._partitions.get(tp)
            if state is not None and reason in state.paused_for:
                state.paused_for.discard(reason)
                if not state.paused_for:
                    freed.append(tp)
        if freed:
            self._source.resume(freed)

    def _serve_group(self, seconds: float) -> bool:
        """Keep polling (heartbeats, rebalances) for ``seconds`` without taking new records.

        Every partition is paused, but one assigned meanwhile may deliver records: they are
        rewound, so that nothing is skipped. Returns False once a stop is requested.
        """
        # Outside an outage this is a wait for another worker's claim: the partitions that deliver
        # records meanwhile are paused for the wait only, and fetched again after it.
        reason = "outage" if self._paused_for_outage else "waiting"
        deadline = time.monotonic() + seconds
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                if self._stop_requested.is_set():
                    return False
                self.poll_paused(min(remaining, 0.2), reason)
        finally:
            if reason == "waiting":
                self.resume_all("waiting")
        return not self._stop_requested.is_set()

    def poll_paused(self, timeout: float, reason: str) -> None:
        """Poll once without taking records: serves heartbeats, rebalances and commit callbacks.

        Partitions are paused for ``reason``; one assigned during this poll may still deliver
        records: they are rewound (and it is paused too), so that nothing is skipped.
        """
        rewind: dict[TP, int] = {}
        for raw in self._source.poll(100, timeout):
            tp = (raw.topic(), raw.partition())
            rewind[tp] = min(raw.offset(), rewind.get(tp, raw.offset()))
        self.stats.last_poll = time.monotonic()
        for tp, offset in rewind.items():
            self._pause([tp], reason)
            self._source.seek(tp, offset)
        if time.monotonic() - self._watermarks_refreshed >= self.settings.metrics.watermark_refresh_seconds:
            self._refresh_paused_watermarks()

    # -- bounded runs and stopping ----------------------------------------------------------------

    def _partition_done(self, topic: str, partition: int, state: PartitionState) -> None:
        if not state.done:
            state.done = True
            self._pause([(topic, partition)], "done")

    def _finished_bounded_run(self) -> bool:
        """A bounded run ends when its partitions reached their end offsets.

        A worker with no partitions (it joined a group whose partitions are all owned; with
        cooperative-sticky the first assignment of a newcomer is empty) is not done: it waits until
        the group has committed every partition of its topics up to the end offsets.
        """
        if not self._until_end or not self._ever_assigned:
            return False
        if self._partitions:
            return all(state.done for state in self._partitions.values())
        return self._group_reached_end()

    def _group_reached_end(self) -> bool:
        now = time.monotonic()
        if now - self._group_end_checked < 1.0:
            return False
        self._group_end_checked = now
        try:
            if self._group_end is None:
                topics = self._source.describe_topics(list(self._chains))
                self._group_end = {
                    (t, p): self._source.watermarks((t, p))[1]
                    for t, info in topics.items()
                    if info is not None
                    for p in range(info.partitions)
                }
            committed = self._source.committed(list(self._group_end))
        except KafkaException as exc:
            log.debug("could not check the group's progress", error=str(exc))
            return False
        return all((committed[tp].offset or 0) >= end for tp, end in self._group_end.items())

    def request_stop(self, reason: str = "requested") -> None:
        """Stop fetching; the loop finishes the record in hand, commits and closes. Thread-safe."""
        if not self._stop_requested.is_set():
            log.info("stop requested", reason=reason)
        self._stopping = True
        self._stop_requested.set()

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested."""
        return self._stop_requested.is_set()

    def partitions(self) -> list[tuple[TP, PartitionState]]:
        """A snapshot of the assigned partitions and their state (for metrics; any thread)."""
        return list(self._partitions.items())

    @property
    def policy(self) -> CommitPolicy:
        """The commit policy in effect."""
        return self._policy

    @property
    def paused_for_outage(self) -> bool:
        """Whether partitions are paused because the dedup store is down."""
        return self._paused_for_outage

    def commit_finished_now(self) -> None:
        """Synchronously commit what has finished; used when the drain timeout runs out."""
        locked = self._lock.acquire(timeout=5.0)
        try:
            self._commit(asynchronous=False, state="abandoned")
        finally:
            if locked:
                self._lock.release()

    def _shutdown(self) -> None:
        self._keepalive.stop()
        self._flush_marks(block=False)
        self._final_commit()
        self._closing = True
        self._source.close()
        if isinstance(self._dead_letter, KafkaDeadLetterSink):
            self._dead_letter.close()
        self._lock.release()
        log.info(
            "worker stopped",
            processed=self.stats.processed,
            dropped=self.stats.dropped,
            dedup_hits=self.stats.dedup_hits,
            commits=self.stats.commits,
            seconds=round(time.monotonic() - self.stats.started_at, 3),
        )

    #: Commit errors worth waiting out: the group is rebalancing, the commit can succeed after it.
    _REBALANCING = frozenset(
        {
            "ILLEGAL_GENERATION",
            "REBALANCE_IN_PROGRESS",
            "UNKNOWN_MEMBER_ID",
            "NOT_COORDINATOR",
            "COORDINATOR_LOAD_IN_PROGRESS",
            "_WAIT_COORD",
        }
    )

    def _final_commit(self, attempts: int = 10) -> None:
        """Commit everything finished, synchronously; wait out a rebalance that makes it fail.

        A stop that lands while the group rebalances gets ILLEGAL_GENERATION: keep polling (with
        partitions paused, so no record is taken) until the rebalance is over, then commit again;
        partitions revoked meanwhile were committed by the revoke. If it still fails, the run
        exits non-zero: something finished is not committed.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._commit(asynchronous=False, state="clean")
            except KafkaException as exc:
                code = exc.args[0].name() if exc.args and isinstance(exc.args[0], KafkaError) else ""
                if code not in self._REBALANCING or attempt == attempts:
                    log.error("final commit failed", error=str(exc), attempt=attempt)
                    self._final_commit_failed = True
                    return
                log.info("final commit waits for the rebalance to finish", error=code, attempt=attempt)
                self.pause_all("stopping")
                self.poll_paused(0.5, "stopping")
            else:
                return

    @property
    def final_commit_failed(self) -> bool:
        """Whether the last commit of the run failed (the run then exits with code 1)."""
        return self._final_commit_failed


class _Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    PARKED = "parked"


_DONE, _RETRY, _PARKED = _Outcome.DONE, _Outcome.RETRY, _Outcome.PARKED


def _max_poll_interval(settings: Settings) -> float:
    """librdkafka's max.poll.interval.ms in seconds (default 300 s)."""
    return float(settings.kafka.librdkafka_client().get("max.poll.interval.ms", 300_000)) / 1000


def _parse_metadata(metadata: str | None) -> dict[str, str]:
    if not metadata or not metadata.startswith("streamer/1 "):
        return {}
    return dict(part.split("=", 1) for part in metadata.split()[1:] if "=" in part)


def _show(offsets: Mapping[TP, int | None]) -> dict[str, int | None]:
    return {f"{t}[{p}]": o for (t, p), o in sorted(offsets.items())}


def _show_tps(partitions: list[TP]) -> list[str]:
    return [f"{t}[{p}]" for t, p in sorted(partitions)]

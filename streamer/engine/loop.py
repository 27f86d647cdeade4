"""The worker: one loop that owns the consumer and never runs application code.

Each turn of the loop polls (or, while the processing thread is behind, serves the group with
partitions paused), takes what the processing thread finished, commits when the policy says so,
fires what is due (retries, lease renewals) and hands the next batch over. Waiting is a pause
reason on a partition with a due time, never a nested poll.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from confluent_kafka import KafkaException

from streamer.chain import Handler, is_async
from streamer.commit import CommitPolicy, policy_from_settings
from streamer.deadletter import DeadLetterSink, KafkaDeadLetterSink
from streamer.dedup import (
    DedupStage,
    DedupUnavailableError,
    KeyBuilder,
    KeyFunction,
    KeyLayout,
    RedisDedupStore,
    shard_bits_for,
)
from streamer.dedup import activate as activate_dedup
from streamer.engine.batches import BatchChain, BatchProcessor
from streamer.engine.checkpoint import Checkpoint
from streamer.engine.dispatch import ConcurrentProcessor
from streamer.engine.outputs import Outputs
from streamer.engine.partition import TP, PartitionState, take_finished
from streamer.engine.processor import (
    OVERRUN_GRACE_S,
    Batch,
    Event,
    OffsetsReset,
    Processor,
    Retry,
    RetryScheduled,
    RetrySettled,
)
from streamer.engine.rebalance import RebalanceListener
from streamer.errors import ConfigError, RecordFailed
from streamer.exitcodes import EXIT_DRAIN_TIMEOUT, EXIT_FAILED, EXIT_OK
from streamer.highwater import HighWaterStore
from streamer.preflight import preflight
from streamer.redis_client import redis_client
from streamer.settings import Settings
from streamer.source import KafkaSource, Source, admin_config
from streamer.stats import TopicStats, WorkerStats

log = structlog.get_logger("streamer.worker")

#: Seconds the loop waits for the processing thread to take the next batch before it pauses
#: every partition and serves the group while holding it (a slow handler, a store outage).
_HOLD_BEFORE_PAUSE_S = 1.0
#: Longest the loop goes without polling while it waits for the processing thread.
_SERVE_INTERVAL_S = 0.2
#: Commit errors worth waiting out at the end of a run: a rebalance or a moving coordinator.
_REBALANCING = frozenset(
    {
        "ILLEGAL_GENERATION",
        "REBALANCE_IN_PROGRESS",
        "NOT_COORDINATOR",
        "COORDINATOR_LOAD_IN_PROGRESS",
        "COORDINATOR_NOT_AVAILABLE",
        "_WAIT_COORD",
        "REQUEST_TIMED_OUT",
    }
)


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
        self.stats.topics = {topic: TopicStats() for topic in chains}
        for topic, topic_stats in self.stats.topics.items():
            timeout = settings.topic(topic).timeout_seconds
            topic_stats.overrun_after = timeout + OVERRUN_GRACE_S if timeout > 0 else 0.0
        self.worker_id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._topics = sorted(chains)
        self._until_end = until_end
        self._run_start = f"{time.time():.3f}"  # this run, in the commit metadata
        self._batch_size = settings.kafka.poll_batch_size
        self._source: Source = source or KafkaSource(settings.kafka, on_stats=self._on_stats)
        self._states: dict[TP, PartitionState] = {}
        self._policy = policy or policy_from_settings(settings.commit)
        processing = settings.processing
        limits = {t: settings.topic(t).concurrency or processing.concurrency for t in chains}
        # Exactly-once: one transactional producer; its transactions carry the checkpoints.
        self._transaction = self._transaction_from_settings(chains, limits)
        self._checkpoint = Checkpoint(
            self._source,
            self._policy,
            self.stats,
            self._run_start,
            transaction=self._transaction,
            states=self._states,
            idle_clock=self._processor_idle,
        )
        self._highwater = self._highwater_from_settings()
        common: dict[str, Any] = {
            "dedup": None,
            "dead_letter": dead_letter if dead_letter is not None else self._dead_letter_from_settings(),
            "dead_letter_topic": settings.dead_letter_topic,
            "highwater": self._highwater,
            "group": settings.kafka.group_id,
            "worker_id": self.worker_id,
            "outputs": self._transaction,
            "outputs_factory": self._outputs,
        }
        self._processor: Processor
        batch_topics = [t for t, chain in chains.items() if isinstance(chain, BatchChain)]
        if batch_topics:
            if max(limits.values()) > 1:
                raise ConfigError(
                    f"topics {batch_topics}: batch handlers run one batch at a time; [processing] "
                    "concurrency (and [topics.NAME] concurrency) must be 1 in an app with a batch handler"
                )
            self._processor = BatchProcessor(chains, self._states, self.stats, **common)
        elif max(limits.values()) > 1 or any(is_async(chain) for chain in chains.values()):
            self._processor = ConcurrentProcessor(
                chains,
                self._states,
                self.stats,
                concurrency=max(limits.values()),
                limits=limits,
                orderings={t: settings.topic(t).ordering or processing.ordering for t in chains},
                map_chars=processing.offset_map_chars,
                batch_size=settings.kafka.poll_batch_size,
                every_records=self._policy.every_records,
                **common,
            )
        else:
            self._processor = Processor(chains, self._states, self.stats, **common)
        # The dedup stage waits on the processing thread's timer, so it is built after it.
        self._dedup = dedup or self._dedup_from_settings(key_fn)
        self._processor.dedup = self._dedup
        self._rebalance = RebalanceListener(
            self._source,
            self._states,
            self._processor,
            self._checkpoint,
            self.stats,
            until_end=until_end,
            earliest=settings.kafka.auto_offset_reset == "earliest",
            highwater=self._highwater,
            # The revoke waits for a running record inside poll: well inside max.poll.interval.ms.
            settle_timeout=min(settings.shutdown.drain_timeout, _max_poll_seconds(settings) / 3),
            run_start=self._run_start,
            on_retired=self._retired,
            on_handover=self._dedup.hand_over if self._dedup is not None else None,
        )
        self._stop_requested = threading.Event()
        self._stopping = False
        self._drain_deadline = float("inf")
        self._held: list[tuple[list[Any], dict[TP, PartitionState]]] = []
        self._held_since = 0.0
        self._retries: dict[TP, Retry] = {}
        self._renewed_at = time.monotonic()
        self._watermarks_at = time.monotonic()
        self._group_end: dict[TP, int] | None = None
        self._group_end_checked = 0.0
        self._lost_uncommitted = False
        self._final_commit_failed = False
        self._drain_expired = False
        self._blocked_logged = False
        self._long_chain_logged: float | None = None
        self._max_poll_s = _max_poll_seconds(settings)

    def _dedup_from_settings(self, key_fn: KeyFunction | None) -> DedupStage | None:
        cfg = self.settings.dedup
        group = self.settings.kafka.group_id
        keys = KeyBuilder(cfg.namespace, group, cfg.key_header, key_fn)
        if not cfg.enabled:
            activate_dedup(keys, None)  # streamer.dedup.idempotency_key works for every handler
            return None
        layout = KeyLayout(cfg.namespace, group, shard_bits_for(cfg.expected_keys))
        store = RedisDedupStore(
            redis_client(cfg),
            layout,
            window_ms=int(cfg.window_seconds * 1000),
            legacy=cfg.legacy_marks,
            partition_local_ids=cfg.partition_local_ids,
            refuse_unsafe=cfg.redis_checks == "refuse",
        )
        try:
            store.start()  # refuse a Redis that would lose marks before joining the group
        except DedupUnavailableError as exc:
            log.warning("dedup Redis unreachable at start; checked on first contact", error=str(exc))
        # The claim token is this process's own: two live processes (a zombie and its
        # replacement with the same group.instance.id) never share a claim.
        processor = self._processor
        stage = DedupStage(store, cfg, keys, self.stats, self.worker_id, processor.sleep, processor.on_outage)
        activate_dedup(keys, stage)
        return stage

    def _dead_letter_from_settings(self) -> DeadLetterSink | None:
        if not self.settings.dead_letter.enabled:
            return None
        timeout = self.settings.dead_letter.timeout
        transaction = self._transaction
        if transaction is not None:  # dead-letter writes join the transaction
            return KafkaDeadLetterSink(
                admin_config(self.settings.kafka),
                timeout=timeout,
                producer_factory=lambda _c: transaction.producer,
                shared=True,
            )
        return KafkaDeadLetterSink(admin_config(self.settings.kafka), timeout=timeout)

    def _outputs(self, transactional_id: str | None = None) -> Outputs:
        processing = self.settings.processing
        # Serial dispatch waits for outputs with a flush; concurrent dispatch awaits each one.
        # Exactly-once keeps every report: its dead-letter writes wait for theirs on this producer.
        processor = getattr(self, "_processor", None)
        errors_only = transactional_id is None and not isinstance(processor, ConcurrentProcessor)
        return Outputs(
            {**admin_config(self.settings.kafka), "logger": logging.getLogger("streamer.librdkafka")},
            self.stats,
            key_header=self.settings.dedup.key_header,
            transactional_id=transactional_id,
            timeout_s=processing.output_timeout_seconds,
            buffer=processing.output_buffer,
            transaction_timeout_s=processing.transaction_timeout_seconds,
            errors_only=errors_only,
        )

    def _transaction_from_settings(
        self, chains: Mapping[str, Handler], limits: Mapping[str, int]
    ) -> Outputs | None:
        if self.settings.processing.guarantee != "exactly_once":
            return None
        odd = sorted(
            t for t, c in chains.items() if isinstance(c, BatchChain) or is_async(c) or limits[t] > 1
        )
        if odd:
            raise ConfigError(
                f'[processing] guarantee = "exactly_once" runs sync handlers one at a time; topics {odd} '
                "have an async or batch handler or concurrency > 1 (use concurrency = 1 and `def` handlers, "
                'or guarantee = "at_least_once" with dedup)'
            )
        every_s, txn_s = self._policy.every_seconds, self.settings.processing.transaction_timeout_seconds
        if not 0 < every_s <= txn_s / 2:
            raise ConfigError(
                '[processing] guarantee = "exactly_once" commits a transaction every [commit] '
                "every_seconds, which must be > 0 and at most half of [processing] "
                f"transaction_timeout_seconds ({txn_s} s) so that the broker never aborts an open "
                f"one; got every_seconds = {every_s}"
            )
        # KIP-447: the group's generation fences a zombie, so the id only has to be unique.
        return self._outputs(f"streamer-{self.settings.kafka.group_id}-{self.worker_id}")

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
            topics=self._topics,
            until_end=self._until_end,
            every_records=self._policy.every_records,
            every_seconds=self._policy.every_seconds,
            dedup=self._dedup is not None,
            concurrency=getattr(self._processor, "concurrency", 1),
        )
        preflight(
            self._source,
            self.settings,
            self._topics,
            self._stop_requested,
            dedup=self._dedup is not None,
            dead_letter=self._processor._dead_letter is not None,
        )
        r = self._rebalance
        self._source.subscribe(self._topics, r.on_assign, r.on_revoke, r.on_lost)
        self._processor.start()
        while not self._finished():
            self._turn()
        return self._shutdown()

    def _turn(self) -> None:
        """One turn: poll or serve, collect, commit if due, fire timers, hand the next batch over.

        The commit goes before the next batch: what finished after the commit became due, plus
        what runs while it is sent, is at most the two batches already handed over (the bound
        on re-reading is ``every_records`` + two poll batches).
        """
        if not self._held:
            raws = self._source.poll(self._batch_size, self._poll_timeout())
            self.stats.last_poll = time.monotonic()
            if raws and not self._stopping:
                self._held.append((raws, dict(self._states)))
                self._held_since = self.stats.last_poll
        elif not self._wait_for_room():
            self._serve()
        concurrent = self._processor if isinstance(self._processor, ConcurrentProcessor) else None
        published = concurrent.published_total if concurrent is not None else 0  # what a commit covers
        self._collect()
        now = time.monotonic()
        # Concurrent dispatch starts no record while too many finished ones wait for a commit:
        # commit now (a handoff may already have covered them: then nothing moves, and it opens).
        gated = concurrent is not None and concurrent.gated and self._checkpoint.may_retry(now)
        if self._checkpoint.due(now) or gated:
            landed = self.stats.commits
            ok = self._checkpoint.commit(self._states)
            if ok and self.stats.commits > landed:
                self._lost_uncommitted = False
            if ok and concurrent is not None:
                concurrent.committed(published)
        self._fire_timers(now)
        self._dispatch()

    def _processor_idle(self) -> float:
        """Seconds the processing thread has waited for work (serial dispatch; else 0)."""
        return self._processor.idle_seconds

    def _poll_timeout(self) -> float:
        """Long when idle; short while records are in flight, so their offsets move promptly."""
        if self._stopping or not self._processor.idle or self._retries:
            return 0.05
        return self.settings.kafka.poll_timeout

    def _wait_for_room(self) -> bool:
        """Wait briefly for the processing thread to take the held batch; True if it has room."""
        if self._stopping or self._checkpoint.over_limit(self._states.values()):
            return False
        if time.monotonic() - self._held_since >= _HOLD_BEFORE_PAUSE_S:
            return False
        return self._processor.wait_room(self._batch_size, _SERVE_INTERVAL_S)

    def _serve(self) -> None:
        """Keep the worker in its group while holding records: every partition paused, then poll.

        Records that still arrive (fetched before the pause) join the held ones, in order.
        """
        reason = "checkpoint" if self._checkpoint.over_limit(self._states.values()) else "backpressure"
        if reason == "checkpoint" and not self._blocked_logged:
            self._blocked_logged = True
            self.stats.checkpoint_blocked = True
            log.warning(
                "work at risk reached its bound: taking no records until a commit lands",
                every_records=self._policy.every_records,
            )
        self._pause(list(self._states), reason)
        raws = self._source.poll(self._batch_size, _SERVE_INTERVAL_S)
        self.stats.last_poll = time.monotonic()
        if raws and not self._stopping:
            self._held.append((raws, dict(self._states)))

    def _dispatch(self) -> None:
        if not self._held or self._stopping or self._processor.backlog >= self._batch_size:
            return
        if self._checkpoint.over_limit(self._states.values()):
            return
        for raws, states in self._held:
            self._processor.submit(Batch(raws, states))
        self._held.clear()
        if self._blocked_logged:
            self._blocked_logged = False
            self.stats.checkpoint_blocked = False
            log.info("commits land again; taking records")
        self._resume(list(self._states), "backpressure")
        self._resume(list(self._states), "checkpoint")

    def _collect(self) -> None:
        """Take what the processing thread finished: events first, then each partition's progress."""
        events = self._processor.events
        while events:
            self._event(events.popleft())
        finished = 0
        done = []
        for tp, state in self._states.items():
            finished += take_finished(state)
            if state.done and "done" not in state.paused_for:
                done.append(tp)
        if finished:
            self._checkpoint.finished(finished)
        if done:
            self._pause(done, "done")
        failure = self._processor.failure
        if isinstance(self._processor, ConcurrentProcessor):
            self._pause_busy()
        if failure is not None and not self._stopping:
            if isinstance(failure, RecordFailed):
                log.error(
                    "stopping: a record failed and nothing parked it; its offset is not committed",
                    topic=failure.topic,
                    partition=failure.partition,
                    offset=failure.offset,
                    error=str(failure),
                )
            else:
                log.error("stopping: the processing thread failed", error=repr(failure), exc_info=failure)
            self.request_stop("failure")
        if self._checkpoint.fatal is not None and not self._stopping:
            log.error("stopping: the transaction failed; the restart resumes at the last commit")
            self.request_stop("failure")

    def _event(self, event: Event) -> None:
        if isinstance(event, RetryScheduled):
            self._schedule_retry(event)
        elif isinstance(event, RetrySettled):
            self._retries.pop(event.state.tp, None)
            if self._states.get(event.state.tp) is event.state:
                self._resume([event.state.tp], "retry")
        elif isinstance(event, OffsetsReset):
            self._offsets_reset(event)
        elif self._states.get(event.state.tp) is event.state:  # OffsetMapFull
            (self._pause if event.full else self._resume)([event.state.tp], "offset-map")

    def _pause_busy(self) -> None:
        """Concurrent dispatch: pause a partition with more than a poll batch waiting to start.

        Its records wait behind a busy key (or the partition's one lane); fetching more of it
        would only keep other partitions' records out.
        """
        busy, free = [], []
        limit = self._batch_size
        for tp, state in self._states.items():
            if state.waiting > limit:
                busy.append(tp)
            elif "busy" in state.paused_for and state.waiting <= limit // 2:
                free.append(tp)
        if busy:
            self._pause(busy, "busy")
        if free:
            self._resume(free, "busy")

    def _schedule_retry(self, event: RetryScheduled) -> None:
        state = event.retry.state
        if self._states.get(state.tp) is not state:
            return  # revoked meanwhile: the next owner runs it
        self._retries[state.tp] = event.retry
        state.retry_due = time.monotonic() + event.delay
        self._pause([state.tp], "retry")
        # Records after it that were already fetched are skipped by the processing thread and
        # fetched again from here once the retry settles.
        self._source.seek(state.tp, event.retry.msg.offset + 1)

    def _offsets_reset(self, event: OffsetsReset) -> None:
        state = event.state
        self.stats.offset_resets += 1
        log.warning(
            "offsets went backwards (reset, or the topic recreated): tracking from the new position",
            partition=f"{state.tp[0]}[{state.tp[1]}]",
            previous=event.previous,
            offset=event.offset,
        )
        self.stats.error(
            "offsets",
            f"offsets went backwards (a reset, or the topic recreated): {event.previous} -> {event.offset}",
            *state.tp,
        )
        state.offsets = type(state.offsets)(committed=None)
        state.acked_offset = None
        state.first_offset = event.offset

    def _fire_timers(self, now: float) -> None:
        """Retries whose backoff passed, lease renewal for a long chain, paused watermarks."""
        for retry in list(self._retries.values()):
            state = retry.state
            if state.retry_due is not None and state.retry_due <= now and not self._stopping:
                state.retry_due = None
                self._processor.submit(retry)
        dedup = self._dedup
        if dedup is not None and now - self._renewed_at >= dedup.lease_seconds / 3:
            self._renewed_at = now
            dedup.watch()
            key = self._processor.current_key
            if key is not None:
                dedup.renew([key])  # a chain longer than the lease keeps its partition's lease
        started = self._processor.chain_started
        if started is not None and started != self._long_chain_logged:
            running = time.perf_counter() - started
            if running >= self._max_poll_s / 3:
                # Nothing to do about it: the loop polls regardless. Worth a line for the operator.
                self._long_chain_logged = started
                log.warning(
                    "handler running long; the worker keeps polling and stays in its group",
                    running_seconds=round(running, 1),
                )
        self._rebalance.member.refresh(now)
        if now - self._watermarks_at >= self.settings.metrics.watermark_refresh_seconds:
            self._watermarks_at = now
            self._refresh_paused_watermarks()

    def _retired(self, state: PartitionState) -> None:
        """A partition left (revoked or lost): drop its pending retry; note finished work lost."""
        retry = self._retries.pop(state.tp, None)
        if retry is not None and retry.key is not None and self._dedup is not None:
            self._dedup.release([retry.key])
        if state.offsets.to_commit() is not None and not self._rebalance.closing:
            # Finished records went uncommitted (lost, or a failed handoff): the next owner
            # re-reads them. Unless a later commit lands, the run reports it at the end.
            self._lost_uncommitted = True

    # -- pause reasons ----------------------------------------------------------------------------

    def _pause(self, partitions: list[TP], reason: str) -> None:
        """Pause ``partitions`` for ``reason``; a partition fetches again once no reason is left."""
        newly = []
        for tp in partitions:
            state = self._states.get(tp)
            if state is not None and reason not in state.paused_for:
                if not state.paused_for:
                    newly.append(tp)
                state.paused_for.add(reason)
        if newly:
            self._source.pause(newly)

    def _resume(self, partitions: list[TP], reason: str) -> None:
        freed = []
        for tp in partitions:
            state = self._states.get(tp)
            if state is not None and reason in state.paused_for:
                state.paused_for.discard(reason)
                if not state.paused_for:
                    freed.append(tp)
        if freed:
            self._source.resume(freed)

    # -- stopping ---------------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Stop fetching; the record in hand finishes, then the loop commits and closes. Thread-safe."""
        if not self._stop_requested.is_set():
            log.info("stop requested", reason=reason)
            self._drain_deadline = time.monotonic() + self.settings.shutdown.drain_timeout
        self._stop_requested.set()
        self._stopping = True
        self._processor.stop()

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested."""
        return self._stop_requested.is_set()

    def _finished(self) -> bool:
        if self._stopping:
            self._held.clear()
            self._pause(list(self._states), "stopping")
            if self._processor.idle:
                return True
            if time.monotonic() >= self._drain_deadline:
                self._drain_expired = True
                log.error(
                    "drain timeout exceeded; abandoning the record in hand, committing what finished",
                    drain_timeout=self.settings.shutdown.drain_timeout,
                )
                return True
            return False
        if self._until_end and self._bounded_run_done():
            self.request_stop("reached the end offsets")
        return False

    def _bounded_run_done(self) -> bool:
        """A bounded run ends when its partitions reached their end offsets.

        A worker with no partitions (a newcomer whose first cooperative assignment is empty) is
        not done: it waits until the group committed every partition up to the end offsets.
        """
        if not self._rebalance.ever_assigned or self._held or not self._processor.idle:
            return False
        if self._states:
            return all(state.done for state in self._states.values())
        return self._group_reached_end()

    def _group_reached_end(self) -> bool:
        now = time.monotonic()
        if now - self._group_end_checked < 1.0:
            return False
        self._group_end_checked = now
        try:
            if self._group_end is None:
                topics = self._source.describe_topics(self._topics)
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
        return all((c.offset or 0) >= self._group_end[tp] for tp, c in committed.items())

    def _shutdown(self) -> int:
        """Final commit (waiting out a rebalance), leave the group, say how the run ended."""
        self._collect()
        reason = "abandoned" if self._drain_expired else "clean"
        committed = self._final_commit(reason)
        self._rebalance.closing = True
        started = time.monotonic()
        self._source.close()
        if self._highwater is not None:
            self._highwater.close()
        outputs = self._processor.outputs
        if outputs is not None:
            if outputs.transactional and not committed:
                outputs.abort()  # read_committed readers need not wait for its timeout
            outputs.close()
        sink = self._processor._dead_letter
        if isinstance(sink, KafkaDeadLetterSink) and outputs is None:
            sink.close()
        log.info(
            "worker stopped",
            processed=self.stats.processed,
            dropped=self.stats.dropped,
            dedup_hits=self.stats.dedup_hits,
            dedup_store_resets=self.stats.dedup_store_resets,
            commits=self.stats.commits,
            close_seconds=round(time.monotonic() - started, 3),
            seconds=round(time.monotonic() - self.stats.started_at, 3),
        )
        if self._processor.failure is not None:
            return EXIT_FAILED
        if self._drain_expired:
            return EXIT_DRAIN_TIMEOUT
        return EXIT_OK if committed else EXIT_FAILED

    def _final_commit(self, reason: str) -> bool:
        """Commit everything finished; wait out a rebalance that rejects it (partitions paused).

        False when finished work could not be committed: the commit failed for another reason,
        or the partitions were lost (the member fenced) before it landed.
        """
        deadline = max(self._drain_deadline, time.monotonic()) + 5.0
        while True:
            self._collect()
            if self._checkpoint.fatal is not None:
                self._final_commit_failed = True
                return False
            if self._checkpoint.commit(self._states, reason=reason):
                break
            code = self._checkpoint.last_error
            if code not in _REBALANCING or time.monotonic() >= deadline:
                log.error("final commit failed; finished records will be re-read", error=code or "unknown")
                self._final_commit_failed = True
                return False
            log.info("final commit waits for the rebalance to finish", error=code)
            self._pause(list(self._states), "stopping")
            self._source.poll(self._batch_size, 0.5)
        if self._lost_uncommitted:
            log.error("partitions were lost before their finished records were committed")
            self._final_commit_failed = True
            return False
        return True

    @property
    def final_commit_failed(self) -> bool:
        """Whether the last commit of the run failed (the run then exits with code 1)."""
        return self._final_commit_failed

    # -- for metrics, the health server and tests (any thread) ------------------------------------

    @property
    def joined(self) -> bool:
        """Whether the worker has joined its group (received an assignment)."""
        return self._rebalance.joined

    def partitions(self) -> list[tuple[TP, PartitionState]]:
        """A snapshot of the assigned partitions and their state."""
        return list(self._states.items())

    @property
    def policy(self) -> CommitPolicy:
        """The commit policy in effect."""
        return self._policy

    @property
    def paused_for_outage(self) -> bool:
        """Whether processing waits for a store that is down (dedup or dead-letter)."""
        return self._processor.blocked is not None

    @property
    def records_in_flight(self) -> int:
        """Records running now (concurrent dispatch: also retrying, or publishing their offset)."""
        if isinstance(self._processor, ConcurrentProcessor):
            return self._processor.running_now
        return 0 if self._processor.chain_started is None else 1

    @property
    def records_waiting(self) -> int:
        """Records handed over and not started yet."""
        return self._processor.backlog

    @property
    def outage(self) -> str | None:
        """The store processing waits for ("dedup" or "dead-letter"), or None."""
        return self._processor.blocked

    @property
    def running_partition(self) -> PartitionState | None:
        """Serial dispatch: the partition whose record is in the handler chain now."""
        return self._processor.current

    def member_id(self) -> str | None:
        """The consumer's member id in its group, as the loop last read it; None before it joined."""
        return self._rebalance.member.value

    @property
    def chain_started(self) -> float | None:
        """perf_counter() when the running chain started, or None between chains."""
        return self._processor.chain_started

    # -- librdkafka statistics and watermarks of paused partitions --------------------------------

    def _on_stats(self, raw: str) -> None:
        """librdkafka statistics (inside poll): take each assigned partition's high watermark."""
        try:
            topics = json.loads(raw).get("topics", {})
        except ValueError:
            return
        for (topic, partition), state in list(self._states.items()):
            stats = topics.get(topic, {}).get("partitions", {}).get(str(partition))
            if stats and not state.paused and stats.get("hi_offset", -1) >= 0:
                state.high_watermark = stats["hi_offset"]
                state.stats_lag = stats.get("consumer_lag")

    def _refresh_paused_watermarks(self) -> None:
        """librdkafka stops updating the watermarks of paused partitions: ask the broker."""
        for tp, state in list(self._states.items()):
            if state.paused:
                try:
                    state.high_watermark = self._source.watermarks(tp, timeout=1.0)[1]
                except KafkaException as exc:
                    log.debug("watermark refresh failed", partition=f"{tp[0]}[{tp[1]}]", error=str(exc))


def _max_poll_seconds(settings: Settings) -> float:
    """librdkafka's max.poll.interval.ms in seconds (default 300 s)."""
    return float(settings.kafka.librdkafka_client().get("max.poll.interval.ms", 300_000)) / 1000

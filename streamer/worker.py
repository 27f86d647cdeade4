"""The worker loop: poll a batch, dedup-claim it, run each record through its chain, mark it done,
and commit what finished whenever the policy says so."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from confluent_kafka import KafkaError, KafkaException

from streamer.chain import Handler
from streamer.commit import CommitPolicy, policy_from_settings
from streamer.dedup import (
    ClaimStatus,
    DedupStage,
    KeyBuilder,
    KeyFunction,
    RedisDedupStore,
    StopDuringOutageError,
)
from streamer.errors import ConfigError, DropRecord, RecordFailed
from streamer.highwater import HighWaterStore
from streamer.logs import current_record
from streamer.message import Message
from streamer.offsets import PartitionOffsets
from streamer.settings import Settings
from streamer.source import TP, Committed, KafkaSource, TopicInfo
from streamer.stats import TopicStats, WorkerStats

log = structlog.get_logger("streamer.worker")

#: Exit codes of ``streamer run`` (documented in the README).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DRAIN_TIMEOUT = 3

__all__ = ["EXIT_DRAIN_TIMEOUT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Worker", "WorkerStats"]


@dataclass
class PartitionState:
    """What the worker knows about one assigned partition."""

    offsets: PartitionOffsets
    #: Bounded runs: the end offset snapshotted at assignment; None in unbounded runs.
    end: int | None = None
    done: bool = False
    #: Set when the partition is revoked or lost while records of it are still in the batch.
    gone: bool = False
    #: Offsets below this were processed by this group before (a crash, a handover): re-reads.
    reprocess_below: int = -1
    #: Timestamp (ms) of the last record processed: the base of lag in seconds.
    last_ts: int | None = None
    #: High watermark from librdkafka statistics, or asked of the broker while paused.
    high_watermark: int | None = None
    #: Offset the broker acknowledged last, and when (epoch seconds).
    acked_offset: int | None = None
    acked_at: float | None = None
    paused: bool = False


#: One admitted record of a batch: the message, its partition, its dedup key and claim status.
Item = tuple[Message, PartitionState, bytes | None, ClaimStatus | None]


class Worker:
    """Consumes the topics of ``chains`` in one consumer group, checkpointing as the policy says."""

    def __init__(
        self,
        settings: Settings,
        chains: Mapping[str, Handler],
        *,
        until_end: bool = False,
        key_fn: KeyFunction | None = None,
        source: KafkaSource | None = None,
        policy: CommitPolicy | None = None,
        dedup: DedupStage | None = None,
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
        self._source = source or KafkaSource(
            settings.kafka, on_commit=self._on_commit, on_stats=self._on_stats
        )
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
        self._stop_requested = threading.Event()
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._commit_sent: deque[float] = deque()
        self._run_start = int(time.time())

    def _dedup_from_settings(self, key_fn: KeyFunction | None) -> DedupStage | None:
        cfg = self.settings.dedup
        if not cfg.enabled:
            return None
        store = RedisDedupStore.from_url(cfg.redis_url.get_secret_value(), timeout=cfg.timeout)
        keys = KeyBuilder(cfg.namespace, self.settings.kafka.group_id, cfg.key_header, key_fn)
        # With static membership the instance id survives a restart, so a restarted worker takes
        # back the claims its killed predecessor left instead of waiting for their leases.
        token = str(self.settings.kafka.client.get("group.instance.id", self.worker_id))
        return DedupStage(store, cfg, keys, self.stats, token, self._serve_group, self._outage)

    def _highwater_from_settings(self) -> HighWaterStore | None:
        mode, dedup = self.settings.metrics.track_reprocessed, self.settings.dedup
        if mode == "off" or (mode == "auto" and not dedup.enabled):
            return None
        client = redis.Redis.from_url(
            dedup.redis_url.get_secret_value(),
            socket_timeout=dedup.timeout,
            socket_connect_timeout=dedup.timeout,
        )
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
        self._preflight()
        self._source.subscribe(list(self._chains), self._on_assign, self._on_revoke, self._on_lost)
        batch_size, timeout = self.settings.kafka.poll_batch_size, self.settings.kafka.poll_timeout
        try:
            while not self._stop_requested.is_set() and not self._finished_bounded_run():
                raws = self._source.poll(batch_size, timeout)
                self.stats.last_poll = time.monotonic()
                batch = self._claim(self._admit(raws))
                claimed_at = time.monotonic()
                for done, item in enumerate(batch):
                    if self._stop_requested.is_set():
                        self._release(batch[done:])
                        break
                    if self._lease_half_gone(claimed_at):
                        claimed_at = self._renew(batch, done)
                    self._process(item)
                    if self._commit_due():
                        self._checkpoint()
                self._flush_marks()
                self._after_batch(bool(batch))
                if self._commit_due():
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
            log.warning("stopping during a dedup outage; committing only what was marked", reason=str(stop))
        self._shutdown()
        return EXIT_OK

    def _preflight(self) -> None:
        """Wait for the cluster, check the topics exist and the dedup window covers their retention."""
        delay = 0.5
        while True:
            try:
                topics = self._source.describe_topics(list(self._chains))
                break
            except KafkaException as exc:
                log.warning(
                    "kafka unreachable; retrying",
                    error=str(exc),
                    retry_in=delay,
                    bootstrap_servers=self.settings.kafka.bootstrap_servers,
                )
                if self._stop_requested.wait(delay):
                    return
                delay = min(delay * 2, 30.0)
        missing = sorted(t for t, info in topics.items() if info is None)
        if missing:
            raise ConfigError(
                f"subscribed topic(s) {missing} do not exist on {self.settings.kafka.bootstrap_servers}: "
                "create them, or fix the topic given to @app.handler"
            )
        if self._dedup is not None:
            self._check_dedup_window(topics)

    def _check_dedup_window(self, topics: Mapping[str, TopicInfo | None]) -> None:
        """A done key must outlive every record that could be replayed: warn (or refuse) if not."""
        cfg = self.settings.dedup
        window_ms = cfg.window_seconds * 1000
        for topic, info in sorted(topics.items()):
            if info is None or (0 <= info.retention_ms <= window_ms):
                continue
            retention = "forever" if info.retention_ms < 0 else f"{info.retention_ms / 1000:.0f} s"
            problem = (
                f"dedup.window_seconds ({cfg.window_seconds:.0f} s) is shorter than the retention of "
                f"topic {topic!r} ({retention}): replaying records older than the window would re-run "
                "their side effects"
            )
            if cfg.strict_window:
                raise ConfigError(problem + "; raise window_seconds or set dedup.strict_window = false")
            log.warning(problem)

    def _admit(self, raws: list[Any]) -> list[tuple[Message, PartitionState]]:
        """Keep the records of partitions this worker owns and has not finished (bounded runs)."""
        admitted = []
        for raw in raws:
            state = self._partitions.get((raw.topic(), raw.partition()))
            if state is None or state.done:
                continue
            if state.end is not None and raw.offset() >= state.end:
                self._partition_done(raw.topic(), raw.partition(), state)
                continue
            admitted.append((Message.from_kafka(raw), state))
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
        if state.gone:
            return
        if status is ClaimStatus.CONTESTED and key is not None and self._dedup is not None:
            status = self._dedup.resolve_contested(key)
        offset = msg.offset
        topic_stats = self._topic_stats[msg.topic]
        state.offsets.start(offset)
        state.last_ts = msg.timestamp
        self._since_commit += 1
        if offset < state.reprocess_below:
            topic_stats.reprocessed += 1
        if status is ClaimStatus.DONE:
            self.stats.dedup_hits += 1
            topic_stats.deduplicated += 1
            state.offsets.finish(offset)
        else:
            self._run_chain(msg, key, topic_stats)
            if key is None:
                state.offsets.finish(offset)
            else:
                self._pending.append((state, offset, key))
                if self._dedup is not None and self._dedup.per_record:
                    self._flush_marks()
        if state.end is not None and offset + 1 >= state.end:
            self._partition_done(msg.topic, msg.partition, state)

    def _run_chain(self, msg: Message, key: bytes | None, topic_stats: TopicStats) -> None:
        started = time.perf_counter()
        current_record.msg = msg
        try:
            self._chains[msg.topic](msg)
        except DropRecord:
            self.stats.dropped += 1
            topic_stats.dropped += 1
        except Exception as exc:
            self.stats.failed += 1
            topic_stats.failed += 1
            if key is not None and self._dedup is not None:
                self._dedup.release([key])
            raise RecordFailed(msg.topic, msg.partition, msg.offset, exc) from exc
        else:
            self.stats.processed += 1
            topic_stats.ok += 1
        finally:
            current_record.msg = None
            topic_stats.handler_seconds.observe(time.perf_counter() - started)

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

    def _lease_half_gone(self, claimed_at: float) -> bool:
        return self._dedup is not None and time.monotonic() - claimed_at > self._dedup.lease_seconds / 2

    def _renew(self, batch: list[Item], start: int) -> float:
        """Extend the leases of the batch's records not yet run (slow handlers); one round trip.

        A lease that expired meanwhile and was taken by another worker comes back CONTESTED, and
        that record then waits for the other worker instead of running twice.
        """
        if self._dedup is not None:
            todo = [i for i in range(start, len(batch)) if batch[i][2] is not None]
            statuses = self._dedup.claim([batch[i][2] for i in todo])  # type: ignore[misc]
            for i, status in zip(todo, statuses, strict=True):
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

    def _commit_due(self) -> bool:
        return self._policy.due(self._since_commit, time.monotonic() - self._last_commit)

    def _checkpoint(self) -> None:
        """Steady-state checkpoint: land pending marks, then commit asynchronously."""
        self._flush_marks()
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
        if not offsets:
            return
        metadata = f"streamer/1 state={state} run_start={self._run_start} at={int(time.time())}"
        started = time.monotonic()
        try:
            if asynchronous:
                self._commit_sent.append(started)
            self._source.commit(offsets, metadata, asynchronous=asynchronous)
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
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.stats.commit_errors += 1
            log.warning("asynchronous commit failed", error=err.str())
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
            if state is not None and offset >= 0:
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
        paused = [tp for tp in partitions if self._partitions[tp].done or self._paused_for_outage]
        if paused:
            self._pause(paused)
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
            self._partitions.pop(tp).gone = True
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

    def _outage(self, started: bool) -> None:
        """Pause every assigned partition while the dedup store is down; resume when it is back."""
        self._paused_for_outage = started
        active = [tp for tp, state in self._partitions.items() if not state.done]
        if active:
            (self._pause if started else self._resume)(active)

    def _pause(self, partitions: list[TP]) -> None:
        self._source.pause(partitions)
        for tp in partitions:
            if tp in self._partitions:
                self._partitions[tp].paused = True

    def _resume(self, partitions: list[TP]) -> None:
        self._source.resume(partitions)
        for tp in partitions:
            if tp in self._partitions:
                self._partitions[tp].paused = False

    def _serve_group(self, seconds: float) -> bool:
        """Keep polling (heartbeats, rebalances) for ``seconds`` without taking new records.

        Every partition is paused, but one assigned meanwhile may deliver records: they are
        rewound, so that nothing is skipped. Returns False once a stop is requested.
        """
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stop_requested.is_set():
                return False
            rewind: dict[TP, int] = {}
            for raw in self._source.poll(100, min(remaining, 0.2)):
                tp = (raw.topic(), raw.partition())
                rewind[tp] = min(raw.offset(), rewind.get(tp, raw.offset()))
            for tp, offset in rewind.items():
                self._pause([tp])
                self._source.seek(tp, offset)
            if (
                time.monotonic() - self._watermarks_refreshed
                >= self.settings.metrics.watermark_refresh_seconds
            ):
                self._refresh_paused_watermarks()
        return not self._stop_requested.is_set()

    # -- bounded runs and stopping ----------------------------------------------------------------

    def _partition_done(self, topic: str, partition: int, state: PartitionState) -> None:
        if not state.done:
            state.done = True
            self._pause([(topic, partition)])

    def _finished_bounded_run(self) -> bool:
        return (
            self._until_end and self._ever_assigned and all(state.done for state in self._partitions.values())
        )

    def request_stop(self, reason: str = "requested") -> None:
        """Stop fetching; the loop finishes the record in hand, commits and closes. Thread-safe."""
        if not self._stop_requested.is_set():
            log.info("stop requested", reason=reason)
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
        self._commit(asynchronous=False, state="abandoned")

    def _shutdown(self) -> None:
        self._flush_marks(block=False)
        try:
            self._commit(asynchronous=False, state="clean")
        except KafkaException as exc:
            log.exception("final commit failed", error=str(exc))
        self._closing = True
        self._source.close()
        log.info(
            "worker stopped",
            processed=self.stats.processed,
            dropped=self.stats.dropped,
            dedup_hits=self.stats.dedup_hits,
            commits=self.stats.commits,
            seconds=round(time.monotonic() - self.stats.started_at, 3),
        )


def _parse_metadata(metadata: str | None) -> dict[str, str]:
    if not metadata or not metadata.startswith("streamer/1 "):
        return {}
    return dict(part.split("=", 1) for part in metadata.split()[1:] if "=" in part)


def _show(offsets: Mapping[TP, int | None]) -> dict[str, int | None]:
    return {f"{t}[{p}]": o for (t, p), o in sorted(offsets.items())}


def _show_tps(partitions: list[TP]) -> list[str]:
    return [f"{t}[{p}]" for t, p in sorted(partitions)]

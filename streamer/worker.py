"""The worker loop: poll a batch, dedup-claim it, run each record through its chain, mark it done,
and commit what finished whenever the policy says so."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
from streamer.message import Message
from streamer.offsets import PartitionOffsets
from streamer.settings import Settings
from streamer.source import TP, Committed, KafkaSource, TopicInfo
from streamer.stats import WorkerStats

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
        self._until_end = until_end
        self._source = source or KafkaSource(settings.kafka, on_commit=self._on_commit)
        self._policy = policy or policy_from_settings(settings.commit)
        self._dedup = dedup or self._dedup_from_settings(key_fn)
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
                batch = self._claim(self._admit(self._source.poll(batch_size, timeout)))
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
        state.offsets.start(offset)
        self._since_commit += 1
        if status is ClaimStatus.DONE:
            self.stats.dedup_hits += 1
            state.offsets.finish(offset)
        else:
            self._run_chain(msg, key)
            if key is None:
                state.offsets.finish(offset)
            else:
                self._pending.append((state, offset, key))
                if self._dedup is not None and self._dedup.per_record:
                    self._flush_marks()
        if state.end is not None and offset + 1 >= state.end:
            self._partition_done(msg.topic, msg.partition, state)

    def _run_chain(self, msg: Message, key: bytes | None) -> None:
        try:
            self._chains[msg.topic](msg)
        except DropRecord:
            self.stats.dropped += 1
        except Exception as exc:
            self.stats.failed += 1
            if key is not None and self._dedup is not None:
                self._dedup.release([key])
            raise RecordFailed(msg.topic, msg.partition, msg.offset, exc) from exc
        else:
            self.stats.processed += 1

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

    def _commit(self, *, asynchronous: bool, only: list[TP] | None = None, state: str = "running") -> None:
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
            if offset is None and not asynchronous:
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
            self.stats.commits += 1
            self._policy.committed(time.monotonic() - started)
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
            self._policy.committed(time.monotonic() - sent)

    # -- rebalance --------------------------------------------------------------------------------

    def _on_assign(self, partitions: list[TP]) -> None:
        self.stats.rebalances += 1
        self._ever_assigned = True
        committed = self._source.committed(partitions) if partitions else {}
        self._observe_failures(committed)
        for tp in partitions:
            start = committed[tp].offset if tp in committed else None
            state = PartitionState(PartitionOffsets(committed=start))
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
            self._source.pause(paused)
        log.info(
            "partitions assigned",
            partitions=_show_tps(partitions),
            resume_from=_show({tp: c.offset for tp, c in committed.items()}),
        )

    def _on_revoke(self, partitions: list[TP]) -> None:
        """Commit what finished in ``partitions`` before handing them over; no chain is running."""
        self.stats.rebalances += 1
        mine = [tp for tp in partitions if tp in self._partitions]
        self._flush_marks(block=False)
        try:
            self._commit(asynchronous=False, only=mine, state="handoff")
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
            (self._source.pause if started else self._source.resume)(active)

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
                self._source.pause([tp])
                self._source.seek(tp, offset)
        return not self._stop_requested.is_set()

    # -- bounded runs and stopping ----------------------------------------------------------------

    def _partition_done(self, topic: str, partition: int, state: PartitionState) -> None:
        if not state.done:
            state.done = True
            self._source.pause([(topic, partition)])

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

    def commit_finished_now(self) -> None:
        """Synchronously commit what has finished; used when the drain timeout runs out."""
        self._commit(asynchronous=False, state="abandoned")

    def _shutdown(self) -> None:
        self._flush_marks(block=False)
        try:
            self._commit(asynchronous=False, state="clean")
        except KafkaException as exc:
            log.exception("final commit failed", error=str(exc))
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

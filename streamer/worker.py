"""The worker loop: poll a batch, run each record through its chain, mark it done, commit on policy."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException

from streamer.chain import Handler
from streamer.commit import CommitPolicy, policy_from_settings
from streamer.errors import DropRecord, RecordFailed
from streamer.message import Message
from streamer.offsets import PartitionOffsets
from streamer.settings import Settings
from streamer.source import TP, Committed, KafkaSource

log = structlog.get_logger("streamer.worker")

#: Exit codes of ``streamer run`` (documented in the README).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DRAIN_TIMEOUT = 3


@dataclass
class WorkerStats:
    """Counters of one worker run, read by the progress display and the metrics."""

    processed: int = 0
    dropped: int = 0
    failed: int = 0
    commits: int = 0
    commit_errors: int = 0
    rebalances: int = 0
    #: Bounded runs: records to read in all assigned partitions, from their start to the end offsets.
    total: int | None = None
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class PartitionState:
    """What the worker knows about one assigned partition."""

    offsets: PartitionOffsets
    #: Bounded runs: the end offset snapshotted at assignment; None in unbounded runs.
    end: int | None = None
    done: bool = False


class Worker:
    """Consumes the topics of ``chains`` in one consumer group, checkpointing as the policy says."""

    def __init__(
        self,
        settings: Settings,
        chains: Mapping[str, Handler],
        *,
        until_end: bool = False,
        source: KafkaSource | None = None,
        policy: CommitPolicy | None = None,
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
        self._partitions: dict[TP, PartitionState] = {}
        self._ever_assigned = False
        self._stop_requested = threading.Event()
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._commit_sent: deque[float] = deque()
        self._run_start = int(time.time())

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
        )
        self._source.subscribe(list(self._chains), self._on_assign, self._on_revoke, self._on_lost)
        batch_size, timeout = self.settings.kafka.poll_batch_size, self.settings.kafka.poll_timeout
        try:
            while not self._stop_requested.is_set() and not self._finished_bounded_run():
                for raw in self._source.poll(batch_size, timeout):
                    if self._stop_requested.is_set():
                        break
                    self._process(raw)
                    if self._policy.due(self._since_commit, time.monotonic() - self._last_commit):
                        self._commit(asynchronous=True)
                if self._policy.due(self._since_commit, time.monotonic() - self._last_commit):
                    self._commit(asynchronous=True)
        except RecordFailed as failure:
            log.exception(
                "stopping: a record failed and nothing parked it; its offset is not committed",
                topic=failure.topic,
                partition=failure.partition,
                offset=failure.offset,
                error=str(failure.cause),
            )
            self._shutdown()
            return EXIT_FAILED
        self._shutdown()
        return EXIT_OK

    def _process(self, raw: Any) -> None:
        """Run one record through its topic's chain and mark it finished."""
        state = self._partitions.get((raw.topic(), raw.partition()))
        if state is None or state.done:
            return  # revoked meanwhile, or past the end of a bounded run: not ours to process
        offset = raw.offset()
        if state.end is not None and offset >= state.end:
            self._partition_done(raw.topic(), raw.partition(), state)
            return
        state.offsets.start(offset)
        try:
            self._chains[raw.topic()](Message.from_kafka(raw))
        except DropRecord:
            self.stats.dropped += 1
        except Exception as exc:
            self.stats.failed += 1
            raise RecordFailed(raw.topic(), raw.partition(), offset, exc) from exc
        else:
            self.stats.processed += 1
        state.offsets.finish(offset)
        self._since_commit += 1
        if state.end is not None and offset + 1 >= state.end:
            self._partition_done(raw.topic(), raw.partition(), state)

    # -- commits ----------------------------------------------------------------------------------

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
                first = (
                    start
                    if start is not None
                    else (low if self.settings.kafka.auto_offset_reset == "earliest" else high)
                )
                state.end = high
                self.stats.total = (self.stats.total or 0) + max(high - first, 0)
                state.done = first >= high
            self._partitions[tp] = state
        if self._until_end:
            done = [tp for tp in partitions if self._partitions[tp].done]
            if done:
                self._source.pause(done)
        log.info(
            "partitions assigned",
            partitions=_show_tps(partitions),
            resume_from=_show({tp: c.offset for tp, c in committed.items()}),
        )

    def _on_revoke(self, partitions: list[TP]) -> None:
        """Commit what finished in ``partitions`` before handing them over; nothing is in flight."""
        self.stats.rebalances += 1
        mine = [tp for tp in partitions if tp in self._partitions]
        try:
            self._commit(asynchronous=False, only=mine, state="handoff")
        except KafkaException as exc:
            log.warning(
                "commit on revoke failed; the next owner re-reads since the last commit", error=str(exc)
            )
        for tp in mine:
            del self._partitions[tp]
        log.info("partitions revoked", partitions=_show_tps(partitions))

    def _on_lost(self, partitions: list[TP]) -> None:
        """Partitions taken away without a handover: another worker may own them, never commit."""
        self.stats.rebalances += 1
        for tp in partitions:
            self._partitions.pop(tp, None)
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
        try:
            self._commit(asynchronous=False, state="clean")
        except KafkaException as exc:
            log.exception("final commit failed", error=str(exc))
        self._source.close()
        log.info(
            "worker stopped",
            processed=self.stats.processed,
            dropped=self.stats.dropped,
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

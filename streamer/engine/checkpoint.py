"""The checkpoint: when to commit (the policy's clock), what (the finished prefix of each
partition), and how (synchronously, from the loop, one commit at a time).

Commits are synchronous *to the loop* and asynchronous *to processing*: the processing thread
never waits for one. One thread sending one commit at a time gives three properties that
asynchronous pipelined commits do not: commits reach the coordinator in order (a retried request
can never land after a newer one), every commit is acknowledged before the next is sent (work at
risk is exact), and the revoke and final commits have nothing in flight to drain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import structlog
from confluent_kafka import KafkaError, KafkaException

from streamer.commit import CommitPolicy
from streamer.engine.offsetmap import encode
from streamer.engine.outputs import Outputs, TransactionFailedError
from streamer.engine.partition import TP, PartitionState, take_finished
from streamer.source import Source
from streamer.stats import WorkerStats

log = structlog.get_logger("streamer.checkpoint")

#: Seconds between attempts while commits fail (a coordinator moving, a rebalance).
_RETRY_S = 0.5
#: Exactly-once: how long a commit waits for the running record to publish, and for the broker.
_GATE_WAIT_S = 5.0
_TXN_TIMEOUT_S = 30.0


def _never_idle() -> float:
    return 0.0


class CommitFailedError(Exception):
    """A synchronous commit did not land for every partition asked."""


class Checkpoint:
    """Owns the commit clock and the commits of one worker run."""

    def __init__(
        self,
        source: Source,
        policy: CommitPolicy,
        stats: WorkerStats,
        run_start: str,
        *,
        transaction: Outputs | None = None,
        states: Mapping[TP, PartitionState] | None = None,
        idle_clock: Callable[[], float] | None = None,
    ) -> None:
        self._source = source
        #: Seconds the processing thread has sat idle so far: what a commit costs the records is
        #: the loop's CPU time for it plus the processing thread's idle time meanwhile.
        self.idle_clock: Callable[[], float] = idle_clock or _never_idle
        #: Every assigned partition (exactly-once commits cover them all).
        self._states: Mapping[TP, PartitionState] = states if states is not None else {}
        #: Exactly-once: offsets commit inside this producer's transaction, with its outputs.
        self.transaction = transaction
        #: The transaction failed for good (aborted, fenced): nothing more is committed.
        self.fatal: TransactionFailedError | None = None
        self.policy = policy
        self._stats = stats
        self._run_start = run_start
        #: Records finished since the last commit that landed.
        self.since = 0
        self._last = time.monotonic()
        self._retry_at = 0.0
        self.failing_since: float | None = None
        #: The librdkafka error name of the last failed commit ('' after one that landed).
        self.last_error = ""

    def finished(self, records: int) -> None:
        """Count records finished since the last commit."""
        self.since += records

    def due(self, now: float) -> bool:
        """Whether the policy asks for a commit now (and a failed one is not backing off)."""
        return now >= self._retry_at and self.policy.due(self.since, now - self._last)

    def may_retry(self, now: float) -> bool:
        """Whether a commit may be sent now (a failed one is not backing off)."""
        return now >= self._retry_at

    def over_limit(self, states: Iterable[PartitionState]) -> bool:
        """Whether work at risk passed its bound: stop taking records until a commit lands.

        With ``every_records = N`` a partition may hold N finished, unacknowledged records; with
        a time interval only, records finished over two intervals. Reached only when commits do
        not land (the coordinator away, a rebalance rejecting them).
        """
        if self.failing_since is None:
            return False
        at_risk = max((state.at_risk() for state in states), default=0)
        if not at_risk:
            return False  # nothing unacknowledged (say, fresh partitions after a rejoin)
        every_records, every_seconds = self.policy.every_records, self.policy.every_seconds
        if every_records and at_risk >= every_records:
            return True
        return bool(every_seconds) and time.monotonic() - self._last >= 2 * every_seconds

    def commit(self, partitions: Mapping[TP, PartitionState], reason: str = "running") -> bool:
        """Commit every partition whose finished prefix moved; True when it landed (or nothing moved).

        Synchronous commits on revoke and at the end (``reason`` handoff / clean / abandoned)
        also re-commit unmoved offsets, so that the metadata records how the run ended.

        Exactly-once: the open transaction holds the outputs of every partition's published
        records, so the commit covers every assigned partition, not only ``partitions``, and it
        reads their offsets with processing held outside its window of emitted, unpublished
        outputs (the gate): the transaction then holds no output its offsets do not cover.
        """
        if self.fatal is not None:
            return False
        transaction = self.transaction
        if transaction is None:
            return self._commit(partitions, reason)
        with transaction.gate.closed(_GATE_WAIT_S) as closed:
            if not closed:
                timed_out = KafkaError(KafkaError._TIMED_OUT, "a record kept running: the transaction waits")
                self._failed(KafkaException(timed_out), time.monotonic(), reason)
                return False
            everything = {**self._states, **partitions}
            for state in everything.values():
                self.since += take_finished(state)
            return self._commit(everything, reason)

    def _commit(self, partitions: Mapping[TP, PartitionState], reason: str) -> bool:
        cpu, idle = time.thread_time(), self.idle_clock()
        offsets, maps = _to_commit(partitions, reason)
        now = time.monotonic()
        if not offsets:
            self.since, self._last, self.failing_since = 0, now, None
            return True
        base = f"streamer/1 state={reason} run_start={self._run_start} at={time.time():.3f}"
        uptime, failures = self.policy.learned
        if failures:  # the adaptive policy's history, for the runs after this one
            base += f" up={uptime:.3f} fails={failures}"
        if self.policy.every_seconds:  # bounds how long this run may have lived after this commit
            base += f" every={self.policy.every_seconds:.3f}"
        metadata = {tp: f"{base} map={text}" if text else base for tp, text in maps.items()}
        try:
            self._send(offsets, metadata)
        except TransactionFailedError as exc:
            self.fatal = exc
            self.last_error = "TRANSACTION_FAILED"
            log.error("transaction failed: committing nothing more", error=str(exc), reason=reason)
            return False
        except KafkaException as exc:
            self._failed(exc, now, reason)
            return False
        cost = time.monotonic() - now
        self.last_error = ""
        self._stats.commits += 1
        self._stats.commit_times.add(now + cost)
        hist = self._stats.commit_seconds_steady if reason == "running" else self._stats.commit_seconds_final
        hist.observe(cost)
        self.policy.committed(time.thread_time() - cpu + self.idle_clock() - idle)
        if self.failing_since is not None:
            log.info("commits land again", failed_for_seconds=round(now - self.failing_since, 1))
            self.failing_since = None
        acked_at = time.time()
        for tp, offset in offsets.items():
            state = partitions[tp]
            state.offsets.mark_committed(offset)
            state.map_text = maps[tp]
            if state.acked_offset is None or offset >= state.acked_offset:
                state.acked_offset, state.acked_at = offset, acked_at
        self.since, self._last = 0, now
        if reason != "running":
            log.info("committed", offsets=show(offsets), reason=reason)
        return True

    def _failed(self, exc: KafkaException, now: float, reason: str) -> None:
        self._stats.commit_errors += 1
        self.last_error = error_code(exc)
        self._retry_at = now + _RETRY_S
        if self.failing_since is None:
            self.failing_since = now
        log.warning("commit failed; offsets stay uncommitted", error=_describe(exc), reason=reason)
        self._stats.error("commit", f"commit failed ({reason}): {_describe(exc)}")

    def _send(self, offsets: dict[TP, int], metadata: dict[TP, str]) -> None:
        """Commit synchronously: the offsets, or (exactly-once) the open transaction with them."""
        transaction = self.transaction
        if transaction is None:
            self._source.commit(offsets, metadata, asynchronous=False)
            return
        transaction.commit_transaction(offsets, metadata, self._source.group_metadata(), _TXN_TIMEOUT_S)


def _to_commit(partitions: Mapping[TP, PartitionState], reason: str) -> tuple[dict[TP, int], dict[TP, str]]:
    """The offsets (and offset maps) to commit: those that moved, and all of them at a handoff."""
    offsets: dict[TP, int] = {}
    maps: dict[TP, str] = {}
    for tp, state in partitions.items():
        offset = state.offsets.to_commit()
        if offset is None and reason != "running":
            offset = state.offsets.committed
        text = offset_map(state, offset if offset is not None else state.offsets.committed)
        if offset is None and text != state.map_text:
            offset = state.offsets.committed  # the prefix stands still, the map moved on
        if offset is not None:
            offsets[tp] = offset
            maps[tp] = text
    return offsets, maps


def offset_map(state: PartitionState, offset: int | None) -> str:
    """The offsets of ``state`` finished above ``offset``, encoded for the commit metadata.

    Concurrent dispatch finishes out of order (the tracker's snapshot); any dispatch carries on
    an earlier owner's map (``skip``) until the prefix passes it.
    """
    if offset is None:
        return ""
    tracker = state.tracker
    finished: list[int] = []
    if tracker is not None:
        _, finished = tracker.snapshot()
    if state.skip:
        finished.extend(o for o in state.skip if o > offset)
    return encode(offset, finished) if finished else ""


def error_code(exc: KafkaException) -> str:
    """The librdkafka error name of ``exc`` (e.g. ``UNKNOWN_MEMBER_ID``), or ''."""
    err = exc.args[0] if exc.args else None
    return err.name() if isinstance(err, KafkaError) else ""


def _describe(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return f"{err.name()}: {err.str()}" if isinstance(err, KafkaError) else str(exc)


def show(offsets: Mapping[TP, int | None]) -> dict[str, int | None]:
    """Offsets keyed ``topic[partition]``, for log lines."""
    return {f"{t}[{p}]": o for (t, p), o in sorted(offsets.items())}

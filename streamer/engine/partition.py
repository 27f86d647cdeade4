"""What the engine knows about one assigned partition.

Two threads share a ``PartitionState``, each field with one writer:

- the loop (its rebalance listener creates and retires it) writes the assignment facts, the pause
  reasons, the commit bookkeeping and ``revoked``;
- the processing thread writes ``done_next`` (one past the last record finished in order: handled,
  dropped, deduplicated or parked, with its dedup mark landed), ``hold`` and ``done``.

The loop alone turns ``done_next`` into committable offsets (``offsets``). Serial dispatch finishes
records of a partition in offset order, so one watermark carries every completion.
"""

from __future__ import annotations

import threading
import time

from streamer.offsets import PartitionOffsets

TP = tuple[str, int]


class PartitionState:
    """One assigned partition: its offsets, pause reasons, retry slot, end offset and progress."""

    __slots__ = (
        "acked_at",
        "acked_offset",
        "assigned_at",
        "done",
        "done_next",
        "end",
        "expected",
        "finished_count",
        "first_offset",
        "high_watermark",
        "hold",
        "in_flight",
        "last_ts",
        "map_text",
        "offsets",
        "paused_for",
        "reprocess_below",
        "retry_due",
        "revoked",
        "seen_count",
        "skip",
        "stats_lag",
        "tp",
        "tracker",
        "waiting",
    )

    def __init__(self, tp: TP, committed: int | None, *, end: int | None = None) -> None:
        self.tp = tp
        #: Committable offsets; the loop advances it from ``done_next``.
        self.offsets = PartitionOffsets(committed=committed)
        #: Offset the broker acknowledged last (found at assignment, then each commit), and when.
        self.acked_offset: int | None = committed
        self.acked_at: float | None = None
        #: Bounded runs: the end offset snapshotted at assignment; None in unbounded runs.
        self.end = end
        #: Set by the processing thread once a bounded run's partition reached ``end``.
        self.done = False
        #: Set by the loop when the partition is revoked or lost: nothing more of it may start.
        self.revoked = False
        #: One past the last record finished in order (processing thread); None before the first.
        self.done_next: int | None = None
        #: The next offset the processing thread expects: a lower one means the offsets were
        #: reset (or the topic recreated) under us.
        self.expected: int | None = None
        #: Records above this offset are skipped: an earlier one awaits its retry (or failed).
        self.hold: int | None = None
        #: monotonic() when the held record's next attempt is due (loop), or None.
        self.retry_due: float | None = None
        #: Why the partition is paused: "done", "retry", "backpressure", "checkpoint", "stopping".
        self.paused_for: set[str] = set()
        #: Offsets below this were processed by this group before (a crash, a handover): re-reads.
        self.reprocess_below = -1
        #: Timestamp (ms) of the last record processed: the base of lag in seconds.
        self.last_ts: int | None = None
        #: High watermark from librdkafka statistics, or asked of the broker while paused.
        self.high_watermark: int | None = None
        #: First offset processed in this assignment: the base of work at risk before any commit.
        self.first_offset: int | None = None
        #: librdkafka's own lag figure (from statistics): 0 also past transaction markers.
        self.stats_lag: int | None = None
        self.assigned_at = time.time()
        #: Offsets above the committed one that an earlier owner finished (its commit's offset
        #: map): skipped, never run again. Set at assignment.
        self.skip: frozenset[int] = frozenset()
        #: Concurrent dispatch: the offsets started and finished out of order (processing
        #: thread), read by the checkpoint under its lock. None in serial dispatch.
        self.tracker: OutOfOrder | None = None
        #: Records finished so far (processing thread, concurrent dispatch) and the count the
        #: loop has seen: the commit policy counts finishes, not prefix moves.
        self.finished_count = 0
        self.seen_count = 0
        #: Records of this partition running, or finished with their offset not yet published
        #: (processing thread, concurrent dispatch); a revoke waits for 0.
        self.in_flight = 0
        #: Records of this partition admitted and not started (processing thread, concurrent
        #: dispatch); the loop pauses a partition with more than a poll batch waiting.
        self.waiting = 0
        #: The offset map of the last commit that landed ('' for none).
        self.map_text = ""

    @property
    def paused(self) -> bool:
        """Whether the partition is paused for any reason."""
        return bool(self.paused_for)

    def position(self) -> int | None:
        """The next offset to process: one past the last finished in order, else the committed one."""
        position = self.offsets.next_offset
        return self.offsets.committed if position is None else position

    def lag(self) -> int | None:
        """Records from the position to the high watermark; None until both are known."""
        position = self.position()
        if self.high_watermark is None or position is None:
            return None
        if self.stats_lag == 0:
            return 0  # librdkafka counts transaction markers as read; they are no record
        return max(self.high_watermark - position, 0)

    def lag_seconds(self, now: float) -> float | None:
        """Age (epoch ``now``) of the oldest unprocessed record: 0 when caught up, None if unknown."""
        behind = self.lag()
        if not behind:
            return None if behind is None else 0.0
        # The oldest unprocessed record follows the last processed one; with none processed yet
        # in this assignment, it has waited at least since the assignment.
        since = self.last_ts / 1000.0 if self.last_ts is not None else self.assigned_at
        return max(now - since, 0.0)

    def at_risk(self) -> int:
        """Records finished in this partition since the last acknowledged commit."""
        done = self.offsets.next_offset
        if done is None:
            return 0
        base = self.acked_offset if self.acked_offset is not None else self.first_offset
        return max(done - base, 0) if base is not None else 0

    def __repr__(self) -> str:
        return f"PartitionState({self.tp[0]}[{self.tp[1]}], done_next={self.done_next}, hold={self.hold})"


class OutOfOrder:
    """Offsets of one partition started in order and finished in any order (concurrent dispatch).

    The processing thread starts and finishes offsets; the checkpoint takes a snapshot (the
    finished prefix and the finished offsets above it) under the same lock.
    """

    __slots__ = ("_lock", "_offsets")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets = PartitionOffsets()

    def start(self, offset: int) -> None:
        """``offset`` was admitted: it counts as unfinished until ``finish``.

        No lock: an append to the started queue is atomic, and a snapshot taken meanwhile is
        right either way (the new offset is unfinished).
        """
        self._offsets.start(offset)

    def finish(self, offset: int) -> int | None:
        """``offset`` finished; returns the new finished prefix (the first unfinished offset)."""
        with self._lock:
            self._offsets.finish(offset)
            return self._offsets.committable()

    @property
    def next_offset(self) -> int:
        """One past the highest offset started (0 before the first)."""
        return self._offsets.next_offset or 0

    def prefix(self) -> int | None:
        """The first unfinished offset (one past the last when all finished)."""
        return self._offsets.committable()

    def snapshot(self) -> tuple[int | None, list[int]]:
        """The finished prefix and the offsets finished above it, sorted."""
        with self._lock:
            return self._offsets.committable(), sorted(self._offsets.finished_above)


def take_finished(state: PartitionState) -> int:
    """Move ``state``'s committable offset up to what the processing thread finished.

    Returns the records finished since the last look (the commit policy counts them).
    """
    done_next = state.done_next
    counted = -1
    if state.tracker is not None:
        # Concurrent dispatch finishes out of order: count finishes, not the prefix's moves.
        total = state.finished_count
        counted, state.seen_count = total - state.seen_count, total
    if done_next is None:
        return max(counted, 0)
    offsets = state.offsets
    before = offsets.next_offset
    if before is not None and done_next <= before:
        return max(counted, 0)  # nothing new, or a reset whose event the loop has not handled yet
    offsets.advance(done_next)
    if counted >= 0:
        return counted
    if before is None:
        before = state.first_offset if state.first_offset is not None else done_next - 1
    return done_next - before

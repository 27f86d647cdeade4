"""Offset tracking: which offset of a partition is safe to commit.

The committable offset of a partition is one past the highest offset below which every started
record has finished. Records may finish out of order (a later key-ordered parallel mode); they are
started in fetch order, which is increasing per partition. Gaps between fetched offsets (compacted
topics, transaction markers) need no record and never hold the offset back.
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Started and finished offsets of one partition, and what may be committed."""

    __slots__ = ("_committed", "_finished", "_in_flight", "_next")

    def __init__(self, committed: int | None = None) -> None:
        #: Started offsets not yet known to be contiguous-finished, in start (= offset) order.
        self._in_flight: deque[int] = deque()
        #: Offsets finished out of order, still behind an unfinished one.
        self._finished: set[int] = set()
        #: One past the highest offset started so far (None before the first record).
        self._next: int | None = None
        #: Highest offset handed out for commit (or found committed at assignment).
        self._committed = committed

    def start(self, offset: int) -> None:
        """Record that processing of ``offset`` began. Offsets must be started in increasing order."""
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} started after {self._next - 1}: starts must increase")
        self._in_flight.append(offset)
        self._next = offset + 1

    def complete(self, offset: int) -> None:
        """Start and finish ``offset`` at once (a record handled before anything else was started)."""
        if self._in_flight:
            self.start(offset)
            self.finish(offset)
            return
        if self._next is not None and offset < self._next:
            raise ValueError(f"offset {offset} started after {self._next - 1}: starts must increase")
        self._next = offset + 1

    def advance(self, next_offset: int) -> None:
        """Everything started before ``next_offset`` finished (serial dispatch finishes in order)."""
        if self._in_flight:
            raise ValueError("advance() with records in flight: finish them one by one")
        if self._next is not None and next_offset < self._next:
            raise ValueError(f"advance to {next_offset} below {self._next}: offsets only move forward")
        self._next = next_offset

    def finish(self, offset: int) -> None:
        """Record that ``offset`` finished: handled, dropped, deduplicated or parked."""
        in_flight = self._in_flight
        if in_flight and in_flight[0] == offset:
            in_flight.popleft()
            finished = self._finished
            while in_flight and in_flight[0] in finished:
                finished.discard(in_flight.popleft())
            return
        if offset in self._finished or offset not in in_flight:
            raise ValueError(f"offset {offset} finished but was never started (or finished twice)")
        self._finished.add(offset)

    @property
    def finished_above(self) -> set[int]:
        """Offsets finished out of order, behind an unfinished one (read it under a lock)."""
        return self._finished

    @property
    def in_flight(self) -> int:
        """Number of started records that have not finished."""
        return len(self._in_flight) - len(self._finished)

    def committable(self) -> int | None:
        """One past the highest offset below which everything started has finished."""
        if self._in_flight:
            return self._in_flight[0]
        return self._next

    def to_commit(self) -> int | None:
        """The offset to commit now, or None when it would not move past the last commit."""
        offset = self.committable()
        if offset is None or (self._committed is not None and offset <= self._committed):
            return None
        return offset

    def mark_committed(self, offset: int) -> None:
        """Remember that ``offset`` was handed to Kafka; later commits never go below it."""
        if self._committed is None or offset > self._committed:
            self._committed = offset

    def revert_committed(self, offset: int | None) -> None:
        """A commit failed: forget it, back to the last acknowledged ``offset``, so it is sent again."""
        self._committed = offset

    @property
    def next_offset(self) -> int | None:
        """One past the highest offset started: where this worker's reading stands."""
        return self._next

    @property
    def committed(self) -> int | None:
        """The highest offset handed out for commit, or None."""
        return self._committed

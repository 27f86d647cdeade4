"""PartitionOffsets: which offset of a partition is safe to commit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from streamer.offsets import PartitionOffsets


def started(*offsets: int, committed: int | None = None) -> PartitionOffsets:
    """A tracker with ``offsets`` started, in the order given."""
    tracker = PartitionOffsets(committed=committed)
    for offset in offsets:
        tracker.start(offset)
    return tracker


# --- examples -------------------------------------------------------------------------------------


def test_nothing_started_has_nothing_to_commit() -> None:
    tracker = PartitionOffsets()
    assert tracker.committable() is None
    assert tracker.to_commit() is None
    assert tracker.in_flight == 0
    assert tracker.committed is None


def test_in_order_finishing_moves_committable_one_past_each_finished_offset() -> None:
    tracker = started(0, 1, 2)
    assert tracker.committable() == 0
    for offset in (0, 1, 2):
        tracker.finish(offset)
        assert tracker.committable() == offset + 1
    assert tracker.in_flight == 0


def test_started_but_unfinished_offset_is_not_committable() -> None:
    tracker = started(10)
    assert tracker.committable() == 10  # commit "10" means: read 10 next, i.e. 10 is not done
    assert tracker.in_flight == 1


def test_gaps_between_started_offsets_never_hold_the_offset_back() -> None:
    tracker = started(0, 5, 9)  # 1-4 and 6-8: compacted away or transaction markers
    tracker.finish(0)
    assert tracker.committable() == 5
    tracker.finish(5)
    assert tracker.committable() == 9
    tracker.finish(9)
    assert tracker.committable() == 10


def test_first_started_offset_may_be_anywhere() -> None:
    tracker = started(1_000_000)
    tracker.finish(1_000_000)
    assert tracker.committable() == 1_000_001


def test_out_of_order_finishing_holds_committable_at_lowest_unfinished_offset() -> None:
    tracker = started(0, 1, 2, 3)
    tracker.finish(2)
    tracker.finish(3)
    assert tracker.committable() == 0
    assert tracker.in_flight == 2
    tracker.finish(1)
    assert tracker.committable() == 0
    assert tracker.in_flight == 1
    tracker.finish(0)
    assert tracker.committable() == 4  # 0 finishing releases the run 1-3 finished before it
    assert tracker.in_flight == 0


def test_out_of_order_finishing_releases_only_up_to_the_next_unfinished_offset() -> None:
    tracker = started(0, 1, 2, 3)
    tracker.finish(1)
    tracker.finish(3)
    tracker.finish(0)
    assert tracker.committable() == 2
    assert tracker.in_flight == 1


def test_to_commit_returns_committable_offset_before_any_commit() -> None:
    tracker = started(0, 1)
    tracker.finish(0)
    assert tracker.to_commit() == 1


def test_to_commit_returns_none_when_committable_has_not_moved_past_last_commit() -> None:
    tracker = started(0, 1)
    tracker.finish(0)
    tracker.mark_committed(1)
    assert tracker.to_commit() is None
    tracker.finish(1)
    assert tracker.to_commit() == 2


def test_to_commit_never_returns_an_offset_at_or_below_the_committed_one_from_assignment() -> None:
    tracker = started(5, committed=5)
    assert tracker.to_commit() is None  # 5 is in flight: committable is 5, already committed
    tracker.finish(5)
    assert tracker.to_commit() == 6


def test_to_commit_never_returns_an_offset_below_a_higher_committed_one() -> None:
    tracker = started(3, committed=10)
    tracker.finish(3)
    assert tracker.committable() == 4
    assert tracker.to_commit() is None


def test_mark_committed_is_monotonic() -> None:
    tracker = PartitionOffsets()
    tracker.mark_committed(7)
    tracker.mark_committed(3)
    assert tracker.committed == 7
    tracker.mark_committed(9)
    assert tracker.committed == 9


def test_starting_an_offset_below_the_last_started_raises() -> None:
    tracker = started(5)
    with pytest.raises(ValueError, match="starts must increase"):
        tracker.start(4)


def test_starting_the_same_offset_twice_raises() -> None:
    tracker = started(5)
    with pytest.raises(ValueError, match="starts must increase"):
        tracker.start(5)


def test_starting_below_an_already_finished_offset_raises() -> None:
    tracker = started(5)
    tracker.finish(5)
    with pytest.raises(ValueError, match="starts must increase"):
        tracker.start(5)


def test_finishing_an_offset_never_started_raises() -> None:
    tracker = started(0, 2)
    with pytest.raises(ValueError, match="never started"):
        tracker.finish(1)  # in the gap
    with pytest.raises(ValueError, match="never started"):
        tracker.finish(3)  # beyond the highest started


def test_finishing_with_nothing_started_raises() -> None:
    with pytest.raises(ValueError, match="never started"):
        PartitionOffsets().finish(0)


def test_finishing_the_lowest_offset_twice_raises() -> None:
    tracker = started(0, 1)
    tracker.finish(0)
    with pytest.raises(ValueError, match="finished twice"):
        tracker.finish(0)


def test_finishing_an_out_of_order_offset_twice_raises_and_keeps_the_count() -> None:
    tracker = started(0, 1)
    tracker.finish(1)
    with pytest.raises(ValueError, match="finished twice"):
        tracker.finish(1)
    assert tracker.in_flight == 1
    assert tracker.committable() == 0


# --- properties -----------------------------------------------------------------------------------


@given(
    gaps=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=50),
    first=st.integers(min_value=0, max_value=10**12),
    data=st.data(),
)
def test_finishing_every_started_offset_in_any_order_commits_one_past_the_highest(
    gaps: list[int], first: int, data: st.DataObject
) -> None:
    offsets = []
    next_offset = first
    for gap in gaps:
        next_offset += gap
        offsets.append(next_offset)
        next_offset += 1
    tracker = started(*offsets)
    for offset in data.draw(st.permutations(offsets), label="finish order"):
        tracker.finish(offset)
    assert tracker.in_flight == 0
    assert tracker.committable() == offsets[-1] + 1


class OffsetTracking(RuleBasedStateMachine):
    """Start offsets in increasing order with random gaps, finish them in any order, commit any time.

    A plain model (the started offsets and the finished ones) is the oracle the tracker must agree
    with after every step.
    """

    unfinished = Bundle("unfinished")

    def __init__(self) -> None:
        super().__init__()
        self.tracker = PartitionOffsets()
        self.started: list[int] = []
        self.finished: set[int] = set()
        self.next_free = 0
        self.commits: list[int] = []

    @initialize(first=st.integers(min_value=0, max_value=10**9))
    def choose_first_offset(self, first: int) -> None:
        self.next_free = first

    @rule(target=unfinished, gap=st.integers(min_value=0, max_value=3))
    def start(self, gap: int) -> int:
        offset = self.next_free + gap
        self.tracker.start(offset)
        self.started.append(offset)
        self.next_free = offset + 1
        return offset

    @rule(offset=consumes(unfinished))
    def finish(self, offset: int) -> None:
        self.tracker.finish(offset)
        self.finished.add(offset)

    @rule()
    def commit(self) -> None:
        offset = self.tracker.to_commit()
        if offset is None:
            return
        assert offset == self.tracker.committable()
        self.tracker.mark_committed(offset)
        self.commits.append(offset)

    @precondition(lambda self: self.started)
    @rule(back=st.integers(min_value=1, max_value=5))
    def start_out_of_order_is_rejected(self, back: int) -> None:
        with pytest.raises(ValueError, match="starts must increase"):
            self.tracker.start(self.next_free - back)

    @precondition(lambda self: self.finished)
    @rule(data=st.data())
    def finish_twice_is_rejected(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.finished)), label="finished offset")
        with pytest.raises(ValueError, match=r"never started|finished twice"):
            self.tracker.finish(offset)

    @rule(ahead=st.integers(min_value=0, max_value=5))
    def finish_never_started_is_rejected(self, ahead: int) -> None:
        with pytest.raises(ValueError, match="never started"):
            self.tracker.finish(self.next_free + ahead)

    # -- invariants, checked after every step --------------------------------------------------

    @property
    def in_flight(self) -> list[int]:
        return [offset for offset in self.started if offset not in self.finished]

    @invariant()
    def committable_never_passes_an_unfinished_offset(self) -> None:
        committable = self.tracker.committable()
        if committable is None:
            assert not self.started
            return
        assert all(offset in self.finished for offset in self.started if offset < committable)

    @invariant()
    def committable_is_lowest_unfinished_else_one_past_highest_started(self) -> None:
        if not self.started:
            assert self.tracker.committable() is None
        elif self.in_flight:
            assert self.tracker.committable() == min(self.in_flight)
        else:
            assert self.tracker.committable() == max(self.started) + 1

    @invariant()
    def offsets_handed_out_for_commit_strictly_increase(self) -> None:
        assert all(a < b for a, b in zip(self.commits, self.commits[1:], strict=False))
        assert self.tracker.committed == (self.commits[-1] if self.commits else None)

    @invariant()
    def in_flight_counts_started_but_unfinished_offsets(self) -> None:
        assert self.tracker.in_flight == len(self.in_flight)


TestOffsetTracking = OffsetTracking.TestCase

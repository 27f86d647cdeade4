"""The history checker on hand-made histories: what it counts, whom it blames, what it lets pass."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from tests.chaos.history import Effect, History, Parked, Promise, Sample, check, parse_effects

pytestmark = pytest.mark.unit  # pure logic: no services, though it lives in tests/chaos/

SAMPLES = [Sample(i, {0: i}) for i in range(20)]


def effects(worker: str, ids: range, at: int, partition: int = 0) -> list[Effect]:
    """One effect per id, in ``partition`` at offset = id, one nanosecond apart from ``at``."""
    return [Effect(partition, i, i, worker, at + n) for n, i in enumerate(ids)]


def history(effected: list[Effect], acked: Iterable[int], **fields: Any) -> History:
    """A history with enough samples of the committed offsets, none going backwards."""
    return History(acked=set(acked), effects=effected, samples=list(SAMPLES), **fields)


def test_a_clean_run_keeps_every_promise() -> None:
    result = check(history(effects("w1.1", range(10), 0), range(10)), Promise())
    assert result.ok, result.violations
    assert (result.acked, result.effects, result.duplicates, result.lost) == (10, 10, 0, ())


def test_acked_ids_neither_effected_nor_parked_are_lost() -> None:
    run = history(effects("w1.1", range(3), 0), range(6), parked=[Parked(4, b"x")])
    result = check(run, Promise(parked=None))
    assert (result.lost, result.unfinished) == ((3, 5), ())
    assert result.violations == (
        "2 acknowledged ids neither effected nor parked, and committed past: [3, 5]",
    )


def test_ids_not_handled_below_the_committed_offset_are_lost_above_it_unfinished() -> None:
    """A stalled run: ids 3 and 4 wait behind the commit (a restart handles them), id 2 was skipped."""
    positions = {i: (0, i) for i in range(5)}
    run = history(effects("w1.1", range(2), 0), range(5), positions=positions, final_committed={0: 3})
    result = check(run, Promise())
    assert (result.lost, result.unfinished) == ((2,), (3, 4))
    assert result.row()["lost"] == "1 (+2 unfinished)"
    assert result.violations[:2] == (
        "1 acknowledged ids neither effected nor parked, and committed past: [2]",
        "2 acknowledged ids not handled yet (not committed past: the next run would handle them): [3, 4]",
    )


def test_indeterminate_ids_may_be_effected_but_unknown_ids_may_not() -> None:
    run = history(effects("w1.1", range(4), 0), range(2), indeterminate={2})
    result = check(run, Promise())
    assert result.violations == ("1 effected ids were never produced: [3]",)


def test_effects_repeated_after_a_kill_are_charged_to_it_per_partition() -> None:
    first = effects("w1.1", range(10), 0, partition=0) + effects("w1.1", range(100, 104), 10, partition=1)
    again = effects("w2.1", range(5, 10), 1000, partition=0) + effects(
        "w2.1", range(100, 104), 2000, partition=1
    )
    run = history(first + again, [*range(10), *range(100, 104)], kills={"w1.1": 500, "w3.1": 600})
    [w1, w3] = check(run, Promise()).kills
    assert (w1.worker, dict(w1.repeated), w1.total, w1.worst_partition) == ("w1.1", {0: 5, 1: 4}, 9, 5)
    assert (w3.worker, w3.total) == ("w3.1", 0)
    assert check(run, Promise(per_kill_per_partition=5)).ok
    [violation] = check(run, Promise(per_kill_per_partition=4)).violations
    assert "SIGKILL of w1.1" in violation
    assert "{0: 5}" in violation
    [violation] = check(run, Promise(per_kill_total=8)).violations
    assert "repeated 9 effects, more than the window of 8" in violation


def test_a_repeat_with_no_kill_before_it_is_unexplained() -> None:
    """A clean stop re-reads nothing; and a repeat written before the kill is concurrent processing."""
    first = effects("w1.1", range(5), 0)
    again = effects("w2.1", range(3, 5), 100)  # w1.1 is killed only at 1000: both ran the ids
    run = history(first + again, range(5), kills={"w1.1": 1000})
    result = check(run, Promise())
    assert result.unexplained == {0: (3, 4)}
    assert result.duplicated == {3: 2, 4: 2}
    assert result.violations == (
        "partition 0: 2 effects repeated without a SIGKILL to explain them (allowed 0): ids [3, 4]",
    )
    assert check(run, Promise(unexplained_per_partition=2)).ok


def test_a_repeat_is_charged_to_the_last_writer() -> None:
    """w1 killed, w2 re-runs and is killed too, w3 re-runs again: the second repeat is w2's."""
    run = history(
        effects("w1.1", range(2), 0) + effects("w2.1", range(2), 100) + effects("w3.1", range(2), 200),
        range(2),
        kills={"w1.1": 50, "w2.1": 150},
    )
    result = check(run, Promise(per_kill_per_partition=2))
    assert [(k.worker, k.total) for k in result.kills] == [("w1.1", 2), ("w2.1", 2)]
    assert result.ok


def test_committed_offsets_going_backwards_are_reported() -> None:
    run = history([], range(0))
    run.samples = [*SAMPLES, Sample(10**9 + 30, {0: 7, 1: 4}), Sample(10**9 + 40, {0: 19})]
    [violation] = check(run, Promise()).violations
    assert violation.startswith("committed offsets went backwards: partition 0: 19 at 0.00s, then 7 at 1.00s")


def test_too_few_samples_prove_nothing() -> None:
    run = history([], range(0))
    run.samples = SAMPLES[:3]
    run.sample_errors = 40
    assert check(run, Promise()).violations == (
        "only 3 samples of the committed offsets (40 failed): 'never backwards' proves nothing",
    )


def test_partitions_not_committed_to_their_end_after_the_last_stop() -> None:
    run = history([], range(0), end_offsets={0: 5, 1: 3}, final_committed={0: 5})
    assert check(run, Promise()).violations == (
        "committed offsets after the last stop differ from the end offsets: {1: (None, 3)} "
        "(partition: (committed, end))",
    )


def test_finished_records_left_uncommitted_by_the_last_stop_are_reported() -> None:
    """Offsets 0-5 handled (4 parked), 7 too; committed 2: a restart re-runs 2-5, not 7 (after a gap)."""
    handled = [Effect(0, o, o, "w1.1", o) for o in (0, 1, 2, 3, 5, 7)]
    run = history(handled, [*range(6), 7], parked=[Parked(4, b"x")], positions={4: (0, 4)})
    run.final_committed = {0: 2}
    assert check(run, Promise(parked=frozenset({4}))).violations == (
        "partition 0: handled without a gap up to offset 6, committed 2 after the last stop: "
        "a restart would re-run 4 finished records",
    )
    assert check(run, Promise(parked=frozenset({4}), unexplained_per_partition=4)).ok  # an outage's allowance


def test_parked_ids_must_be_exactly_the_expected_ones_each_once() -> None:
    run = history([], range(3), parked=[Parked(0, b"a"), Parked(0, b"a"), Parked(1, None)])
    assert check(run, Promise(parked=frozenset({0, 2}))).violations == (
        "1 acknowledged ids neither effected nor parked, and committed past: [2]",
        "1 ids parked that should not be: [1]",
        "1 ids not parked that should be: [2]",
        "1 ids parked more than once: [0]",
    )


def test_effects_files_are_parsed_up_to_the_last_complete_line() -> None:
    data = b"0 5 17 w1.2 123\n3 9 40 w2.1 456\n1 2 3 w"
    assert parse_effects(data) == [Effect(0, 5, 17, "w1.2", 123), Effect(3, 9, 40, "w2.1", 456)]


def test_the_failure_message_names_the_seed_and_the_figures() -> None:
    result = check(history(effects("w1.1", range(2), 0), range(3)), Promise())
    message = result.describe(1234)
    assert message.startswith("seed 1234 (rerun with CHAOS_SEED=1234): acked 3, effects 2, lost 1")
    assert message.endswith("- 1 acknowledged ids neither effected nor parked, and committed past: [2]")


def test_effects_lines_with_the_start_and_the_key_are_parsed() -> None:
    data = b"0 5 17 w1.2 123 100 p0-k3\n3 9 40 w2.1 456 450 -\n"
    assert parse_effects(data) == [
        Effect(0, 5, 17, "w1.2", 123, 100, "p0-k3"),
        Effect(3, 9, 40, "w2.1", 456, 450, None),
    ]


def keyed(worker: str, key: str, spans: list[tuple[int, int, int]], partition: int = 0) -> list[Effect]:
    """Effects of one key: (offset, started_ns, at_ns) each; the id is the offset."""
    return [Effect(partition, o, o, worker, at, started, key) for o, started, at in spans]


def test_a_key_handled_one_record_at_a_time_in_offset_order_keeps_the_key_order() -> None:
    """Two keys interleaved (they overlap each other: allowed), each in order; a keyless lane too."""
    run = history(
        keyed("w1.1", "a", [(0, 0, 10), (2, 11, 20), (5, 20, 30)])
        + keyed("w1.1", "b", [(1, 1, 12), (3, 13, 14), (4, 15, 16)])
        + keyed("w1.1", "a", [(7, 3, 9)], partition=1)  # the same key elsewhere: another lane
        + [Effect(0, 6, 6, "w1.1", 40, 35)],  # an old line (no key): the partition's keyless lane
        range(8),
    )
    result = check(run, Promise(key_order=True))
    assert result.ok, result.violations
    assert result.key_order == (3, 0)
    assert result.row()["key order (keys/breaks)"] == "3/0"
    assert check(run, Promise()).row()["key order (keys/breaks)"] == "-"


def test_a_key_record_finishing_before_an_earlier_offset_breaks_the_key_order() -> None:
    run = history(keyed("w1.1", "a", [(0, 0, 10), (1, 2, 8), (2, 11, 12)]), range(3))
    result = check(run, Promise(key_order=True))
    assert result.key_order == (1, 1)
    assert result.violations == (
        '1 records broke their key\'s order (ordering "key": one at a time, in offset order; first '
        "handlings only): partition 0 key a: offset 1 (id 1, w1.1) finished 0.0 ms before offset 0 "
        "(id 0, w1.1) finished",
    )
    assert check(run, Promise()).ok


def test_a_key_record_starting_before_the_previous_one_finished_breaks_the_key_order() -> None:
    """Finishing in order is not enough: the two ran at the same time."""
    run = history(keyed("w1.1", "a", [(0, 0, 10_000_000), (1, 4_000_000, 12_000_000)]), range(2))
    [violation] = check(run, Promise(key_order=True)).violations
    assert violation.endswith(
        "partition 0 key a: offset 1 (id 1, w1.1) started 6.0 ms before offset 0 (id 0, w1.1) finished"
    )


def test_re_reads_after_a_kill_are_no_break_of_the_key_order() -> None:
    """w1 handled 0-2 and was killed; w2 re-runs 1-2 and goes on with 3: the firsts are in order."""
    first = keyed("w1.1", "a", [(0, 0, 10), (1, 11, 20), (2, 21, 30)])
    again = keyed("w2.1", "a", [(1, 100, 110), (2, 111, 120), (3, 121, 130)])
    run = history(first + again, range(4), kills={"w1.1": 50})
    result = check(run, Promise(key_order=True, per_kill_per_partition=2))
    assert result.ok, result.violations
    assert result.key_order == (1, 0)


def test_the_key_order_of_a_run_without_keyed_records_proves_nothing() -> None:
    assert check(history(effects("w1.1", range(3), 0), range(3)), Promise(key_order=True)).violations == (
        "no keyed records were handled: the key order proves nothing",
    )

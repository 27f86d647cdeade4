"""The delivery contract of one worker process, against the real broker.

Each test runs ``streamer run tests.integration.apps.recording:app`` as a subprocess, stops it the
way production does (SIGKILL, SIGTERM, a failing record, the end of a bounded run) and checks
the effects it wrote and the offsets its group committed: no loss, bounded re-reading after a
crash, none after a clean stop.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.workers import (
    STOP_TIMEOUT_S,
    Effect,
    WorkerPool,
    duplicates,
    id_counts,
    offsets_by_partition,
    read_effects,
)
from tests.support.kafka import committed_offsets, end_offsets, produce_records

RECORDS = 20_000
EVERY_RECORDS = 500
POLL_BATCH = 100
#: Busy-wait per record: 20,000 records take a few seconds, so a signal lands mid-run.
WORK_US = 100
#: Where run 1 is stopped: well past the first commits, well before the end.
STOP_AFTER = 5_000
#: Seconds a bounded run over these records may take, start-up and group join included.
RUN_TIMEOUT_S = 45.0


@pytest.fixture
def pool(tmp_path: Path, kafka_bootstrap: str, group_id: str, topic: str) -> Iterator[WorkerPool]:
    """Workers on ``topic`` in ``group_id``; any still running at teardown are killed."""
    with WorkerPool(tmp_path, kafka_bootstrap, group_id, topic) as workers:
        yield workers


def assert_no_loss_before(committed: dict[int, int], run: list[Effect]) -> None:
    """Every offset below each committed offset was handled in ``run``."""
    handled = {p: set(offsets) for p, offsets in offsets_by_partition(run).items()}
    for partition, offset in committed.items():
        missing = set(range(offset)) - handled.get(partition, set())
        assert not missing, (
            f"partition {partition} committed {offset} but {len(missing)} offsets below it were never "
            f"handled, e.g. {sorted(missing)[:10]}"
        )


def assert_all_once_at_least(total: int, *runs: list[Effect]) -> None:
    counts = id_counts(*runs)
    lost = set(range(total)) - set(counts)
    assert not lost, f"{len(lost)} records never handled, e.g. {sorted(lost)[:10]}"
    assert set(counts) == set(range(total)), f"unexpected ids {sorted(set(counts) - set(range(total)))[:10]}"


def test_sigkill_mid_run_loses_nothing_and_rereads_a_bounded_number(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str, topic: str
) -> None:
    """kill -9 mid-run, restart: nothing lost, at most every_records + one batch re-read per partition."""
    produce_records(kafka_bootstrap, topic, RECORDS)
    ends = end_offsets(kafka_bootstrap, topic)
    # Static membership: the restarted worker takes the killed one's place at once instead of
    # waiting for its session to time out.
    client = {"group.instance.id": f"{group_id}-w", "session.timeout.ms": 6000}
    settings = {"every_records": EVERY_RECORDS, "poll_batch_size": POLL_BATCH, "client": client}

    first = pool.start("run1", work_us=WORK_US, **settings)
    first.wait_handled(STOP_AFTER)
    first.send(signal.SIGKILL)
    assert first.wait(STOP_TIMEOUT_S) == -signal.SIGKILL
    run1 = read_effects(first.effects)
    assert len(run1) < RECORDS, "run 1 finished before it was killed: the test proves nothing"

    committed = committed_offsets(kafka_bootstrap, group_id, topic)
    assert committed, f"nothing committed after {len(run1)} records with every_records={EVERY_RECORDS}"
    assert_no_loss_before(committed, run1)

    second = pool.start("run2", until_end=True, **settings)
    assert second.wait(RUN_TIMEOUT_S) == 0, second.describe()
    run2 = read_effects(second.effects)

    assert_all_once_at_least(RECORDS, run1, run2)
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends
    first_offsets, second_offsets = offsets_by_partition(run1), offsets_by_partition(run2)
    for partition, end in ends.items():
        handled_before = first_offsets.get(partition, [])
        handled_after = second_offsets.get(partition, [])
        assert handled_before == list(range(len(handled_before))), f"run 1 skipped in {partition}"
        resumed_at = handled_after[0] if handled_after else end
        # The resume point is the last commit: at or past what we read after the kill (a commit
        # still in the socket may land a moment after), never past what run 1 handled.
        assert committed.get(partition, 0) <= resumed_at <= len(handled_before), (
            f"partition {partition}: resumed at {resumed_at}, committed {committed.get(partition)}, "
            f"run 1 handled {len(handled_before)}"
        )
        assert handled_after == list(range(resumed_at, end)), f"run 2 skipped in partition {partition}"
        reread = len(set(handled_before) & set(handled_after))
        assert reread <= EVERY_RECORDS + POLL_BATCH, (
            f"partition {partition}: re-read {reread} records after the crash, more than "
            f"every_records + poll_batch_size = {EVERY_RECORDS + POLL_BATCH}"
        )


def test_sigterm_mid_run_commits_everything_and_rereads_nothing(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str, topic: str
) -> None:
    """SIGTERM mid-run exits 0 at once with all it handled committed; the restart re-reads nothing."""
    produce_records(kafka_bootstrap, topic, RECORDS)
    ends = end_offsets(kafka_bootstrap, topic)
    settings = {"every_records": EVERY_RECORDS, "poll_batch_size": POLL_BATCH}

    first = pool.start("run1", work_us=WORK_US, **settings)
    first.wait_handled(STOP_AFTER)
    first.send(signal.SIGTERM)
    assert first.wait(STOP_TIMEOUT_S) == 0, first.describe()
    run1 = read_effects(first.effects)
    assert len(run1) < RECORDS, "run 1 finished before SIGTERM: the test proves nothing"

    # A clean stop commits exactly what was handled: one past the last handled offset.
    handled = offsets_by_partition(run1)
    expected = {p: len(offsets) for p, offsets in handled.items() if offsets}
    for partition, offsets in handled.items():
        assert offsets == list(range(len(offsets))), f"run 1 skipped records in partition {partition}"
    assert committed_offsets(kafka_bootstrap, group_id, topic) == expected

    second = pool.start("run2", until_end=True, **settings)
    assert second.wait(RUN_TIMEOUT_S) == 0, second.describe()
    run2 = read_effects(second.effects)

    assert_all_once_at_least(RECORDS, run1, run2)
    twice = duplicates(id_counts(run1, run2))
    assert not twice, f"{len(twice)} records handled twice after a clean stop, e.g. {sorted(twice)[:10]}"
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends


def test_failing_record_stops_the_worker_committed_up_to_it(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str, topic: str
) -> None:
    """A handler error exits 1 with that partition committed exactly at the failed record."""
    records = 3_000
    produce_records(kafka_bootstrap, topic, records)
    ends = end_offsets(kafka_bootstrap, topic)
    fail_id = 1_501  # round-robin over 3 partitions: partition 1, offset 500
    fail_partition, fail_offset = fail_id % 3, fail_id // 3

    worker = pool.start("failing", until_end=True, fail_id=fail_id)
    assert worker.wait(RUN_TIMEOUT_S) == 1, worker.describe()
    run1 = read_effects(worker.effects)
    handled = offsets_by_partition(run1)
    committed = committed_offsets(kafka_bootstrap, group_id, topic)

    assert committed.get(fail_partition) == fail_offset, f"committed {committed}"
    assert handled.get(fail_partition) == list(range(fail_offset)), (
        f"partition {fail_partition}: expected offsets 0..{fail_offset - 1} handled, got "
        f"{len(handled.get(fail_partition, []))} records up to {max(handled.get(fail_partition, [-1]))}"
    )
    assert fail_id not in id_counts(run1)
    for partition, offsets in handled.items():
        # Everything that finished before the failure is committed (the final commit is synchronous).
        assert offsets == list(range(len(offsets))), f"partition {partition} skipped records"
        assert committed.get(partition) == len(offsets), f"partition {partition}: committed {committed}"

    # The failed record is read again on restart, and nothing else is.
    second = pool.start("restart", until_end=True)
    assert second.wait(RUN_TIMEOUT_S) == 0, second.describe()
    run2 = read_effects(second.effects)
    assert min(offsets_by_partition(run2)[fail_partition]) == fail_offset
    assert_all_once_at_least(records, run1, run2)
    assert not duplicates(id_counts(run1, run2))
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends

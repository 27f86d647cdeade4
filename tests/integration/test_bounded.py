"""Bounded runs (``streamer run --until-end``): stop at the end offsets seen at assignment, with
every record before them handled once and committed, and exit 0 only then."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TopicFactory
from tests.integration.workers import WorkerPool, duplicates, id_counts, read_effects
from tests.support.kafka import committed_offsets, end_offsets, produce_records, wait_for

#: Seconds a bounded run over these records may take, start-up and group join included.
RUN_TIMEOUT_S = 45.0


@pytest.fixture
def pool(tmp_path: Path, kafka_bootstrap: str, group_id: str, topic: str) -> Iterator[WorkerPool]:
    """Workers on ``topic`` in ``group_id``; any still running at teardown are killed."""
    with WorkerPool(tmp_path, kafka_bootstrap, group_id, topic) as workers:
        yield workers


def test_until_end_stops_at_the_end_offsets_seen_at_assignment(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str, topic: str
) -> None:
    """--until-end handles every record once, commits the end offsets, ignores later records, exits 0."""
    prefilled = 9_000
    produce_records(kafka_bootstrap, topic, prefilled)
    ends = end_offsets(kafka_bootstrap, topic)
    slow = pool.directory / "slow"
    slow.touch()

    worker = pool.start("bounded", until_end=True, sleep_us=1_000, slow_while=slow)
    # Once a record is handled the partitions were assigned and their end offsets snapshotted;
    # records produced from now on are past the end of this run.
    worker.wait_handled(1)
    produce_records(kafka_bootstrap, topic, 3_000, start_id=prefilled)
    assert worker.running, "the run ended before more records were produced: the test proves less"
    slow.unlink()
    assert worker.wait(RUN_TIMEOUT_S) == 0, worker.describe()

    counts = id_counts(read_effects(worker.effects))
    assert set(counts) == set(range(prefilled)), (
        f"missing {sorted(set(range(prefilled)) - set(counts))[:10]}, "
        f"beyond the end {sorted(set(counts) - set(range(prefilled)))[:10]}"
    )
    assert not duplicates(counts)
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends


def test_two_bounded_workers_share_the_partitions(
    tmp_path: Path, kafka_bootstrap: str, group_id: str, topic_factory: TopicFactory
) -> None:
    """A second --until-end worker joining a running one takes over partitions and finishes them.

    With cooperative-sticky, a member joining a group whose partitions are all owned gets an
    empty assignment first and its share only in a second round, once the owner revoked it.
    """
    topic = topic_factory(6)
    records = 12_000
    produce_records(kafka_bootstrap, topic, records)
    ends = end_offsets(kafka_bootstrap, topic)
    slow = tmp_path / "slow"
    slow.touch()
    # Fast heartbeats so that rebalances take well under a second; a short session so that a
    # member that leaves without a LeaveGroup holds the group up for 6 s, not 45.
    client = {"heartbeat.interval.ms": 500, "session.timeout.ms": 6000}
    settings = {"until_end": True, "sleep_us": 1_000, "slow_while": slow, "client": client}

    with WorkerPool(tmp_path, kafka_bootstrap, group_id, topic) as pool:
        a = pool.start("a", **settings)
        a.wait_handled(300)
        b = pool.start("b", **settings)
        wait_for(
            lambda: b.handled() > 0 or not b.running,
            RUN_TIMEOUT_S,
            message=lambda: f"{b.describe()}\n{a.describe()}",
        )
        slow.unlink()  # B joined (or gave up): let both finish at full speed
        assert b.wait(RUN_TIMEOUT_S) == 0, b.describe()
        assert a.wait(RUN_TIMEOUT_S) == 0, a.describe()
        report = f"{a.describe()}\n{b.describe()}"

    run_a, run_b = read_effects(a.effects), read_effects(b.effects)
    counts = id_counts(run_a, run_b)
    committed = committed_offsets(kafka_bootstrap, group_id, topic)
    problems = []
    if not run_b:
        problems.append(
            "worker b exited 0 without handling a record: its bounded run took the empty first "
            "assignment of a cooperative rebalance for the end of its work"
        )
    lost = set(range(records)) - set(counts)
    if lost:
        problems.append(f"both workers exited 0 but {len(lost)} records were never handled")
    if duplicates(counts):
        problems.append(f"records handled twice: {sorted(duplicates(counts))[:10]}")
    if committed != ends:
        problems.append(f"both workers exited 0 but committed {committed}, end offsets {ends}")
    assert not problems, "\n".join(problems) + "\n" + report

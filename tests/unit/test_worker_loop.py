"""The worker loop's commit logic on the in-memory source twin (pure logic; Kafka is tested elsewhere)."""

from __future__ import annotations

import pytest

from streamer import DropRecord, Message
from streamer.exitcodes import EXIT_FAILED, EXIT_OK
from streamer.settings import Settings, load_settings
from streamer.testing import MemoryDeadLetterSink, MemorySource
from streamer.worker import Worker


def settings(every_records: int = 10, every_seconds: float = 0, **sections: dict[str, object]) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": "memory", "group_id": "g", "poll_batch_size": 7},
        commit={"every_records": every_records, "every_seconds": every_seconds},
        metrics={"enabled": False},
        **sections,
    )


def values(n: int) -> list[bytes]:
    return [b"%d" % i for i in range(n)]


def run(source: MemorySource, handler: object, cfg: Settings, **kwargs: object) -> Worker:
    worker = Worker(cfg, {"t": handler}, source=source, until_end=True, **kwargs)  # type: ignore[arg-type]
    worker.exit_code = worker.run()  # type: ignore[attr-defined]
    return worker


def test_commits_once_n_records_finished_never_more_than_n_plus_in_flight_apart() -> None:
    source = MemorySource({"t": [values(35)]})
    worker = run(source, lambda m: None, settings(every_records=10, dead_letter={"enabled": False}))
    steady = [
        offsets[("t", 0)] for offsets, metadata, _ in source.commits if "state=running" in metadata[("t", 0)]
    ]
    gaps = [b - a for a, b in zip([0, *steady], steady, strict=False)]
    # Each commit waits for N finished records; the processing thread may finish up to two poll
    # batches (7 each here) more before the loop sends it: the re-read bound is N + in flight.
    assert steady, "steady-state commits while the run goes on"
    assert all(10 <= gap <= 10 + 2 * 7 for gap in gaps), gaps
    assert source.commits[-1][0] == {("t", 0): 35}, "the end of a bounded run commits"
    assert "state=clean" in source.commits[-1][1][("t", 0)]
    assert worker.exit_code == EXIT_OK  # type: ignore[attr-defined]


def test_without_an_interval_only_the_end_commits() -> None:
    source = MemorySource({"t": [values(20), values(5)]})
    run(source, lambda m: None, settings(every_records=0, dead_letter={"enabled": False}))
    assert [all("state=clean" in m for m in metadata.values()) for _, metadata, _ in source.commits] == [True]
    assert source.commits[0][0] == {("t", 0): 20, ("t", 1): 5}


def test_a_failed_record_with_no_dead_letter_topic_stops_before_its_offset() -> None:
    def handler(msg: Message) -> None:
        if msg.offset == 13:
            raise ValueError("boom")

    source = MemorySource({"t": [values(30)]})
    worker = run(source, handler, settings(every_records=5, dead_letter={"enabled": False}))
    assert worker.exit_code == EXIT_FAILED  # type: ignore[attr-defined]
    assert max(offsets[("t", 0)] for offsets, _, _ in source.commits) == 13, "never past the failed record"


def test_dropped_and_parked_records_count_as_finished() -> None:
    def handler(msg: Message) -> None:
        if msg.offset == 3:
            raise DropRecord("not for us")
        if msg.offset == 4:
            raise ValueError("bad")

    source = MemorySource({"t": [values(6)]})
    sink = MemoryDeadLetterSink()
    worker = run(source, handler, settings(), dead_letter=sink)
    assert [(topic, msg.offset) for topic, msg, _ in sink.parked] == [("t.dlq", 4)]
    assert source.commits[-1][0] == {("t", 0): 6}
    assert (worker.stats.processed, worker.stats.dropped, worker.stats.dead_lettered) == (4, 1, 1)


@pytest.mark.parametrize("every", [1, 3, 1000])
def test_committed_offsets_only_increase(every: int) -> None:
    source = MemorySource({"t": [values(50), values(17)]})
    run(source, lambda m: None, settings(every_records=every, dead_letter={"enabled": False}))
    for tp in (("t", 0), ("t", 1)):
        seq = [offsets[tp] for offsets, _, _ in source.commits if tp in offsets]
        assert seq == sorted(seq)
        assert seq[-1] == len(source.records["t"][tp[1]])


def test_the_adaptive_policy_learns_from_a_failed_runs_metadata_and_passes_it_on() -> None:
    # An earlier run started at t=100 s, last committed at t=110 s with a 4 s interval, and knew
    # of 3 failures over 30 s of up time: it died within 4 s after 110, so ~2 s after it.
    source = MemorySource({"t": [values(30)]})
    source._committed[("t", 0)] = 5
    source._metadata[("t", 0)] = (
        "streamer/1 state=running run_start=100.000 at=110.000 every=4.000 up=30.000 fails=3"
    )
    cfg = load_settings(
        kafka={"bootstrap_servers": "memory", "group_id": "g", "poll_batch_size": 7},
        commit={"policy": "adaptive", "every_records": 0, "adaptive_min_seconds": 0.001},
        metrics={"enabled": False},
        dead_letter={"enabled": False},
    )
    worker = run(source, lambda m: None, cfg)
    policy = worker.policy
    assert policy.learned == pytest.approx((30.0 + 12.0, 4))
    first = source.commits[0][1][("t", 0)]
    assert "state=running" in first, "the first commit of an adaptive run is due at once"
    assert "up=42.000 fails=4" in first
    assert "every=" in first
    assert "state=clean" in source.commits[-1][1][("t", 0)]

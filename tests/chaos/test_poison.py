"""Poison: values the topic's JSON decoder rejects, and records whose handler always fails, spread
through the backlog and arriving while two workers run."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.harness import WorkerSettings
from tests.chaos.history import Promise
from tests.chaos.scenario import (
    CLIENT,
    EVERY_RECORDS,
    PARTITIONS,
    POLL_BATCH_SIZE,
    Run,
    Scenario,
    run_checks,
    start_slots,
)
from tests.conftest import TopicFactory
from tests.support.kafka import encode_value

BACKLOG = 3000
LATER = 2000
#: Per-record sleep of the workers until the end: the later poison arrives while they are busy.
POISON_SLEEP_US = 500


def poison_values(ids: list[int]) -> dict[int, bytes]:
    """Values the JSON decoder rejects: broken JSON, and bytes that are not even UTF-8."""
    return {
        record: (b"{not json " if n % 2 else b"\xff\xfe binary ") + str(record).encode()
        for n, record in enumerate(ids)
    }


def test_poison_records_are_parked_with_their_bytes_and_no_worker_crash_loops(
    scenario: Scenario, tmp_path: Path, kafka_bootstrap: str, group_id: str, topic_factory: TopicFactory
) -> None:
    """Every poison record is parked in <topic>.dlq once, with its original value; every other
    record is handled; the handler never sees an undecodable value; no worker exits by itself."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")
    config = tmp_path / "streamer.toml"
    config.write_text(f'[topics."{topic}"]\ndecoder = "json"\n')
    rng = scenario.rng
    ids = rng.sample(range(BACKLOG), 15) + rng.sample(range(BACKLOG, BACKLOG + LATER), 15)
    undecodable, failing, retried = ids[:20], ids[20:25], ids[25:]
    values = poison_values(undecodable)
    settings = WorkerSettings(
        kafka_bootstrap,
        group_id,
        topic,
        EVERY_RECORDS,
        POLL_BATCH_SIZE,
        client=CLIENT,
        sleep_us=POISON_SLEEP_US,
        fail_ids=frozenset(failing),
        retry_ids=frozenset(retried),
        config=config,
    )
    first = {i: v for i, v in values.items() if i < BACKLOG}
    with Run(scenario, tmp_path, settings, PARTITIONS, backlog=BACKLOG, values=first) as run:
        start_slots(run, ["w1", "w2"])
        run.produce(LATER, values={i: v for i, v in values.items() if i >= BACKLOG})
        finished = run.finish()

    poison = set(ids)
    parked = {p.id: p.value for p in finished.history.parked}
    expected = {i: values.get(i) or encode_value(i, 100) for i in poison}
    extra = [
        f"id {i} parked with value {parked[i]!r}, produced as {expected[i]!r}"
        for i in sorted(poison & parked.keys())
        if parked[i] != expected[i]
    ]
    effected = sorted(poison & {e.id for e in finished.history.effects})
    if effected:
        extra.append(f"the handler completed poison records: {effected}")
    scenario.notes["poison"] = (
        f"{len(undecodable)} undecodable, {len(failing)} failing, {len(retried)} retried"
    )
    run_checks(scenario, run, finished, Promise(parked=frozenset(poison)), extra)

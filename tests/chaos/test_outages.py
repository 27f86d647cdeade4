"""Outages of the services a worker needs: the broker stopped for ~10 s, the dedup Redis stopped for ~10 s.

Both run on the ``chaos_services`` pair (a private Kafka and Redis managed with ``dev/services``,
unless ``CHAOS_SHARED_SERVICES=1``): a stopped service is always started again in ``finally`` and
the scenario waits until it answers, so the next test finds it up.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import DevServices, WorkerSettings, delete_keys, now_ns
from tests.chaos.history import Effect, Promise
from tests.chaos.scenario import (
    CLIENT,
    EVERY_RECORDS,
    LIVE_RATE,
    PARTITIONS,
    POLL_BATCH_SIZE,
    REREAD_BOUND,
    SLEEP_US,
    Run,
    Scenario,
    run_checks,
    start_slots,
)
from tests.support import wait_for
from tests.support.kafka import create_topic, delete_topics

#: How long each outage lasts.
OUTAGE_S = 10.0
#: Seconds a restarted service may take to answer again.
RESTART_TIMEOUT_S = 90.0
#: Effects a worker may write once Redis is down: records it had claimed before (their claims
#: hold), at most the poll batch in hand in mark_mode "batch". Nothing is claimed, marked or
#: committed while Redis is down (README, "Fail closed").
IN_HAND_RECORDS = POLL_BATCH_SIZE


@pytest.fixture
def outage_topic(chaos_services: DevServices, unique_name: str) -> Iterator[str]:
    """A fresh topic and its dead-letter topic on the chaos services' broker; deleted at teardown."""
    bootstrap = chaos_services.bootstrap
    topic = create_topic(bootstrap, unique_name, PARTITIONS)
    create_topic(bootstrap, f"{topic}.dlq", PARTITIONS)
    yield topic
    for failure in delete_topics(bootstrap, [topic, f"{topic}.dlq"]):
        print(f"outage_topic: could not delete {failure}", file=sys.stderr)


@pytest.fixture
def outage_namespace(chaos_services: DevServices, unique_name: str) -> Iterator[str]:
    """A dedup namespace on the chaos services' Redis; its keys are deleted at teardown."""
    yield unique_name
    delete_keys(chaos_services.redis_url, f"{unique_name}:*")


def test_broker_outage_loses_nothing_and_repeats_within_the_bound(
    scenario: Scenario, tmp_path: Path, chaos_services: DevServices, outage_topic: str, group_id: str
) -> None:
    """Kafka stopped for ~10 s under load, then started again: the workers ride it out (no exit),
    nothing acknowledged is lost, and the records run again stay within the re-read bound per
    partition: commits that cannot land hold processing back instead of piling up work at risk."""
    services, topic = chaos_services, outage_topic
    settings = WorkerSettings(
        services.bootstrap, group_id, topic, EVERY_RECORDS, POLL_BATCH_SIZE, client=CLIENT, sleep_us=SLEEP_US
    )
    with Run(scenario, tmp_path, settings, PARTITIONS, backlog=3000, rate=LIVE_RATE) as run:
        start_slots(run, ["w1", "w2"])
        time.sleep(scenario.rng.uniform(2.0, 4.0))  # pacing: the outage starts 2-4 s into the run
        down_at = time.monotonic()
        try:
            run.cluster.note("broker down")
            services.down("kafka")
            time.sleep(OUTAGE_S)  # pacing: the outage lasts OUTAGE_S
        finally:
            services.up("kafka")
            wait_for(
                services.kafka_answers, RESTART_TIMEOUT_S, interval=0.5, message="Kafka did not come back"
            )
            run.cluster.note("broker up")
        scenario.notes["broker away"] = f"{time.monotonic() - down_at:.1f}s"
        time.sleep(scenario.rng.uniform(3.0, 5.0))  # pacing: 3-5 s of load after the outage
        finished = run.finish()
    run_checks(scenario, run, finished, Promise(unexplained_per_partition=REREAD_BOUND))


def test_redis_outage_with_dedup_runs_nothing_while_down_and_loses_nothing(
    scenario: Scenario,
    tmp_path: Path,
    chaos_services: DevServices,
    outage_topic: str,
    outage_namespace: str,
    group_id: str,
) -> None:
    """The dedup Redis stopped for ~10 s (and only Redis: Kafka keeps answering), then started
    again, empty: the workers fail closed (no effect while it is down, beyond the records claimed
    before it went down), stay in the group, resume, and lose and repeat nothing."""
    services, topic = chaos_services, outage_topic
    settings = WorkerSettings(
        services.bootstrap,
        group_id,
        topic,
        EVERY_RECORDS,
        POLL_BATCH_SIZE,
        client=CLIENT,
        sleep_us=SLEEP_US,
        dedup_url=services.redis_url,
        dedup_namespace=outage_namespace,
        env={"STREAMER_DEDUP__TIMEOUT": "0.5"},
    )
    extra: list[str] = []
    with Run(scenario, tmp_path, settings, PARTITIONS, backlog=3000, rate=LIVE_RATE) as run:
        start_slots(run, ["w1", "w2"])
        time.sleep(scenario.rng.uniform(2.0, 4.0))  # pacing: the outage starts 2-4 s into the run
        down_at = up_at = now_ns()
        try:
            run.cluster.note("redis down")
            services.down("redis")
            down_at = now_ns()  # from here on nothing answers on Redis' port
            if not services.kafka_answers():
                extra.append("stopping Redis with dev/services stopped Kafka too")
            time.sleep(OUTAGE_S)  # pacing: the outage lasts OUTAGE_S
        finally:
            up_at = now_ns()  # until here nothing answered
            services.up("redis")
            wait_for(
                services.redis_answers, RESTART_TIMEOUT_S, interval=0.2, message="Redis did not come back"
            )
            run.cluster.note("redis up")
        time.sleep(scenario.rng.uniform(3.0, 5.0))  # pacing: 3-5 s of load after the outage
        finished = run.finish()
    during = [e for e in finished.history.effects if down_at <= e.at_ns <= up_at]
    extra += effects_during_outage(during)
    scenario.notes["effects while down"] = str(len(during))
    run_checks(scenario, run, finished, Promise(), extra)


def effects_during_outage(during: list[Effect]) -> list[str]:
    """Workers that wrote more effects while Redis was down than the record they had in hand."""
    by_worker: dict[str, list[Effect]] = {}
    for effect in during:
        by_worker.setdefault(effect.worker, []).append(effect)
    return [
        f"{worker} wrote {len(effects)} effects while Redis was down (allowed {IN_HAND_RECORDS}, the "
        f"record in hand): ids {[e.id for e in effects[:20]]}"
        for worker, effects in sorted(by_worker.items())
        if len(effects) > IN_HAND_RECORDS
    ]

"""SIGKILL: a storm across three workers (dedup off and on), and a bounded job killed and resumed.

A SIGKILL costs re-reading: the next owner of the victim's partitions resumes from the last
acknowledged commit. The promise bounds it per kill: ``REREAD_BOUND`` records per partition the
victim owned with dedup off, ``DEDUP_WINDOW`` repeated effects in all with dedup on.

Both storms run with serial dispatch and with concurrent dispatch (``CONCURRENT``: 64 records in
flight, ordering by key, an async handler, keyed records): then the committed offset is the
finished prefix, the offsets finished above it travel in the commit metadata for the next owner
to skip, the re-read bound is ``REREAD_BOUND + CONCURRENCY`` and each key's records must be
handled one at a time in offset order. The concurrent storms kill less often (the suite's time
budget), but just as randomly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos.harness import START_TIMEOUT_S, WorkerSettings
from tests.chaos.history import Promise
from tests.chaos.scenario import (
    CLIENT,
    CONCURRENT,
    DEDUP_WINDOW,
    DISPATCH_PROTOCOLS,
    EVERY_RECORDS,
    LIVE_RATE,
    PARTITIONS,
    POLL_BATCH_SIZE,
    REREAD_BOUND,
    Dispatch,
    Run,
    Scenario,
    run_checks,
    start_slots,
)
from tests.conftest import TopicFactory
from tests.support import wait_for

SLOTS = ["w1", "w2", "w3"]
#: SIGKILLs per storm, one every 2-4 s (fewer with dedup on, and with concurrent dispatch).
STORM_KILLS = 8
CONCURRENT_STORM_KILLS = 5
#: With dedup on: a killed worker's claims expire before its session does (6 s), so its
#: successor runs its unfinished records at once instead of waiting for the claims.
STORM_LEASE_S = 5.0
#: The bounded job: records, and the per-record work that keeps it running long enough to be killed.
JOB_RECORDS = 20_000
JOB_SLEEP_US = 200
JOB_KILLS = 2


def storm(scenario: Scenario, run: Run, kills: int) -> None:
    """Three workers; kill a random one every 2-4 s and start it again at once."""
    start_slots(run, SLOTS)
    for _ in range(kills):
        time.sleep(scenario.rng.uniform(2.0, 4.0))  # pacing the nemesis: a kill every 2-4 s
        slot = scenario.rng.choice(SLOTS)
        run.cluster.kill(run.cluster.current[slot])
        run.cluster.start(slot)


@pytest.mark.parametrize(("dispatch", "group_protocol"), DISPATCH_PROTOCOLS)
def test_sigkill_storm_rereads_at_most_the_bound_per_kill(
    dispatch: Dispatch,
    group_protocol: str,
    scenario: Scenario,
    tmp_path: Path,
    kafka_bootstrap: str,
    group_id: str,
    topic_factory: TopicFactory,
) -> None:
    """Dedup off: each kill makes the next owners re-run at most REREAD_BOUND records per partition
    (plus CONCURRENCY with concurrent dispatch)."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")
    settings = dispatch.settings(
        WorkerSettings(
            kafka_bootstrap,
            group_id,
            topic,
            EVERY_RECORDS,
            POLL_BATCH_SIZE,
            client=CLIENT,
            group_protocol=group_protocol,
        )
    )
    kills = CONCURRENT_STORM_KILLS if dispatch is CONCURRENT else STORM_KILLS
    with Run(
        scenario, tmp_path, settings, PARTITIONS, backlog=3000, rate=LIVE_RATE, keys=dispatch.keys
    ) as run:
        storm(scenario, run, kills)
        finished = run.finish()
    run_checks(scenario, run, finished, dispatch.promise(per_kill_per_partition=dispatch.reread_bound))


@pytest.mark.parametrize(("dispatch", "group_protocol"), DISPATCH_PROTOCOLS)
def test_sigkill_storm_with_dedup_repeats_at_most_the_window_per_kill(
    dispatch: Dispatch,
    group_protocol: str,
    scenario: Scenario,
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    dedup_namespace: str,
    group_id: str,
    topic_factory: TopicFactory,
) -> None:
    """Dedup on (batch marks): each kill repeats at most DEDUP_WINDOW effects in all (with
    concurrent dispatch too)."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")
    settings = dispatch.settings(
        WorkerSettings(
            kafka_bootstrap,
            group_id,
            topic,
            EVERY_RECORDS,
            POLL_BATCH_SIZE,
            client=CLIENT,
            group_protocol=group_protocol,
            dedup_url=redis_url,
            dedup_namespace=dedup_namespace,
            lease_seconds=STORM_LEASE_S,
        )
    )
    kills = CONCURRENT_STORM_KILLS - 2 if dispatch is CONCURRENT else STORM_KILLS - 2
    with Run(
        scenario, tmp_path, settings, PARTITIONS, backlog=3000, rate=LIVE_RATE, keys=dispatch.keys
    ) as run:
        storm(scenario, run, kills)
        finished = run.finish()
    run_checks(scenario, run, finished, dispatch.promise(per_kill_total=DEDUP_WINDOW))


def test_bounded_job_killed_mid_run_resumes_and_finishes(
    scenario: Scenario, tmp_path: Path, kafka_bootstrap: str, group_id: str, topic_factory: TopicFactory
) -> None:
    """``streamer run --until-end`` SIGKILLed twice at random points: each resume re-reads within
    the bound, the last run exits 0 at the end offsets, nothing is lost."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")
    settings = WorkerSettings(
        kafka_bootstrap, group_id, topic, EVERY_RECORDS, POLL_BATCH_SIZE, client=CLIENT, sleep_us=JOB_SLEEP_US
    )
    with Run(scenario, tmp_path, settings, PARTITIONS, backlog=JOB_RECORDS, slow=False) as run:
        job = run.cluster.start("job", until_end=True)
        for _ in range(JOB_KILLS):
            run.cluster.wait_handled(job, scenario.rng.randint(1500, 5000))
            run.cluster.kill(job)
            job = run.cluster.start("job", until_end=True)
        wait_for(
            lambda: not job.running,
            START_TIMEOUT_S + JOB_RECORDS * JOB_SLEEP_US / 1e6 * 3,
            interval=0.1,
            message=lambda: f"the resumed job did not finish: {run.cluster.describe()}",
        )
        finished = run.finish(stop_workers=False)
    exits = [] if job.proc.returncode == 0 else [f"the last run {job.name} exited {job.proc.returncode}"]
    scenario.notes["job exit"] = str(job.proc.returncode)
    run_checks(scenario, run, finished, Promise(per_kill_per_partition=REREAD_BOUND), exits)

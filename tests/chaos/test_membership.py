"""Members coming and going under load: a rolling SIGTERM bounce, scaling 1 -> 3 -> 1, and a zombie.

A clean stop (SIGTERM) and a revoke commit what finished: the next owner re-reads nothing, so no
effect may repeat. A zombie (SIGSTOP past its session) must not run what its successor took over.

The rolling bounce runs with serial and with concurrent dispatch (``CONCURRENT``): a stop or a
revoke with records finished out of order commits their prefix and the map of those above it,
the next owner skips them (nothing repeats), and each key's records are handled in offset order
across the handovers.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos.harness import START_TIMEOUT_S, WorkerSettings, group_members, now_ns
from tests.chaos.history import Promise
from tests.chaos.scenario import (
    CLIENT,
    DISPATCH_PROTOCOLS,
    EVERY_RECORDS,
    LIVE_RATE,
    PARTITIONS,
    POLL_BATCH_SIZE,
    SLEEP_US,
    Dispatch,
    Run,
    Scenario,
    run_checks,
    start_slots,
)
from tests.conftest import TopicFactory
from tests.support import wait_for

#: The zombie's claims outlive its freeze (session timeout 6 s, then the takeover, then up to 2 s):
#: the survivor must wait for them. A freeze longer than the lease is a crash, whose cost is the
#: documented duplicate window (test_crashes), not this scenario's.
ZOMBIE_LEASE_S = 20.0


def settings_for(kafka_bootstrap: str, group_id: str, topic: str, group_protocol: str) -> WorkerSettings:
    return WorkerSettings(
        kafka_bootstrap,
        group_id,
        topic,
        EVERY_RECORDS,
        POLL_BATCH_SIZE,
        client=CLIENT,
        group_protocol=group_protocol,
        sleep_us=SLEEP_US,
    )


@pytest.mark.parametrize(("dispatch", "group_protocol"), DISPATCH_PROTOCOLS)
def test_rolling_sigterm_bounce_repeats_nothing(
    dispatch: Dispatch,
    group_protocol: str,
    scenario: Scenario,
    tmp_path: Path,
    kafka_bootstrap: str,
    group_id: str,
    topic_factory: TopicFactory,
) -> None:
    """Each of three workers in turn: SIGTERM, exit 0, start again, handle records; then the next."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")
    slots = ["w1", "w2", "w3"]
    settings = dispatch.settings(settings_for(kafka_bootstrap, group_id, topic, group_protocol))
    codes: dict[str, int | None] = {}
    with Run(
        scenario, tmp_path, settings, PARTITIONS, backlog=3000, rate=LIVE_RATE, keys=dispatch.keys
    ) as run:
        start_slots(run, slots)
        for slot in scenario.rng.sample(slots, len(slots)):
            time.sleep(scenario.rng.uniform(1.0, 2.0))  # pacing the bounce: the next stop in 1-2 s
            codes |= run.cluster.stop_all([run.cluster.current[slot]])
            run.cluster.wait_handled(run.cluster.start(slot), 1)
        finished = run.finish()
    finished.exit_codes |= codes
    run_checks(scenario, run, finished, dispatch.promise())


def test_scaling_one_to_three_to_one_repeats_nothing(
    group_protocol: str,
    scenario: Scenario,
    tmp_path: Path,
    kafka_bootstrap: str,
    group_id: str,
    topic_factory: TopicFactory,
) -> None:
    """One worker; two more join; both newcomers get SIGTERM at once; the first carries on alone."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")
    settings = settings_for(kafka_bootstrap, group_id, topic, group_protocol)
    with Run(scenario, tmp_path, settings, PARTITIONS, backlog=3000, rate=LIVE_RATE) as run:
        start_slots(run, ["w1"])
        time.sleep(scenario.rng.uniform(1.0, 2.0))  # pacing: w1 alone for 1-2 s
        start_slots(run, ["w2", "w3"])
        time.sleep(scenario.rng.uniform(2.0, 3.0))  # pacing: three workers for 2-3 s
        leaving = [run.cluster.current["w2"], run.cluster.current["w3"]]
        codes = run.cluster.stop_all(leaving)
        time.sleep(scenario.rng.uniform(2.0, 3.0))  # pacing: w1 alone again for 2-3 s
        finished = run.finish()
    finished.exit_codes |= codes
    run_checks(scenario, run, finished, Promise())


def test_zombie_frozen_past_its_session_repeats_nothing_with_dedup(
    group_protocol: str,
    scenario: Scenario,
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    dedup_namespace: str,
    group_id: str,
    topic_factory: TopicFactory,
) -> None:
    """SIGSTOP one of two workers until the group has evicted it, SIGCONT it: with dedup on, no
    record runs twice (the survivor waits for the zombie's claims; the zombie, back, must not
    run what the survivor took over)."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")
    settings = WorkerSettings(
        kafka_bootstrap,
        group_id,
        topic,
        EVERY_RECORDS,
        POLL_BATCH_SIZE,
        client=CLIENT,
        group_protocol=group_protocol,
        sleep_us=SLEEP_US,
        dedup_url=redis_url,
        dedup_namespace=dedup_namespace,
        lease_seconds=ZOMBIE_LEASE_S,
    )
    extra: list[str] = []
    with Run(scenario, tmp_path, settings, PARTITIONS, backlog=3000, rate=LIVE_RATE) as run:
        start_slots(run, ["w1", "w2"])
        time.sleep(scenario.rng.uniform(1.0, 2.0))  # pacing: both at work for 1-2 s
        zombie = run.cluster.current[scenario.rng.choice(["w1", "w2"])]
        frozen_at = time.monotonic()
        run.cluster.pause(zombie)
        wait_for(
            lambda: group_members(kafka_bootstrap, group_id) == 1,
            START_TIMEOUT_S,
            interval=0.2,
            message=lambda: f"the group did not evict the frozen {zombie.name}; {run.cluster.describe()}",
        )
        run.cluster.note(f"{zombie.name} evicted")
        time.sleep(scenario.rng.uniform(0.5, 2.0))  # pacing: the survivor meets the zombie's claims
        frozen = time.monotonic() - frozen_at
        resumed_ns = now_ns()
        run.cluster.resume(zombie)
        scenario.notes["frozen"] = f"{frozen:.1f}s"
        if frozen >= ZOMBIE_LEASE_S:
            extra.append(
                f"the freeze lasted {frozen:.1f}s, not under the {ZOMBIE_LEASE_S:g}s lease: "
                "the scenario tested a crash, not a zombie"
            )
        time.sleep(scenario.rng.uniform(3.0, 5.0))  # pacing: the zombie back among the living
        finished = run.finish()
    back = sum(1 for e in finished.history.effects if e.worker == zombie.name and e.at_ns > resumed_ns)
    scenario.notes["zombie handled after SIGCONT"] = str(back)
    run_checks(scenario, run, finished, Promise(), extra)

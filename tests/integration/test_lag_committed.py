"""``streamer lag`` reads committed offsets with a consumer that never subscribes, not with the
AdminClient's coordinator requests (which librdkafka 2.16 can crash on after a broker restart):
figures of real groups, unknown groups (exit 4), and a live group left undisturbed.

The broker restart itself is not reproduced here: the dev broker is shared with tests that must
not see it go away. What is pinned is that ``streamer lag`` never makes the requests that crash.
"""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamer.lag import GroupNotFoundError, PartitionLag, group_lag
from tests.conftest import TopicFactory
from tests.integration.workers import REPO, clean_env, streamer_command
from tests.support import wait_for
from tests.support.kafka import produce_records


def commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Commit ``offsets`` for ``group`` without joining it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
        )
    finally:
        consumer.close()


def lag_command(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        streamer_command("lag", "--bootstrap", bootstrap, *args),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def no_coordinator_admin_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the AdminClient's coordinator-bound group requests fail the test if anything sends them."""
    sent: list[str] = []

    def refuse(name: str) -> Any:
        def call(*_args: Any, **_kwargs: Any) -> Any:
            sent.append(name)
            raise AssertionError(f"AdminClient.{name} sent: it can abort the process after a broker restart")

        return call

    for name in ("list_consumer_group_offsets", "describe_consumer_groups"):
        monkeypatch.setattr(AdminClient, name, refuse(name))
    return sent


def test_lag_reads_a_groups_offsets_on_every_topic_without_coordinator_admin_requests(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str, no_coordinator_admin_requests: list[str]
) -> None:
    orders, refunds = topic_factory(3), topic_factory(1)
    produce_records(kafka_bootstrap, orders, 30)  # 10 per partition
    produce_records(kafka_bootstrap, refunds, 4)
    commit(kafka_bootstrap, group_id, {(orders, 0): 10, (orders, 1): 4, (refunds, 0): 1})

    rows = group_lag({"bootstrap.servers": kafka_bootstrap}, group_id)

    assert [(r.topic, r.partition, r.committed, r.end, r.lag) for r in rows] == sorted(
        [(orders, 0, 10, 10, 0), (orders, 1, 4, 10, 6), (refunds, 0, 1, 4, 3)]
    ), "partition 2 of orders has no commit and is not listed"
    by_tp = {(r.topic, r.partition): r for r in rows}
    assert by_tp[orders, 0].seconds == 0.0
    assert all((by_tp[tp].seconds or -1) >= 0 for tp in [(orders, 1), (refunds, 0)])
    assert no_coordinator_admin_requests == []


def test_lag_of_a_group_that_does_not_exist_is_not_found_without_coordinator_admin_requests(
    kafka_bootstrap: str, group_id: str, no_coordinator_admin_requests: list[str]
) -> None:
    with pytest.raises(GroupNotFoundError, match="has no committed offsets: no group of that name exists"):
        group_lag({"bootstrap.servers": kafka_bootstrap}, group_id)
    assert no_coordinator_admin_requests == []


def test_lag_of_a_live_group_reports_its_figures_and_leaves_it_undisturbed(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str
) -> None:
    """A member joined and stable: lag (twice, through the command) neither joins nor rebalances it;
    before its first commit the group is not found (exit 4, in state stable), after it the figures show."""
    topic = topic_factory(2)
    produce_records(kafka_bootstrap, topic, 20)  # 10 per partition
    assigned: list[list[int]] = []
    revoked: list[list[int]] = []
    member = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    member.subscribe(
        [topic],
        on_assign=lambda _c, ps: assigned.append([p.partition for p in ps]),
        on_revoke=lambda _c, ps: revoked.append([p.partition for p in ps]),
    )
    results: list[subprocess.CompletedProcess[str]] = []

    def run_lag() -> threading.Thread:
        thread = threading.Thread(
            target=lambda: results.append(lag_command(kafka_bootstrap, "--group", group_id, "--json"))
        )
        thread.start()
        return thread

    def joined() -> bool:
        member.poll(0.1)
        return bool(assigned)

    def serve_until(done: threading.Thread) -> bool:
        member.poll(0.1)  # the member keeps serving the group while lag runs
        return not done.is_alive()

    try:
        wait_for(joined, 30, message="the member joined")
        before = run_lag()
        wait_for(lambda: serve_until(before), 60, message="lag finished")
        member.commit(offsets=[TopicPartition(topic, 0, 7), TopicPartition(topic, 1, 10)], asynchronous=False)
        after = run_lag()
        wait_for(lambda: serve_until(after), 60, message="lag finished")
        assert (assigned, revoked) == ([[0, 1]], []), "lag joined or rebalanced the group"
    finally:
        member.close()

    not_yet, figures = results
    assert not_yet.returncode == 4, not_yet
    assert f"consumer group '{group_id}' has no committed offsets (state stable)" in not_yet.stderr
    assert figures.returncode == 0, figures.stderr
    rows = [PartitionLag(**row) for row in json.loads(figures.stdout)]
    assert [(r.partition, r.committed, r.end, r.lag) for r in rows] == [(0, 7, 10, 3), (1, 10, 10, 0)]

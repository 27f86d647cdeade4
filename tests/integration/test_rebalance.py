"""Workers joining and leaving a group under load: nothing lost, nothing handled twice, and the
group's committed offsets never move backwards while partitions change hands."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupState, ConsumerGroupTopicPartitions, TopicPartition

from streamer.exitcodes import EXIT_FAILED, EXIT_OK
from tests.conftest import TopicFactory
from tests.integration.workers import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Worker,
    WorkerPool,
    duplicates,
    id_counts,
    read_effects,
)
from tests.support.kafka import (
    REQUEST_TIMEOUT_S,
    admin,
    committed_offsets,
    end_offsets,
    produce_records,
    wait_for,
)

PARTITIONS = 6
RECORDS = 30_000
#: Per-record sleep while workers join and leave: the load outlasts every join and leave by far,
#: and the CPU stays free for the broker and the other worker on a small machine. Once the last
#: worker joined, the test lifts it and the workers finish at full speed.
SLEEP_US = 1_000
#: Fast heartbeats: a member learns of a rebalance within half a second, not three.
CLIENT = {"heartbeat.interval.ms": 500, "session.timeout.ms": 6000}
SAMPLE_EVERY_S = 0.05


class CommittedSampler:
    """Samples a group's committed offsets every ``SAMPLE_EVERY_S`` in a thread.

    Works like ``tests.support.kafka.committed_offsets`` but keeps one admin client, so a sample
    costs a millisecond instead of a client's start-up.
    """

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self._admin = admin(bootstrap)
        self._request = [
            ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(partitions)])
        ]
        self._group = group
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="committed-sampler", daemon=True)

    def sample(self) -> dict[int, int]:
        futures = self._admin.list_consumer_group_offsets(self._request, request_timeout=REQUEST_TIMEOUT_S)
        result = futures[self._group].result(timeout=REQUEST_TIMEOUT_S)
        return {tp.partition: tp.offset for tp in result.topic_partitions or [] if tp.offset >= 0}

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.samples.append((time.monotonic(), self.sample()))
                self._stop.wait(SAMPLE_EVERY_S)
        except BaseException as exc:  # noqa: BLE001 - reported by stop() in the test's thread
            self.error = exc

    def __enter__(self) -> CommittedSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S * 2)

    def backwards(self) -> list[str]:
        """Every time a partition's committed offset was seen lower than in an earlier sample."""
        highest: dict[int, tuple[float, int]] = {}
        moves = []
        start = self.samples[0][0] if self.samples else 0.0
        for at, offsets in self.samples:
            for partition, offset in offsets.items():
                seen_at, seen = highest.get(partition, (at, -1))
                if offset < seen:
                    moves.append(
                        f"partition {partition}: {seen} at {seen_at - start:.2f}s, then {offset} at "
                        f"{at - start:.2f}s"
                    )
                else:
                    highest[partition] = (at, offset)
        return moves


def handled_ids(workers: list[Worker]) -> dict[int, int]:
    """How many times each record id was handled, over ``workers``."""
    return id_counts(*(read_effects(worker.effects) for worker in workers))


def describe(workers: list[Worker]) -> str:
    return "\n".join(worker.describe() for worker in workers)


def group_state(bootstrap: str, group: str) -> ConsumerGroupState:
    """The group's state as the coordinator reports it."""
    client = admin(bootstrap)  # keep a reference: futures fail once the client is destroyed
    future = client.describe_consumer_groups([group], request_timeout=REQUEST_TIMEOUT_S)[group]
    return future.result(timeout=REQUEST_TIMEOUT_S).state


@pytest.fixture
def pool(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kafka_bootstrap: str,
    group_id: str,
    topic_factory: TopicFactory,
) -> Iterator[WorkerPool]:
    """Workers on a fresh 6-partition topic in ``group_id``; any still running at teardown are killed.

    Under the test's ``group_protocol`` when it asks for one, else the classic protocol.
    """
    protocol = (
        request.getfixturevalue("group_protocol") if "group_protocol" in request.fixturenames else "classic"
    )
    with WorkerPool(tmp_path, kafka_bootstrap, group_id, topic_factory(PARTITIONS), protocol) as workers:
        yield workers


def test_workers_joining_and_leaving_under_load(
    group_protocol: str, pool: WorkerPool, kafka_bootstrap: str, group_id: str
) -> None:
    """A starts, B joins, A leaves (SIGTERM), A comes back: every record handled exactly once (under
    the classic protocol and KIP-848's consumer protocol)."""
    topic = pool.topic
    produce_records(kafka_bootstrap, topic, RECORDS)
    ends = end_offsets(kafka_bootstrap, topic)
    slow = pool.directory / "slow"
    slow.touch()
    settings = {
        "every_records": 500,
        "every_seconds": 1.0,
        "poll_batch_size": 100,
        "client": CLIENT,
        "sleep_us": SLEEP_US,
        "slow_while": slow,
    }
    workers = pool.workers

    def handled_all() -> bool:
        return len(handled_ids(workers)) >= RECORDS

    def state() -> str:
        return describe(workers)

    with CommittedSampler(kafka_bootstrap, group_id, topic, PARTITIONS) as sampler:
        a1 = pool.start("a1", **settings)
        a1.wait_handled(500)

        b1 = pool.start("b1", **settings)
        b1.wait_handled(300)
        a1.wait_handled(a1.handled() + 300)  # both handle records at once: the partitions are split

        a1.send(signal.SIGTERM)
        assert a1.wait(STOP_TIMEOUT_S) == 0, a1.describe()
        b1.wait_handled(b1.handled() + 500)  # B alone

        a2 = pool.start("a2", **settings)
        a2.wait_handled(300)
        assert not handled_all(), "the records ran out before A came back: the test proves less than it says"
        slow.unlink()  # everyone joined and left: finish at full speed

        wait_for(handled_all, 60, interval=0.1, message=lambda: f"not every record handled; {state()}")
        a2.send(signal.SIGTERM)
        assert a2.wait(STOP_TIMEOUT_S) == 0, a2.describe()
        # Stop B only once it has rejoined after A left: a worker stopped while it rejoins
        # exits 0 without its final commit (see test_sigterm_during_a_rebalance_commits_what_it_handled).
        wait_for(
            lambda: group_state(kafka_bootstrap, group_id) == ConsumerGroupState.STABLE,
            START_TIMEOUT_S,
            message=lambda: (
                f"the group did not settle after A left: {group_state(kafka_bootstrap, group_id)}"
            ),
        )
        b1.send(signal.SIGTERM)
        assert b1.wait(STOP_TIMEOUT_S) == 0, b1.describe()
        final = sampler.sample()
    if sampler.error is not None:
        raise sampler.error

    counts = handled_ids(workers)
    assert set(counts) == set(range(RECORDS)), f"lost {sorted(set(range(RECORDS)) - set(counts))[:10]}"
    twice = duplicates(counts)
    assert not twice, (
        f"{len(twice)} records handled twice after clean handovers, e.g. {sorted(twice)[:10]}; {state()}"
    )
    assert final == ends, f"committed {final}, end offsets {ends}"
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends
    assert len(sampler.samples) > 20, f"only {len(sampler.samples)} samples of the committed offsets"
    backwards = sampler.backwards()
    assert not backwards, f"committed offsets moved backwards: {backwards[:10]}"


def test_sigterm_during_a_rebalance_commits_what_it_handled(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str
) -> None:
    """A worker stopped by SIGTERM while its group rebalances exits 0 only with all it handled committed.

    Rolling deploys do exactly this: a new worker joins, an old one is told to stop. A member
    that does not answer (frozen here with SIGSTOP) holds the rebalance open for a session
    timeout, so the stopping worker's final commit lands inside the rebalance every time.
    Classic protocol only: KIP-848's consumer protocol has no join barrier for a frozen member
    to hold open (the broker moves partitions one member at a time).
    """
    topic = pool.topic
    produce_records(kafka_bootstrap, topic, 20_000)
    # No periodic commits: w1 commits only on revoke and at its stop. A commit sent while w1's
    # JoinGroup waits for the frozen member queues behind it on the coordinator's connection, and
    # w1's loop, blocked in that commit, would deliver the "Joining group" log line the test waits
    # for only once the rebalance is over (seen in CI: the line appeared 9 s late, group STABLE).
    settings = {
        "every_records": 0,
        "every_seconds": 0,
        "poll_batch_size": 100,
        "client": CLIENT,
        "sleep_us": SLEEP_US,
    }

    # w1 logs librdkafka's group protocol lines, so the test can tell when it has sent its JoinGroup.
    debug = {"client": {**CLIENT, "debug": "cgrp"}, "env": {"STREAMER_LOG_LEVEL": "DEBUG"}}
    w1 = pool.start("w1", **{**settings, **debug})
    w1.wait_handled(300)
    # w2's session is longer than the others': frozen, it holds the coming rebalance open for up
    # to 10 s, long enough for w3 to start and w1 to rejoin on a loaded machine (with 6 s the
    # group had sometimes evicted w2 and settled before w1 rejoined), and short enough for w1's
    # final commit to wait it out within STOP_TIMEOUT_S.
    w2 = pool.start("w2", **{**settings, "client": {**CLIENT, "session.timeout.ms": 10_000}})
    w2.wait_handled(100)
    w1.wait_handled(w1.handled() + 100)  # both own partitions now
    w2.send(signal.SIGSTOP)  # a member that stops answering, as a hung or preempted process does
    joins = w1.log.read_text().count("Joining group")
    pool.start("w3", **settings)  # joins: the group rebalances, and waits for w2 until its session ends
    # w1 learns of the rebalance at its next heartbeat and rejoins; its JoinGroup then waits for w2.
    wait_for(
        lambda: w1.log.read_text().count("Joining group") > joins,
        START_TIMEOUT_S,
        interval=0.02,
        message=lambda: f"w1 did not rejoin; group {group_state(kafka_bootstrap, group_id)}",
    )
    assert group_state(kafka_bootstrap, group_id) == ConsumerGroupState.PREPARING_REBALANCING
    w1.send(signal.SIGTERM)
    code = w1.wait(STOP_TIMEOUT_S)
    committed = committed_offsets(kafka_bootstrap, group_id, topic)

    handled: dict[int, int] = {}
    for effect in read_effects(w1.effects):
        handled[effect.partition] = max(handled.get(effect.partition, -1), effect.offset)
    uncommitted = {
        p: (committed.get(p), last + 1) for p, last in handled.items() if committed.get(p, 0) < last + 1
    }
    assert code in (EXIT_OK, EXIT_FAILED), f"w1 exited {code} after SIGTERM\n{w1.describe()}"
    if code == EXIT_OK:
        assert not uncommitted, (
            "w1 exited 0 after SIGTERM, but records it handled are not committed (partition: "
            f"(committed, one past its last handled)): {uncommitted}; the next owner handles them "
            f"again\n{w1.describe()}"
        )


def test_a_rolling_migration_from_the_classic_to_the_consumer_protocol_repeats_nothing(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str
) -> None:
    """Two classic workers (range assignment) are replaced one at a time by workers of KIP-848's
    consumer protocol (the broker turns the group into a consumer group when the first joins, with
    a classic member left in it): every record handled exactly once, committed offsets never
    backwards, all committed at the end."""
    topic = pool.topic
    produce_records(kafka_bootstrap, topic, RECORDS)
    ends = end_offsets(kafka_bootstrap, topic)
    slow = pool.directory / "slow"
    slow.touch()
    common = {"every_records": 500, "every_seconds": 1.0, "poll_batch_size": 100, "sleep_us": SLEEP_US}
    # Kafka refuses to upgrade a live cooperative-sticky group ("userData from a custom assignor
    # would be lost"): see test_a_consumer_protocol_worker_the_broker_refuses_exits_with_the_reason.
    classic = {
        **common,
        "client": CLIENT,
        "slow_while": slow,
        "env": {"STREAMER_KAFKA__ASSIGNMENT_STRATEGY": "range"},
    }
    consumer = {**common, "slow_while": slow, "env": {"STREAMER_KAFKA__GROUP_PROTOCOL": "consumer"}}
    workers = pool.workers

    def handled_all() -> bool:
        return len(handled_ids(workers)) >= RECORDS

    def state() -> str:
        return describe(workers)

    with CommittedSampler(kafka_bootstrap, group_id, topic, PARTITIONS) as sampler:
        a1 = pool.start("a1", **classic)
        b1 = pool.start("b1", **classic)
        b1.wait_handled(300)
        a1.wait_handled(300)
        for old, name in ((a1, "a2"), (b1, "b2")):
            old.send(signal.SIGTERM)
            assert old.wait(STOP_TIMEOUT_S) == 0, old.describe()
            new = pool.start(name, **consumer)
            new.wait_handled(300)
        assert not handled_all(), "the records ran out before the migration ended: the test proves less"
        slow.unlink()
        wait_for(handled_all, 60, interval=0.1, message=lambda: f"not every record handled; {state()}")
        a2, b2 = workers[2:]
        a2.send(signal.SIGTERM)
        assert a2.wait(STOP_TIMEOUT_S) == 0, a2.describe()
        # As in test_workers_joining_and_leaving_under_load: stop the last one once it has taken over.
        wait_for(
            lambda: group_state(kafka_bootstrap, group_id) == ConsumerGroupState.STABLE,
            START_TIMEOUT_S,
            message=lambda: f"the group did not settle: {group_state(kafka_bootstrap, group_id)}",
        )
        b2.send(signal.SIGTERM)
        assert b2.wait(STOP_TIMEOUT_S) == 0, b2.describe()
        final = sampler.sample()
    if sampler.error is not None:
        raise sampler.error

    counts = handled_ids(workers)
    assert set(counts) == set(range(RECORDS)), f"lost {sorted(set(range(RECORDS)) - set(counts))[:10]}"
    twice = duplicates(counts)
    assert not twice, f"{len(twice)} records handled twice across the migration, e.g. {sorted(twice)[:10]}"
    assert final == ends, f"committed {final}, end offsets {ends}"
    backwards = sampler.backwards()
    assert not backwards, f"committed offsets moved backwards: {backwards[:10]}"


def test_a_consumer_protocol_worker_the_broker_refuses_exits_with_the_reason(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str
) -> None:
    """A consumer-protocol worker joining a live cooperative-sticky classic group whose members
    have been through a rebalance (their subscriptions carry the assignor's userData, which Kafka
    will not drop to upgrade the group) gets a fatal error: it exits 1 saying so, instead of
    polling a dead consumer forever while its health checks pass. The classic workers go on."""
    produce_records(kafka_bootstrap, pool.topic, 5_000)
    c1 = pool.start("c1", client=CLIENT, sleep_us=SLEEP_US)
    c1.wait_handled(100)
    c2 = pool.start("c2", client=CLIENT, sleep_us=SLEEP_US)
    c2.wait_handled(100)  # the revoked partitions reached c2: both rejoined since the first join
    refused = pool.start("consumer", env={"STREAMER_KAFKA__GROUP_PROTOCOL": "consumer"})
    assert refused.wait(STOP_TIMEOUT_S) == EXIT_FAILED, refused.describe()
    assert refused.handled() == 0
    log = refused.log.read_text()
    assert "group id does not exist" in log, log[-3000:]
    for worker in (c1, c2):
        worker.wait_handled(worker.handled() + 100)


def test_a_static_member_restarted_after_a_sigkill_under_the_consumer_protocol(
    pool: WorkerPool, kafka_bootstrap: str, group_id: str
) -> None:
    """Under KIP-848 a static member (group.instance.id) SIGKILLed and started again at once finds
    its instance id still held by its dead predecessor until the broker's session timeout (6 s on
    the dev broker): the broker refuses the newcomer (UNRELEASED_INSTANCE_ID, fatal), where the
    classic protocol fenced the old member instead. A refused incarnation exits 1 saying why
    instead of idling on a dead consumer; the one started once the session expired takes the
    partitions back, and no record is lost."""
    records = 3_000
    produce_records(kafka_bootstrap, pool.topic, records)
    pool.group_protocol = "consumer"
    static = {
        "client": {"group.instance.id": f"{group_id}-static"},
        "sleep_us": SLEEP_US,
        "every_records": 100,
    }
    first = pool.start("first", **static)
    first.wait_handled(200)
    first.kill()
    killed_at = time.monotonic()
    workers = [first, pool.start("again-0", **static)]
    refused = 0
    while True:
        latest = workers[-1]
        wait_for(
            lambda w=latest: not w.running or w.handled() > 0,
            START_TIMEOUT_S,
            interval=0.05,
            message=latest.describe,
        )
        if latest.handled() > 0:
            break
        assert latest.proc.returncode == EXIT_FAILED, latest.describe()
        assert "instance" in latest.log.read_text().lower(), latest.describe()
        refused += 1
        assert time.monotonic() - killed_at < 30, "the broker kept refusing the instance id past its session"
        workers.append(pool.start(f"again-{refused}", **static))
    wait_for(
        lambda: len(handled_ids(workers)) >= records,
        60,
        interval=0.1,
        message=workers[-1].describe,
    )
    workers[-1].send(signal.SIGTERM)
    assert workers[-1].wait(STOP_TIMEOUT_S) == 0, workers[-1].describe()
    print(f"\n[static member, consumer protocol] {refused} restart(s) refused before one took over")

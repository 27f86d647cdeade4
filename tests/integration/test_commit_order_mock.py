"""Committed offsets never go backwards and nothing is lost while OffsetCommit fails and the
coordinator moves — a real ``streamer run`` worker against librdkafka's mock cluster.

The mock cluster (``tests.support.mockcluster``) runs in this test process on loopback ports; the
worker is a separate process connecting to its bootstrap string (started through
``run_streamer``, which only stands in for the DescribeConfigs the mock lacks). For the first
``INJECT_FOR_S`` seconds of the run the test follows a random schedule (its seed is printed; set
``STREAMER_TEST_SEED`` to replay its choices — where they land depends on timing) of

* bursts of 1-4 OffsetCommit errors: REQUEST_TIMED_OUT, NOT_COORDINATOR,
  COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE. Each fails one OffsetCommit request;
  librdkafka retries a failed request itself (twice, after a backoff), so a burst fails some
  commits back to the worker and delays others. A burst is pushed only once the one before it
  has been used up (counted with the mock's request tracking): the error stack never outgrows
  the commits the worker sends, whatever its commit rate;
* moves of the group coordinator to another broker (heartbeats to the old one fail with
  NOT_COORDINATOR and the worker's consumer looks the coordinator up again),

then lets the worker finish without faults. All along it samples the group's committed offsets
every ~50 ms through a plain consumer with the same group.id that never subscribes
(``Consumer.committed``: an OffsetFetch, never a group member).

What must hold (DESIGN.md, promises 1 and 2; the checkpoint object):

* in every partition the sampled committed offsets never decrease (an acknowledged-late retry of
  an older commit must not overwrite a newer one);
* after SIGTERM the worker exits 0 and the committed offset of every partition is its end;
* every produced id was handled at least once (nothing lost);
* a second worker on the group re-reads nothing.

The figures (seed, samples, commits seen, injections, backwards steps) are printed; run with
``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from tests.integration import workers
from tests.integration.workers import STOP_TIMEOUT_S, Worker, WorkerPool, read_effects
from tests.support import wait_for
from tests.support.kafka import produce_records
from tests.support.mockcluster import ApiKey, Err, MockCluster, streamer_on_mock_command

pytestmark = pytest.mark.integration

RECORDS = 20_000
PARTITIONS = 3
BROKERS = 3
EVERY_RECORDS = 100
#: The handler sleeps this long per record, so that the run lasts long enough (~8 s without
#: faults) for the schedule to hit many commits: 20k records at full speed take well under a second.
SLEEP_US = 300
SAMPLE_INTERVAL_S = 0.05
RUN_TIMEOUT_S = 180.0
COMMIT_ERRORS = (
    Err.REQUEST_TIMED_OUT,
    Err.NOT_COORDINATOR,
    Err.COORDINATOR_LOAD_IN_PROGRESS,
    Err.COORDINATOR_NOT_AVAILABLE,
)
#: Share of the schedule's steps that move the coordinator (the others push an error burst).
MOVE_SHARE = 0.25
MAX_BURST = 4
#: Seconds of the run under faults; then the worker finishes (and is stopped) without them.
INJECT_FOR_S = 20.0


@dataclass
class Sampler:
    """Reads the group's committed offsets every ``interval`` seconds on a thread of its own."""

    bootstrap: str
    group: str
    topic: str
    partitions: int
    interval: float = SAMPLE_INTERVAL_S
    samples: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _consumer: Consumer | None = None

    def __enter__(self) -> Sampler:
        # Never subscribes: no group membership, no rebalance; committed() is an OffsetFetch.
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "client.id": "commit-sampler",
            }
        )
        self._thread = threading.Thread(target=self._run, name="commit-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            assert not self._thread.is_alive(), "the sampler thread did not stop"
            self._thread = None

    def sample(self) -> tuple[int, ...] | None:
        """One reading: the committed offset per partition (-1: none yet); None if it failed."""
        assert self._consumer is not None
        request = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        try:
            result = self._consumer.committed(request, timeout=5.0)
        except KafkaException as exc:
            self.errors.append(str(exc))
            return None
        if any(tp.error is not None for tp in result):
            self.errors.append(str([tp.error for tp in result if tp.error is not None]))
            return None
        by_partition = {tp.partition: tp.offset if tp.offset >= 0 else -1 for tp in result}
        offsets = tuple(by_partition[p] for p in range(self.partitions))
        self.samples.append((time.monotonic(), offsets))
        return offsets

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)  # the sampling period, not a wait for a condition


@dataclass(frozen=True)
class Backwards:
    """A committed offset lower than the one sampled before it."""

    partition: int
    before: int
    after: int
    at_s: float

    @property
    def step(self) -> int:
        """By how many offsets it went back."""
        return self.before - self.after


def backwards_steps(samples: list[tuple[float, tuple[int, ...]]]) -> list[Backwards]:
    """Every decrease of a partition's committed offset between consecutive samples."""
    found = []
    start = samples[0][0] if samples else 0.0
    for (_, before), (at, after) in pairwise(samples):
        for partition, (old, new) in enumerate(zip(before, after, strict=True)):
            if new < old:
                found.append(Backwards(partition, old, new, at - start))
    return found


def commits_seen(samples: list[tuple[float, tuple[int, ...]]]) -> int:
    """Partition offsets that changed between consecutive samples (a lower bound on commits)."""
    return sum(
        old != new
        for (_, before), (_, after) in pairwise(samples)
        for old, new in zip(before, after, strict=True)
    )


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    """A fresh 3-broker mock cluster in this process."""
    with MockCluster(brokers=BROKERS) as mock:
        mock.set_group_initial_rebalance_delay(100)  # a new group's first join: 3 s by default
        yield mock


@pytest.fixture
def mock_pool(
    cluster: MockCluster, group_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WorkerPool]:
    """Recording workers on the mock cluster, started through ``run_streamer`` (see its docstring)."""
    monkeypatch.setattr(workers, "streamer_command", streamer_on_mock_command)
    topic = cluster.create_topic(f"t-{group_id}", PARTITIONS)
    with WorkerPool(tmp_path, cluster.bootstrap, group_id, topic) as pool:
        yield pool


def _start(pool: WorkerPool, name: str, *, until_end: bool = False) -> Worker:
    return pool.start(
        name,
        until_end=until_end,
        every_records=EVERY_RECORDS,
        every_seconds=0,
        sleep_us=SLEEP_US,
        env={"STREAMER_DEDUP__ENABLED": "false", "STREAMER_DEAD_LETTER__ENABLED": "false"},
    )


@dataclass
class Schedule:
    """The random fault schedule: its choices follow from the seed, their timing from the run."""

    cluster: MockCluster
    group: str
    rng: random.Random
    coordinator: int
    pushed: dict[str, int] = field(default_factory=dict)
    bursts: int = 0
    moves: int = 0
    #: OffsetCommit requests the cluster must have received before the last burst is used up.
    _used_up_at: int = 0

    def used_up(self) -> bool:
        """Whether every error pushed so far has failed a request (the stack is empty)."""
        return self.cluster.request_count(ApiKey.OFFSET_COMMIT) >= self._used_up_at

    def next_step(self) -> tuple[float, list[Err] | int]:
        """The next step and the pause before it: an error burst, or a broker to move to."""
        gap = self.rng.uniform(0.02, 0.15)
        if self.rng.random() < MOVE_SHARE:
            return gap, self.rng.choice([b for b in self.cluster.broker_ids if b != self.coordinator])
        return gap, [self.rng.choice(COMMIT_ERRORS) for _ in range(self.rng.randint(1, MAX_BURST))]

    def apply(self, step: list[Err] | int) -> None:
        """Push the burst (call when ``used_up``) or move the coordinator."""
        if isinstance(step, int):
            self.coordinator = step
            self.cluster.set_coordinator(self.group, step)
            self.moves += 1
            return
        self._used_up_at = self.cluster.request_count(ApiKey.OFFSET_COMMIT) + len(step)
        self.cluster.push_request_errors(ApiKey.OFFSET_COMMIT, step)
        self.bursts += 1
        for err in step:
            self.pushed[err.name] = self.pushed.get(err.name, 0) + 1


def _worker_summary(log: str) -> dict[str, object]:
    """The fields of the worker's "worker stopped" log line (processed, commits, ...)."""
    for line in reversed(log.splitlines()):
        if '"worker stopped"' in line:
            event = json.loads(line)
            return {k: v for k, v in event.items() if k not in {"group", "worker_id", "logger", "timestamp"}}
    return {}


def test_committed_offsets_never_go_backwards_under_commit_faults(
    cluster: MockCluster, mock_pool: WorkerPool
) -> None:
    seed = int(os.environ.get("STREAMER_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    print(f"\ncommit-order mock test: seed {seed} (replay with STREAMER_TEST_SEED={seed})")
    group, topic = mock_pool.group, mock_pool.topic
    ends = produce_records(cluster.bootstrap, topic, RECORDS, partitions=PARTITIONS)
    schedule = Schedule(cluster, group, rng, coordinator=rng.choice(cluster.broker_ids))
    cluster.set_coordinator(group, schedule.coordinator)
    cluster.start_request_tracking()

    with Sampler(cluster.bootstrap, group, topic, PARTITIONS) as sampler:
        worker = _start(mock_pool, "faults")
        worker.wait_handled(1)
        started = time.monotonic()

        def progress() -> bool:
            assert worker.running, worker.describe()
            assert time.monotonic() - started < RUN_TIMEOUT_S, f"run too slow: {worker.describe()}"
            return worker.handled() >= RECORDS

        # The schedule, for the first INJECT_FOR_S seconds: a step every 20-150 ms. A burst waits
        # until the one before it failed its requests, so that the stack never outgrows the
        # commits the worker sends. These sleeps pace the schedule; they wait for no condition.
        while not progress() and time.monotonic() - started < INJECT_FOR_S:
            gap, step = schedule.next_step()
            time.sleep(gap)
            while not isinstance(step, int) and not schedule.used_up() and not progress():
                time.sleep(0.01)
            schedule.apply(step)
        injected_s = time.monotonic() - started
        unused = not schedule.used_up()
        # Faults off; let the worker finish, then stop it: its synchronous commit must land.
        cluster.clear_request_errors(ApiKey.OFFSET_COMMIT)
        wait_for(progress, RUN_TIMEOUT_S, message=lambda: f"handling every record: {worker.describe()}")
        run_s = time.monotonic() - started
        worker.send(signal.SIGTERM)
        exit_code = worker.wait(STOP_TIMEOUT_S)
        sampler.stop()
        last = wait_for(sampler.sample, 10.0, message=lambda: f"final committed offsets: {sampler.errors}")
        assert last is not None
        final = dict(enumerate(last))
        samples = list(sampler.samples)
        sample_errors = list(sampler.errors)
    offset_commits = cluster.request_count(ApiKey.OFFSET_COMMIT)
    cluster.stop_request_tracking()

    log = worker.log.read_text(errors="replace")
    steps = backwards_steps(samples)
    max_step = max((b.step for b in steps), default=0)
    effects = read_effects(worker.effects)
    print(
        f"  run {run_s:.1f} s (faults for the first {injected_s:.1f} s), {len(effects)} records handled, "
        f"worker exit {exit_code}\n"
        f"  injections: {schedule.bursts} bursts of {sum(schedule.pushed.values())} OffsetCommit errors "
        f"{schedule.pushed}{' (the last not used up)' if unused else ''}, "
        f"{schedule.moves} coordinator moves\n"
        f"  OffsetCommit requests received: {offset_commits}; "
        f"commit failures the worker logged: {log.count('commit failed')}\n"
        f"  worker: {_worker_summary(log)}\n"
        f"  samples {len(samples)} (failed {len(sample_errors)}), "
        f"partition commits seen {commits_seen(samples)}\n"
        f"  backwards steps {len(steps)}, max backwards step {max_step}"
        + "".join(
            f"\n    partition {b.partition}: {b.before} -> {b.after} at {b.at_s:.2f} s" for b in steps[:10]
        )
        + f"\n  final committed {final}, ends {ends}"
    )

    assert exit_code == 0, worker.describe()
    assert not steps, (
        f"seed {seed}: committed offsets went backwards {len(steps)} times (max step {max_step}): {steps[:5]}"
    )
    assert final == ends, f"seed {seed}: final committed {final} != ends {ends}"
    missing = set(range(RECORDS)) - {e.id for e in effects}
    assert not missing, f"seed {seed}: {len(missing)} ids never handled, e.g. {sorted(missing)[:10]}"

    second = _start(mock_pool, "second", until_end=True)
    assert second.wait(RUN_TIMEOUT_S) == 0, second.describe()
    reread = read_effects(second.effects)
    assert not reread, f"seed {seed}: a second worker re-read {len(reread)} records after a clean stop"

"""What every chaos scenario shares: the settings whose bounds the promises name, and ``Run``, which
starts the load and the observers, and at the end drains, stops and gathers the history.

The bounds, from the delivery contract (``/work/shared/DESIGN.md``, README "What streamer
guarantees"):

- ``REREAD_BOUND``: after a SIGKILL the next owner re-reads at most ``every_records`` per partition
  since the last acknowledged commit plus what was in flight, and in flight is at most two poll
  batches (the one being handled and the one fetched behind it).
- ``DEDUP_WINDOW``: with dedup on, the effects repeated after a SIGKILL are those whose chain ran
  and whose done mark had not reached Redis: with the default ``mark_mode = "pipelined"`` the
  marks go out every ``mark_every`` (8) records without waiting, so at most the 7 finished since
  the last send and the record in hand; the issue's goal is 10.
- With concurrent dispatch (``[processing] concurrency`` > 1, ``CONCURRENT``) records finish out of
  order and the offsets finished above the committed one travel in the commit metadata; the
  re-read bound grows by the records in flight: ``REREAD_BOUND + CONCURRENCY`` per partition.
  The dedup window stays ``DEDUP_WINDOW``.

``Dispatch`` is how a scenario's workers dispatch: ``SERIAL`` (the default engine) or
``CONCURRENT`` (64 in flight, ordering by key, an ``async def`` handler, keyed records); the
storm and the rolling bounce run with both, and with serial dispatch under KIP-848's consumer
group protocol too (``DISPATCH_PROTOCOLS``); the other membership scenarios run under both
protocols.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.chaos.harness import (
    DRAIN_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Cluster,
    CommittedSampler,
    LiveProducer,
    Stalled,
    WorkerSettings,
    end_offsets,
    produce_backlog,
    read_parked,
)
from tests.chaos.history import History, Promise, Result, Sample, check

__all__ = [
    "CLIENT",
    "CONCURRENCY",
    "CONCURRENT",
    "DEDUP_WINDOW",
    "DISPATCHES",
    "DISPATCH_PROTOCOLS",
    "EVERY_RECORDS",
    "PARTITIONS",
    "POLL_BATCH_SIZE",
    "REREAD_BOUND",
    "SERIAL",
    "SLEEP_US",
    "Dispatch",
    "Run",
    "Scenario",
    "record_key",
]

PARTITIONS = 6
#: Commit every this many records (and every second, for the idle tail of a run).
EVERY_RECORDS = 200
POLL_BATCH_SIZE = 50
#: Records one SIGKILL may make the next owner re-run, per partition the victim owned.
REREAD_BOUND = EVERY_RECORDS + 2 * POLL_BATCH_SIZE
#: Effects one SIGKILL may repeat with dedup on (pipelined marks: at most mark_every + the record
#: in hand; the goal of issue 13).
DEDUP_WINDOW = 10
#: A killed or frozen member leaves the group after 6 s; heartbeats tell of a rebalance within 0.5 s.
CLIENT = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
#: Per-record sleep while the chaos lasts (at most ~500 records/s per worker): records are always
#: in flight when the nemesis strikes, and the CPU stays free for the broker and the other workers.
SLEEP_US = 2000
#: Seconds without any commit, before the end, after which a run counts as stalled.
STALL_TIMEOUT_S = 30.0
#: Records produced per second while the chaos lasts: more than slowed workers handle, so the load
#: never runs out however long the chaos takes on a busy machine.
LIVE_RATE = 1500.0
#: Concurrent dispatch: records in flight per worker.
CONCURRENCY = 64
#: Concurrent dispatch: the per-record work while the chaos lasts, 0.5-1.5 x this (drawn from the
#: id: records in flight finish in another order than they started). Some 50 of the 64 slots are
#: busy (the rest wait for a key already running), so a worker handles about as many records per
#: second as a serial one with ``SLEEP_US``: the backlog never runs out, and dozens of records are
#: in flight whenever the nemesis strikes.
CONCURRENT_SLEEP_US = 150_000
#: Keyed records: keys per partition, drawn from the id. A worker's ~110 records in flight or
#: waiting (often of one partition: a fetch returns one partition's records) hold some keys twice
#: or more, so records of one key queue behind each other, and ~75 distinct keys keep the 64
#: slots busy.
KEYS_PER_PARTITION = 128


def record_key(record: int) -> bytes:
    """The Kafka key of id ``record``: one of ``KEYS_PER_PARTITION`` keys of its partition, drawn
    from a hash of the id (not a multiplicative one: those cycle through the keys in turn, and a
    key would never meet itself among the records in flight)."""
    digest = hashlib.blake2b(b"%d" % record, digest_size=4).digest()
    return b"p%d-k%d" % (record % PARTITIONS, int.from_bytes(digest, "big") % KEYS_PER_PARTITION)


@dataclass(frozen=True)
class Dispatch:
    """How a scenario's workers dispatch records; ``pytest.mark.parametrize`` ids are the names."""

    name: str
    concurrency: int = 1
    ordering: str | None = None
    async_handler: bool = False
    sleep_us: int = SLEEP_US
    sleep_jitter: bool = False
    #: produce records with ``record_key`` keys (else keyless)
    keyed: bool = False

    def __str__(self) -> str:
        return self.name

    def settings(self, settings: WorkerSettings) -> WorkerSettings:
        """``settings`` with this dispatch (and its per-record sleep while the chaos lasts)."""
        return dataclasses.replace(
            settings,
            concurrency=self.concurrency,
            ordering=self.ordering,
            async_handler=self.async_handler,
            sleep_us=self.sleep_us,
            sleep_jitter=self.sleep_jitter,
        )

    @property
    def keys(self) -> Callable[[int], bytes] | None:
        """The key function of the produced records."""
        return record_key if self.keyed else None

    @property
    def reread_bound(self) -> int:
        """Re-runs one SIGKILL may cause per partition: ``REREAD_BOUND``, plus what is in flight."""
        return REREAD_BOUND + (self.concurrency if self.concurrency > 1 else 0)

    def promise(self, **fields: Any) -> Promise:
        """The scenario's promise, checking the key order under ``ordering = "key"``."""
        return Promise(key_order=self.ordering == "key", **fields)


SERIAL = Dispatch("serial")
CONCURRENT = Dispatch(
    "concurrent-key",
    concurrency=CONCURRENCY,
    ordering="key",
    async_handler=True,
    sleep_us=CONCURRENT_SLEEP_US,
    sleep_jitter=True,
    keyed=True,
)
DISPATCHES = [SERIAL, CONCURRENT]
#: Dispatch x ``[kafka] group_protocol`` for the scenarios that move partitions between members:
#: both dispatches under the classic protocol, serial dispatch under KIP-848's consumer protocol
#: as well (the protocol changes how partitions move between members, not how a worker runs
#: records; and the suite's time budget). Scenarios without a dispatch ask for the
#: ``group_protocol`` fixture and run under both.
DISPATCH_PROTOCOLS = [
    pytest.param(SERIAL, "classic", id="serial-classic"),
    pytest.param(CONCURRENT, "classic", id="concurrent-key-classic"),
    pytest.param(SERIAL, "consumer", id="serial-consumer"),
]


@dataclass
class Scenario:
    """A scenario's name and random seed, and the figures it reports to the summary table."""

    name: str
    seed: int
    rng: random.Random = field(init=False)
    result: Result | None = None
    notes: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def verify(self, result: Result, extra: list[str], context: str) -> None:
        """Record the figures; fail with the seed, the figures, the ids involved and ``context``."""
        self.result = result
        self.violations = [*result.violations, *extra]
        if self.violations:
            message = result.describe(self.seed)
            message += "".join(f"\n  - {v}" for v in extra)
            if self.notes:
                message += "\n  " + ", ".join(f"{k}: {v}" for k, v in self.notes.items())
            pytest.fail(f"{message}\n{context}", pytrace=False)


@dataclass
class Finished:
    """What ``Run.finish`` gathered."""

    history: History
    #: exit code of every incarnation the end stopped (None: it outlived the grace period)
    exit_codes: dict[str, int | None]
    #: incarnations that exited before the scenario stopped them (a crash, a crash loop)
    died: list[str]
    #: why the group did not commit up to the end offsets, if it did not
    stalled: str | None


class Run:
    """The load, the workers and the observers of one scenario.

    Produces a backlog (ids ``0..backlog-1``) before the workers start and, with ``rate``, more
    records while the chaos lasts; samples the committed offsets throughout; slows the workers
    (``SLEEP_US`` per record) until ``finish`` lifts it.
    """

    def __init__(
        self,
        scenario: Scenario,
        directory: Path,
        settings: WorkerSettings,
        partitions: int,
        *,
        backlog: int,
        rate: float = 0.0,
        values: dict[int, bytes] | None = None,
        slow: bool = True,
        keys: Callable[[int], bytes] | None = None,
    ) -> None:
        self.scenario = scenario
        self.keys = keys
        self.bootstrap = settings.bootstrap
        self.topic = settings.topic
        self.partitions = partitions
        self.slow = directory / "slow"
        if slow:
            self.slow.touch()
            settings = dataclasses.replace(settings, slow_while=self.slow)
        self.acked = produce_backlog(
            self.bootstrap, self.topic, partitions, range(backlog), values=values, keys=keys
        )
        self.next_id = backlog
        self.cluster = Cluster(directory, settings)
        self.sampler = CommittedSampler(self.bootstrap, settings.group, self.topic, partitions)
        self.producer = (
            LiveProducer(self.bootstrap, self.topic, partitions, rate=rate, start_id=backlog, keys=keys)
            if rate
            else None
        )
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Run:
        self._stack.enter_context(self.sampler)
        self._stack.callback(self.cluster.close)
        if self.producer is not None:
            self._stack.enter_context(self.producer)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def produce(self, count: int, values: dict[int, bytes] | None = None) -> range:
        """Produce ``count`` more records now (ids after the backlog's); every one is acknowledged."""
        assert self.producer is None, "ids of produce() would collide with the live producer's"
        ids = range(self.next_id, self.next_id + count)
        self.acked |= produce_backlog(
            self.bootstrap, self.topic, self.partitions, ids, values=values, keys=self.keys
        )
        self.next_id += count
        return ids

    def finish(self, *, stop_workers: bool = True, timeout: float = DRAIN_TIMEOUT_S) -> Finished:
        """End the chaos: stop producing, lift the slowness, wait until everything is committed,
        SIGTERM the workers (unless they already exited, as bounded jobs do) and gather the history."""
        acked, indeterminate = dict(self.acked), set()
        if self.producer is not None:
            self.producer.stop()
            acked |= self.producer.acked
            indeterminate = self.producer.indeterminate
        ends = end_offsets(self.bootstrap, self.topic, self.partitions)
        self.slow.unlink(missing_ok=True)
        stalled = None
        if stop_workers:
            try:
                self.sampler.wait_until(ends, timeout, STALL_TIMEOUT_S)
            except Stalled as exc:
                stalled = str(exc)
                self.scenario.notes["stalled"] = "yes"
        died = [f"{inc.name} exited {inc.proc.returncode}" for inc in self.cluster.died()]
        codes = self.cluster.stop_all() if stop_workers else {}
        self.sampler.stop()
        final = self.sampler.read()
        samples = list(self.sampler.samples)
        if final is not None:
            samples.append(Sample(samples[-1].at_ns + 1 if samples else 0, final))
        dlq = f"{self.topic}.dlq"
        history = History(
            acked=set(acked),
            positions=acked,
            effects=self.cluster.effects(),
            indeterminate=indeterminate,
            parked=read_parked(self.bootstrap, dlq, self.partitions),
            samples=samples,
            sample_errors=self.sampler.errors,
            kills=dict(self.cluster.kills),
            end_offsets=ends,
            final_committed=final,
        )
        return Finished(history, codes, died, stalled)


def run_checks(
    scenario: Scenario, run: Run, finished: Finished, promise: Promise, extra: list[str] | None = None
) -> Result:
    """Check the history against ``promise``, plus the exits: every stop exits 0, no worker dies by itself."""
    problems = [f"the group stalled: {finished.stalled}"] if finished.stalled else []
    problems += extra or []
    problems += [
        f"{name} exited {code} after SIGTERM (expected 0)"
        if code is not None
        else f"{name} did not exit within {STOP_TIMEOUT_S:g}s of SIGTERM"
        for name, code in finished.exit_codes.items()
        if code != 0
    ]
    problems += [f"{text} before the scenario stopped it" for text in finished.died]
    result = check(finished.history, promise)
    scenario.verify(result, problems, run.cluster.describe())
    return result


def start_slots(run: Run, slots: list[str]) -> None:
    """Start a worker in each slot and wait until each handled a record (it joined and owns partitions)."""
    for slot in slots:
        run.cluster.start(slot)
    for slot in slots:
        run.cluster.wait_handled(run.cluster.current[slot], 1)

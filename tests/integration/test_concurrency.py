"""Concurrent dispatch against the real broker: ordering, the offset map, crashes, stops, revokes.

``[processing] concurrency = N`` runs up to N records of a worker at once (``async def`` handlers
as tasks, ``def`` handlers on a thread pool); ``ordering`` says which of them must not overlap.
Records finish out of order: the committed offset is the finished prefix and the offsets
finished above it travel in the commit metadata (``map=``), so the next owner skips them.

Workers run the app of ``tests/support/concurrency_app.py``, as real processes (to be SIGKILLed,
SIGTERMed, or joined by a second one) or in this process in a thread (to read their stats); both
write an events file with one line per entry into the handler and one per exit, which the
checkers below read as the whole history of a run. Random delays come from a seed printed at the
start of each test; ``CONCURRENCY_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from streamer import App
from streamer.engine.loop import Worker as EngineWorker
from streamer.engine.offsetmap import decode
from streamer.engine.rebalance import parse_metadata
from streamer.settings import load_settings
from tests.conftest import TopicFactory
from tests.integration.test_engine_defects import FAST_GROUP, describe_group, stable_with
from tests.integration.workers import REPO, STOP_TIMEOUT_S, Worker, clean_env, streamer_command
from tests.support import wait_for
from tests.support.concurrency_app import Behaviour, Event, build_app, read_events
from tests.support.kafka import REQUEST_TIMEOUT_S, committed_offsets, end_offsets, produce_records

APP = "tests.support.concurrency_app:app"
#: Seconds a worker may take from start to its first handled record (imports, group join).
START_TIMEOUT_S = 30.0
#: Seconds a run over a few thousand records may take, start-up and group join included.
RUN_TIMEOUT_S = 60.0
#: poll_batch_size of the tests that need every partition to have records in flight. The loop
#: hands a batch over only while fewer than poll_batch_size records wait unstarted, and records
#: waiting behind a busy key count: with the default 500, the first partition fetched fills that
#: window and the others start nothing until it is nearly drained (test 7 shows it). A window as
#: large as the whole backlog lets every partition run.
WHOLE_BACKLOG = 10_000


# -- settings, processes, in-process runs -------------------------------------------------------------


def sections(
    bootstrap: str,
    group: str,
    *,
    concurrency: int,
    ordering: str,
    every_records: int = 1000,
    every_seconds: float = 5.0,
    client: Mapping[str, Any] | None = None,
    poll_batch_size: int = 500,
    **more: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Settings by section, for ``load_settings(**...)`` and (through ``env_of``) a process."""
    kafka = {"bootstrap_servers": bootstrap, "group_id": group, "poll_batch_size": poll_batch_size}
    return {
        "kafka": {**kafka, "client": dict(client or {})},
        "processing": {"concurrency": concurrency, "ordering": ordering},
        "commit": {"every_records": every_records, "every_seconds": every_seconds},
        # No HTTP endpoint (workers would race for its port); a record that fails for good
        # stops the worker instead of creating a dead-letter topic.
        "metrics": {"enabled": False},
        "dead_letter": {"enabled": False},
        **{name: dict(values) for name, values in more.items()},
    }


def env_of(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The ``STREAMER_*`` variables of ``settings`` (sections as ``sections`` returns them)."""
    env = {"STREAMER_LOG_LEVEL": "INFO", "STREAMER_LOG_FORMAT": "json"}
    for section, values in settings.items():
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            env[f"STREAMER_{section.upper()}__{key.upper()}"] = text
    return env


@dataclass
class Process(Worker):
    """A ``streamer run`` process of the concurrency app; ``effects`` is its events file."""

    def events(self) -> list[Event]:
        """Its events so far."""
        return read_events(self.effects)

    def handled(self) -> int:
        """Records handled so far (``E`` lines)."""
        try:
            data = self.effects.read_bytes()
        except FileNotFoundError:
            return 0
        return data.count(b"\nE ") + data.startswith(b"E ")

    def text(self) -> str:
        """Everything it wrote to stdout and stderr."""
        return self.log.read_text(errors="replace")

    def logged(self) -> list[dict[str, Any]]:
        """Its complete JSON log lines (plain ones, such as librdkafka's, are left out)."""
        events = []
        for line in self.text().split("\n")[:-1]:  # the last one may still be being written
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def named(self, event: str) -> list[dict[str, Any]]:
        """Its JSON log events called ``event``."""
        return [entry for entry in self.logged() if entry.get("event") == event]

    def errors(self) -> list[str]:
        """The first line of each error it logged."""
        return [
            str(e.get("event")).splitlines()[0]
            for e in self.logged()
            if e.get("level") in ("error", "critical")
        ]


class Processes:
    """Starts concurrency-app workers; kills the ones still running at exit."""

    def __init__(self, directory: Path, topic: str) -> None:
        self.directory = directory
        self.topic = topic
        self.started: list[Process] = []

    def start(
        self,
        name: str,
        settings: Mapping[str, Mapping[str, Any]],
        behaviour: Behaviour,
        *,
        until_end: bool = False,
    ) -> Process:
        """Start a worker; its log goes to ``<directory>/<name>.log``."""
        log = self.directory / f"{name}.log"
        assert not log.exists(), f"{log} exists: use a new worker name"
        args = ["run", APP, "--no-progress", *(["--until-end"] if until_end else [])]
        env = {**clean_env(), **env_of(settings), **behaviour.env(self.topic)}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                streamer_command(*args), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        worker = Process(name, proc, behaviour.events, log)
        self.started.append(worker)
        return worker

    def describe(self) -> str:
        """Every worker's state and log tail, for failure messages."""
        return "\n".join(worker.describe() for worker in self.started)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[[str], Processes]]:
    """``processes(topic)``: a Processes for that topic; every process killed at teardown."""
    made: list[Processes] = []

    def make(topic: str) -> Processes:
        made.append(Processes(tmp_path, topic))
        return made[-1]

    yield make
    for pool in made:
        for worker in pool.started:
            worker.kill()


class InProcess:
    """A bounded run (``until_end``) of ``app`` in a thread of this process."""

    def __init__(self, settings: Mapping[str, Mapping[str, Any]], app: App) -> None:
        cfg = load_settings(None, **settings)
        self.worker = EngineWorker(cfg, app.chains(cfg), until_end=True)
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="in-process-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome["code"] = self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self._outcome["error"] = exc

    def join(self, timeout: float = RUN_TIMEOUT_S) -> EngineWorker:
        """Wait for the run to end; fail unless it exits 0 within ``timeout``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            raise AssertionError(f"the in-process worker did not finish within {timeout:g}s")
        if "error" in self._outcome:
            raise AssertionError(
                f"the in-process worker raised {self._outcome['error']!r}"
            ) from self._outcome["error"]
        assert self._outcome["code"] == 0, f"the in-process worker exited {self._outcome['code']}"
        return self.worker

    def stop(self) -> None:
        """Stop the run if it still goes (a failed test), and wait for it."""
        if self._thread.is_alive():
            self.worker.request_stop("test teardown")
            self._thread.join(STOP_TIMEOUT_S + 10)


def run_in_process(settings: Mapping[str, Mapping[str, Any]], app: App) -> EngineWorker:
    """Run ``app`` in this process until the end offsets; fail unless it exits 0 in time."""
    return InProcess(settings, app).join()


@pytest.fixture
def in_process() -> Iterator[Callable[[Mapping[str, Mapping[str, Any]], App], InProcess]]:
    """``in_process(settings, app)``: start an InProcess run; any still going is stopped at teardown."""
    runs: list[InProcess] = []

    def start(settings: Mapping[str, Mapping[str, Any]], app: App) -> InProcess:
        runs.append(InProcess(settings, app))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The test's random seed (``CONCURRENCY_SEED``, else random), printed."""
    fixed = os.environ.get("CONCURRENCY_SEED")
    value = int(fixed) if fixed else random.SystemRandom().randrange(2**32)
    print(f"\nseed of {request.node.name}: {value} (rerun with CONCURRENCY_SEED={value})")
    return value


# -- what the broker holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Committed:
    """A partition's committed offset and what its metadata says."""

    offset: int
    fields: dict[str, str]
    #: The offsets above ``offset`` the map says finished.
    finished: frozenset[int]

    def covers(self, offset: int) -> bool:
        """Whether ``offset`` counts as finished by this commit (below it, or in its map)."""
        return offset < self.offset or offset in self.finished


def committed_maps(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, Committed]:
    """Each partition's commit (offset, metadata fields, decoded map); partitions without one left out.

    Asked with ``Consumer.committed`` (no subscription: it never joins the group).
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=REQUEST_TIMEOUT_S
        )
    finally:
        consumer.close()
    result = {}
    for tp in found:
        assert tp.error is None, f"committed offset of {topic}[{tp.partition}]: {tp.error}"
        if tp.offset >= 0:
            fields = parse_metadata(tp.metadata)
            result[tp.partition] = Committed(tp.offset, fields, decode(tp.offset, fields.get("map", "")))
    return result


# -- reading a history --------------------------------------------------------------------------------


def show(committed: Mapping[int, Committed]) -> list[tuple[int, int, int]]:
    """``(partition, committed offset, map size)`` of each commit, for the printed summaries."""
    return [(p, c.offset, len(c.finished)) for p, c in sorted(committed.items())]


def handled(events: Iterable[Event]) -> list[Event]:
    """The ``E`` events: records handled."""
    return [e for e in events if e.kind == "E"]


def key_order_violations(runs: Sequence[Sequence[Event]]) -> list[str]:
    """What breaks key order over consecutive runs (each one process's events, in order).

    In each run, per key: a record starts only when no record of the key runs, and only once
    the key's previous record has been handled (a failed attempt is followed by the next attempt
    of the same record), in offset order, each record handled once. Over all runs, the first
    handling of each key's records is in offset order (re-reads after a crash are allowed).
    """
    found: list[str] = []
    first: dict[str, list[int]] = {}
    seen: set[tuple[int, int]] = set()
    for number, events in enumerate(runs, 1):
        running: dict[str, int] = {}
        pending: dict[str, int] = {}  # started, not handled yet (running, or between attempts)
        last: dict[str, int] = {}
        for e in events:
            where = f"run {number}, key {e.key}, {e.partition}/{e.offset} attempt {e.attempt}"
            if e.kind == "S":
                if e.key in running:
                    found.append(f"{where}: started while offset {running[e.key]} of the key ran")
                if e.key in pending and pending[e.key] != e.offset:
                    found.append(f"{where}: started before offset {pending[e.key]} of the key was handled")
                elif e.key not in pending and e.offset <= last.get(e.key, -1):
                    found.append(f"{where}: started after offset {last[e.key]} of the key was handled")
                running[e.key] = pending[e.key] = e.offset
                continue
            if running.pop(e.key, None) != e.offset:
                found.append(f"{where}: {e.kind} without a start")
            if e.kind == "E":
                pending.pop(e.key, None)
                last[e.key] = e.offset
                if (e.partition, e.offset) not in seen:
                    seen.add((e.partition, e.offset))
                    first.setdefault(e.key, []).append(e.offset)
    for key, offsets in first.items():
        if offsets != sorted(offsets):
            found.append(f"key {key}: first handled in the order {offsets}")
    return found


def max_running(events: Iterable[Event], group: Callable[[Event], Any]) -> Counter[Any]:
    """The most records running at once in each group of ``group(event)`` (one process's events)."""
    now: Counter[Any] = Counter()
    most: Counter[Any] = Counter()
    for e in events:
        g = group(e)
        now[g] += 1 if e.kind == "S" else -1
        most[g] = max(most[g], now[g])
    return most


def per_partition(events: Iterable[Event]) -> dict[int, set[int]]:
    """The offsets in ``events`` by partition."""
    result: dict[int, set[int]] = {}
    for e in events:
        result.setdefault(e.partition, set()).add(e.offset)
    return result


def assert_exactly_the_rest(
    run: Sequence[Event], committed: Mapping[int, Committed], ends: Mapping[int, int]
) -> None:
    """A run after ``committed`` handled each offset it does not cover once, and nothing else."""
    counts = Counter((e.partition, e.offset) for e in handled(run))
    twice = {k: n for k, n in counts.items() if n > 1}
    assert not twice, f"the next run handled records more than once: {sorted(twice.items())[:10]}"
    for partition, end in ends.items():
        commit = committed.get(partition, Committed(0, {}, frozenset()))
        expected = {o for o in range(end) if not commit.covers(o)}
        got = {o for p, o in counts if p == partition}
        assert got == expected, (
            f"partition {partition} (committed {commit.offset}, map of {len(commit.finished)}): the next "
            f"run handled {len(got - expected)} offsets it covers, e.g. {sorted(got - expected)[:10]}, "
            f"and missed {len(expected - got)}, e.g. {sorted(expected - got)[:10]}"
        )


def assert_commit_covers_only_handled(
    committed: Mapping[int, Committed], run: Sequence[Event], *, exactly: Iterable[int] = ()
) -> None:
    """No loss: every offset a commit covers (below it, or in its map) was handled.

    For the partitions ``exactly`` names, it also covers every offset handled (a clean stop).
    """
    done = per_partition(handled(run))
    for partition, commit in committed.items():
        claimed = set(range(commit.offset)) | commit.finished
        unhandled = claimed - done.get(partition, set())
        assert not unhandled, (
            f"partition {partition}: the commit (offset {commit.offset}, map of {len(commit.finished)}) "
            f"covers {len(unhandled)} offsets never handled, e.g. {sorted(unhandled)[:10]}"
        )
    for partition in exactly:
        commit = committed.get(partition, Committed(0, {}, frozenset()))
        uncovered = {o for o in done.get(partition, set()) if not commit.covers(o)}
        assert not uncovered, (
            f"partition {partition}: {len(uncovered)} handled offsets are not covered by the commit "
            f"(offset {commit.offset}, map of {len(commit.finished)}), e.g. {sorted(uncovered)[:10]}"
        )


def rereads(first: Sequence[Event], second: Sequence[Event]) -> Counter[int]:
    """Records handled in both runs, by partition."""
    before = {(e.partition, e.offset) for e in handled(first)}
    return Counter(p for p, o in {(e.partition, e.offset) for e in handled(second)} if (p, o) in before)


def keyed_topic(topic_factory: TopicFactory, bootstrap: str, partitions: int, keys: int, total: int) -> str:
    """A fresh topic holding ``total`` records, ids ``0..total-1`` round-robin, keyed ``keyed(keys)``."""
    topic = topic_factory(partitions)
    produce_records(bootstrap, topic, total, key_fn=keyed(keys))
    return topic


def crash_settings(
    bootstrap: str, group: str, *, concurrency: int, every_records: int
) -> dict[str, dict[str, Any]]:
    """Ordering key, commits every ``every_records`` only, the whole backlog in flight, and a
    static member: the worker restarted after a SIGKILL takes the killed one's place at once."""
    return sections(
        bootstrap,
        group,
        concurrency=concurrency,
        ordering="key",
        every_records=every_records,
        every_seconds=0,
        client={"session.timeout.ms": 6000, "group.instance.id": f"{group}-w"},
        poll_batch_size=WHOLE_BACKLOG,
    )


def assert_recovered(
    run1: Sequence[Event],
    run2: Sequence[Event],
    committed: Mapping[int, Committed],
    ends: Mapping[int, int],
    bound: int,
) -> Counter[int]:
    """The history of a run killed with ``committed`` as its last commit, and its restart: each
    key's records in order, none lost, the commit covers only records handled, the restart
    handled exactly what it does not cover, re-reading at most ``bound`` per partition. Returns
    the re-reads per partition."""
    violations = key_order_violations([run1, run2])
    assert not violations, f"{len(violations)} key order violations, e.g. {violations[:10]}"
    total = sum(ends.values())
    lost = set(range(total)) - {e.id for e in handled([*run1, *run2])}
    assert not lost, f"{len(lost)} records never handled, e.g. {sorted(lost)[:10]}"
    assert_commit_covers_only_handled(committed, run1)
    assert_exactly_the_rest(run2, committed, ends)
    again = rereads(run1, run2)
    assert all(n <= bound for n in again.values()), f"re-read {dict(again)} per partition, bound {bound}"
    return again


def keyed(keys: int) -> Callable[[int], bytes]:
    """Record id -> key ``k<id mod keys>``: with ``keys`` a multiple of the partitions and the
    records produced round-robin, each key lives in one partition (partition = key mod partitions)."""
    return lambda record: f"k{record % keys}".encode()


# -- 1. key order across a SIGKILL -----------------------------------------------------------------------


def test_key_order_holds_with_500_in_flight_across_a_sigkill_and_restart(
    processes: Callable[[str], Processes],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    tmp_path: Path,
    seed: int,
) -> None:
    """Concurrency 500, ordering key, 300 keys over 3 partitions, an async handler awaiting
    50-250 ms: the worker is SIGKILLed mid-run and restarted. Over the whole history each key's
    records run one at a time, first handled in offset order, none lost; the restart handles
    exactly what the last commit (prefix + map) does not cover, so it re-reads at most
    every_records + concurrency per partition."""
    partitions, keys, total, concurrency, every = 3, 300, 6000, 500, 300
    topic = keyed_topic(topic_factory, kafka_bootstrap, partitions, keys, total)
    ends = end_offsets(kafka_bootstrap, topic)
    settings = crash_settings(kafka_bootstrap, group_id, concurrency=concurrency, every_records=every)
    pool = processes(topic)
    first = pool.start("run1", settings, Behaviour(tmp_path / "run1.events", (50, 250), seed))

    def committed_everywhere() -> bool:
        return len(committed_offsets(kafka_bootstrap, group_id, topic)) == partitions

    first.wait_handled(total * 2 // 5, RUN_TIMEOUT_S)
    wait_for(committed_everywhere, RUN_TIMEOUT_S, message=lambda: f"no commit yet: {first.describe()}")
    first.send(signal.SIGKILL)
    assert first.wait(STOP_TIMEOUT_S) == -signal.SIGKILL
    run1 = first.events()
    committed = committed_maps(kafka_bootstrap, group_id, topic, partitions)
    in_flight = len([e for e in run1 if e.kind == "S"]) - len([e for e in run1 if e.kind != "S"])

    later = Behaviour(tmp_path / "run2.events", (50, 250), seed)
    second = pool.start("run2", settings, later, until_end=True)
    assert second.wait(RUN_TIMEOUT_S) == 0, second.describe()
    run2 = second.events()

    print(
        f"[key order] run 1 handled {len(handled(run1))} of {total} with {in_flight} in flight when "
        f"killed; committed {show(committed)} (partition, offset, map size); run 2 handled "
        f"{len(handled(run2))}, re-read {dict(rereads(run1, run2))}"
    )
    assert len(handled(run1)) < total, "run 1 finished before it was killed: the test proves nothing"
    assert_recovered(run1, run2, committed, ends, bound=every + concurrency)
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends


# -- 2. a slow key and a SIGKILL: the map, not the prefix, says where to resume -------------------------


def test_after_a_sigkill_the_restart_skips_what_the_map_says_finished_behind_a_slow_key(
    processes: Callable[[str], Processes],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    tmp_path: Path,
    seed: int,
) -> None:
    """Concurrency 500, ordering key: key k0's first record (offset 0 of partition 0) stays in
    its handler while the other keys' records finish; the worker is SIGKILLed. The committed
    offset of partition 0 stays 0, its map holds what finished above it; the restarted worker
    (in this process, the key no longer slow) skips exactly those offsets (stats: skipped),
    handles the rest once, and re-reads at most every_records + in-flight per partition, not the
    hundreds finished above the slow record."""
    partitions, keys, total, concurrency, every = 3, 300, 4500, 500, 200
    topic = keyed_topic(topic_factory, kafka_bootstrap, partitions, keys, total)
    ends = end_offsets(kafka_bootstrap, topic)
    settings = crash_settings(kafka_bootstrap, group_id, concurrency=concurrency, every_records=every)
    hold = tmp_path / "hold"
    hold.touch()
    pool = processes(topic)
    slow = Behaviour(tmp_path / "run1.events", (100, 300), seed, hold_key="k0", hold_file=hold)
    first = pool.start("run1", settings, slow)

    def big_map_committed() -> bool:
        assert first.running, first.describe()
        if first.handled() < total // 3:
            return False
        commit = committed_maps(kafka_bootstrap, group_id, topic, partitions).get(0)
        return commit is not None and len(commit.finished) >= 300

    wait_for(
        big_map_committed, RUN_TIMEOUT_S, interval=0.1, message=lambda: f"no big map: {first.describe()}"
    )
    first.send(signal.SIGKILL)
    assert first.wait(STOP_TIMEOUT_S) == -signal.SIGKILL
    run1 = first.events()
    committed = committed_maps(kafka_bootstrap, group_id, topic, partitions)

    behind = [e for e in handled(run1) if e.partition == 0]  # all above the held offset 0
    assert not any(e.key == "k0" for e in handled(run1)), "the held key's record was handled"
    assert committed[0].offset == 0, f"partition 0 committed past its unfinished offset 0: {committed[0]}"

    later = Behaviour(tmp_path / "run2.events", (100, 300), seed)
    worker = run_in_process(settings, build_app(topic, later))
    run2 = read_events(later.events)
    again = rereads(run1, run2)
    skipped = worker.stats.topics[topic].skipped
    in_map = sum(len(c.finished) for c in committed.values())
    print(
        f"[slow key] run 1 handled {len(handled(run1))} of {total}, {len(behind)} of them above the held "
        f"record of partition 0; committed {show(committed)} (partition, offset, map size); "
        f"run 2 handled {len(handled(run2))}, skipped {skipped}, re-read {dict(again)}"
    )
    assert_recovered(run1, run2, committed, ends, bound=every + concurrency)
    assert skipped == in_map, f"run 2 skipped {skipped} records, the maps hold {in_map}"
    assert again[0] < len(behind) // 2, (
        f"partition 0: re-read {again[0]} of the {len(behind)} records finished above the slow one"
    )
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends


# -- 3. SIGTERM with records in flight ------------------------------------------------------------------


def test_a_sigterm_with_records_in_flight_exits_0_and_the_next_run_rereads_nothing(
    processes: Callable[[str], Processes],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    tmp_path: Path,
    seed: int,
) -> None:
    """Concurrency 200, ordering key, an async handler awaiting 30-70 ms: SIGTERM mid-run. The
    worker lets the records in flight finish and exits 0; its final commit (state=clean) covers
    exactly what it handled, the prefix plus a map of what finished above it; the next run (in
    this process) skips the map (stats: skipped), handles every other record, and re-reads none."""
    partitions, keys, total, concurrency = 3, 600, 8000, 200
    topic = keyed_topic(topic_factory, kafka_bootstrap, partitions, keys, total)
    ends = end_offsets(kafka_bootstrap, topic)
    settings = sections(
        kafka_bootstrap,
        group_id,
        concurrency=concurrency,
        ordering="key",
        client=FAST_GROUP,
        poll_batch_size=WHOLE_BACKLOG,
    )
    first = processes(topic).start("run1", settings, Behaviour(tmp_path / "run1.events", (30, 70), seed))
    first.wait_handled(1500, RUN_TIMEOUT_S)
    first.send(signal.SIGTERM)
    at_signal = first.events()  # read after the signal: what ran then ran when it arrived, or before
    code = first.wait(STOP_TIMEOUT_S)
    run1 = first.events()
    committed = committed_maps(kafka_bootstrap, group_id, topic, partitions)

    ended = {(e.partition, e.offset) for e in at_signal if e.kind != "S"}
    in_flight = {(e.partition, e.offset) for e in at_signal if e.kind == "S"} - ended
    unfinished = {(e.partition, e.offset) for e in run1 if e.kind == "S"} - {
        (e.partition, e.offset) for e in handled(run1)
    }
    print(
        f"[sigterm] {len(in_flight)} records in flight at SIGTERM; run 1 handled {len(handled(run1))} of "
        f"{total}, exit {code}; committed {show(committed)} "
        "(partition, offset, map size)"
    )
    assert code == 0, first.describe()
    assert in_flight, "nothing was in flight at SIGTERM: the test proves nothing"
    assert not unfinished, f"{len(unfinished)} records started and abandoned, e.g. {sorted(unfinished)[:10]}"
    assert len(handled(run1)) < total, "run 1 finished before the signal: the test proves nothing"
    states = {p: c.fields.get("state") for p, c in committed.items()}
    assert states, "nothing committed"
    assert set(states.values()) == {"clean"}, f"commit states {states}"
    assert_commit_covers_only_handled(committed, run1, exactly=range(partitions))
    assert any(c.finished for c in committed.values()), "no map committed: the test proves nothing"

    later = Behaviour(tmp_path / "run2.events")
    worker = run_in_process(settings, build_app(topic, later))
    run2 = read_events(later.events)
    again = rereads(run1, run2)
    skipped = worker.stats.topics[topic].skipped
    print(f"[sigterm] run 2 handled {len(handled(run2))}, skipped {skipped}, re-read {sum(again.values())}")
    assert not again, f"the run after a clean stop re-read {dict(again)} records per partition"
    assert_exactly_the_rest(run2, committed, ends)
    assert skipped == sum(len(c.finished) for c in committed.values())
    assert committed_offsets(kafka_bootstrap, group_id, topic) == ends
    errors = Counter(first.errors())
    assert not errors, f"the clean stop logged errors: {errors.most_common(5)}"


# -- 4. a revoke with records in flight ----------------------------------------------------------------


def test_a_revoke_with_records_in_flight_hands_over_without_handling_a_record_twice(
    processes: Callable[[str], Processes],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    tmp_path: Path,
    seed: int,
) -> None:
    """Worker A (concurrency 200, ordering key, 300-700 ms a record while the load is slow) has
    records in flight on every partition when B joins and the rebalance revokes some of them:
    A lets those finish and commits prefix + map before the handover. No record is handled twice,
    none is lost, B starts a moved partition only after A's last record of it ended, and each
    key's records run in offset order across the two workers."""
    partitions, keys, total, concurrency = 4, 200, 6000, 200
    topic = keyed_topic(topic_factory, kafka_bootstrap, partitions, keys, total)
    slow = tmp_path / "slow"
    slow.touch()
    pool = processes(topic)

    def settings(name: str) -> dict[str, dict[str, Any]]:
        client = {**FAST_GROUP, "client.id": name}
        return sections(
            kafka_bootstrap,
            group_id,
            concurrency=concurrency,
            ordering="key",
            client=client,
            poll_batch_size=WHOLE_BACKLOG,
        )

    def behaviour(name: str) -> Behaviour:
        return Behaviour(tmp_path / f"{name}.events", (300, 700), seed, slow_while=slow)

    a = pool.start("a", settings("a"), behaviour("a"))
    a.wait_handled(concurrency, START_TIMEOUT_S)
    b = pool.start("b", settings("b"), behaviour("b"))

    def handed_over() -> bool:
        assert a.running, pool.describe()
        assert b.running, pool.describe()
        return bool(a.named("partitions revoked")) and stable_with(kafka_bootstrap, group_id, {"a", "b"})

    wait_for(
        handed_over,
        START_TIMEOUT_S,
        interval=0.2,
        message=lambda: f"no handover: {describe_group(kafka_bootstrap, group_id)}; {pool.describe()}",
    )
    assert a.handled() < total // 2, "A handled most records before the revoke: the test proves nothing"
    slow.unlink()

    def all_handled() -> bool:
        assert a.running, pool.describe()
        assert b.running, pool.describe()
        return len({e.id for e in handled(a.events() + b.events())}) == total

    wait_for(all_handled, RUN_TIMEOUT_S, interval=0.2, message=pool.describe)
    signalled = time.monotonic()
    for worker in (a, b):
        worker.send(signal.SIGTERM)
    # Waited for longer than the bound, so that what follows also runs when the bound is missed.
    codes = [worker.wait(STOP_TIMEOUT_S + 30) for worker in (a, b)]
    took = time.monotonic() - signalled
    run_a, run_b = a.events(), b.events()

    revoke = a.named("partitions revoked")[0]
    moved = sorted(int(name.rsplit("[", 1)[1].rstrip("]")) for name in revoke["partitions"])
    revoked_at = datetime.fromisoformat(revoke["timestamp"]).timestamp()
    drained = [e for e in handled(run_a) if e.partition in moved and revoked_at - 1.0 <= e.time <= revoked_at]
    counts = Counter(e.id for e in handled(run_a + run_b))
    print(
        f"[revoke] A handed over partitions {moved}; {len(drained)} of its records of them ended in the "
        f"second before the revoke; A handled {len(handled(run_a))}, B {len(handled(run_b))}"
    )
    assert moved, "A's revoke named no partition"
    assert drained, "A had nothing of the revoked partitions running when they were revoked"
    twice = {i: n for i, n in counts.items() if n > 1}
    assert not twice, (
        f"{len(twice)} records handled twice across the handover, e.g. {sorted(twice.items())[:10]}"
    )
    assert set(counts) == set(range(total))
    assert codes == [0, 0], pool.describe()
    for partition in moved:
        a_last = max((e.time for e in run_a if e.partition == partition and e.kind != "S"), default=0.0)
        b_first = min((e.time for e in run_b if e.partition == partition), default=float("inf"))
        assert a_last < b_first, (
            f"partition {partition}: B started at {b_first:.3f}, A still ran until {a_last:.3f}"
        )
    violations = key_order_violations([run_a, run_b])
    assert not violations, f"{len(violations)} key order violations, e.g. {violations[:10]}"
    assert committed_offsets(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic)
    stuck = [
        e
        for worker in (a, b)
        for e in worker.named("a record of a revoked partition is still running; handing over what finished")
    ]
    assert took <= STOP_TIMEOUT_S, (
        f"the idle workers took {took:.1f}s to stop after SIGTERM (bound {STOP_TIMEOUT_S:g}s); "
        f"their logs say: {[(e['timestamp'], e['event'], e.get('waited_seconds')) for e in stuck]}"
    )
    errors = Counter(line for worker in (a, b) for line in worker.errors())
    assert not errors, f"the workers logged errors: {errors.most_common(5)}"


# -- 5. a slow key and the other keys of its partition ---------------------------------------------------


def test_a_slow_key_does_not_block_the_other_keys_of_its_partition(
    in_process: Callable[[Mapping[str, Mapping[str, Any]], App], InProcess],
    topic_factory: TopicFactory,
    kafka_bootstrap: str,
    group_id: str,
    tmp_path: Path,
    seed: int,
) -> None:
    """One partition, ordering key, concurrency 50: key k0's first record stays in its handler
    (until the test lets it go); every record of the nine other keys is handled meanwhile, and
    k0's later records wait behind it, then run in order."""
    keys, total = 10, 200
    topic = keyed_topic(topic_factory, kafka_bootstrap, 1, keys, total)
    hold = tmp_path / "hold"
    hold.touch()
    behaviour = Behaviour(tmp_path / "events", (5, 20), seed, hold_key="k0", hold_file=hold)
    settings = sections(kafka_bootstrap, group_id, concurrency=50, ordering="key")
    run = in_process(settings, build_app(topic, behaviour))
    others = {i for i in range(total) if i % keys}

    def others_handled() -> bool:
        return {e.id for e in handled(read_events(behaviour.events))} >= others

    try:
        wait_for(
            others_handled,
            RUN_TIMEOUT_S,
            message=lambda: (
                f"other keys handled: {len(handled(read_events(behaviour.events)))} of {len(others)}"
            ),
        )
        meanwhile = read_events(behaviour.events)
    finally:
        hold.unlink()
    worker = run.join()
    events = read_events(behaviour.events)

    slow = [e for e in meanwhile if e.key == "k0"]
    assert [(e.kind, e.offset) for e in slow] == [("S", 0)], f"k0 while held: {slow}"
    violations = key_order_violations([events])
    assert not violations, f"{len(violations)} key order violations, e.g. {violations[:10]}"
    counts = Counter(e.id for e in handled(events))
    assert counts == Counter(range(total)), (
        f"not each record once: {sorted((counts - Counter(range(total))).items())[:10]}"
    )
    assert worker.stats.topics[topic].ok == total
    assert committed_offsets(kafka_bootstrap, group_id, topic) == {0: total}


# -- 6. a retrying record and the other keys of its partition --------------------------------------------


def test_a_retrying_record_blocks_only_its_key(
    topic_factory: TopicFactory, kafka_bootstrap: str, group_id: str, tmp_path: Path, seed: int
) -> None:
    """One partition, ordering key, concurrency 20, retries backing off 0.5 s then 1 s: record 50
    (key k0) raises RetryableError twice. Its attempts wait out the backoff in its lane; every
    record of the other keys is handled before its third attempt starts; k0's later records start
    only once it is handled, in order."""
    keys, total, retried = 10, 200, 50
    topic = keyed_topic(topic_factory, kafka_bootstrap, 1, keys, total)
    behaviour = Behaviour(tmp_path / "events", seed=seed, fail={retried: 2})
    retry = {"max_attempts": 5, "initial_backoff": 0.5, "multiplier": 2.0, "max_backoff": 5.0, "jitter": 0.0}
    settings = sections(kafka_bootstrap, group_id, concurrency=20, ordering="key", retry=retry)
    worker = run_in_process(settings, build_app(topic, behaviour))
    events = read_events(behaviour.events)

    tries = [e for e in events if e.id == retried]
    expected = [("S", 1), ("F", 1), ("S", 2), ("F", 2), ("S", 3), ("E", 3)]
    assert [(e.kind, e.attempt) for e in tries] == expected, tries
    waits = [tries[2].time - tries[1].time, tries[4].time - tries[3].time]
    print(f"[retry] record {retried} waited {waits[0]:.2f}s and {waits[1]:.2f}s between attempts")
    assert waits[0] >= 0.45, f"backoffs {waits}, expected 0.5 s and 1 s"
    assert waits[1] >= 0.9, f"backoffs {waits}, expected 0.5 s and 1 s"
    late = [e for e in handled(events) if e.key != "k0" and e.time > tries[4].time]
    assert not late, f"{len(late)} records of other keys were handled only after the retries, e.g. {late[:5]}"
    behind = [e for e in events if e.key == "k0" and e.offset > retried and e.kind == "S"]
    assert behind, "k0 has no record after the retried one"
    assert all(e.time > tries[5].time for e in behind), "k0's later records ran before it was handled"
    violations = key_order_violations([events])
    assert not violations, f"{len(violations)} key order violations, e.g. {violations[:10]}"
    assert Counter(e.id for e in handled(events)) == Counter(range(total))
    assert worker.stats.retries == 2
    assert committed_offsets(kafka_bootstrap, group_id, topic) == {0: total}


# -- 7. ordering "partition" -----------------------------------------------------------------------------


def test_ordering_partition_runs_one_record_per_partition_and_all_partitions_in_parallel(
    topic_factory: TopicFactory, kafka_bootstrap: str, group_id: str, tmp_path: Path, seed: int
) -> None:
    """4 partitions with a backlog of two poll batches each (default poll_batch_size 500),
    ordering and concurrency set per topic (``[topics.T] ordering = "partition", concurrency =
    4`` over ``[processing] concurrency = 16, ordering = "key"``), keyed records, an async handler
    awaiting 1-3 ms: never two records of one partition at once, each partition in offset order,
    and the four partitions run at the same time (4 records at once), as the concurrency allows."""
    partitions, per, keys = 4, 1000, 40
    topic = keyed_topic(topic_factory, kafka_bootstrap, partitions, keys, partitions * per)
    behaviour = Behaviour(tmp_path / "events", (1, 3), seed)
    settings = sections(
        kafka_bootstrap,
        group_id,
        concurrency=16,
        ordering="key",
        topics={topic: {"ordering": "partition", "concurrency": 4}},
    )
    started = time.monotonic()
    run_in_process(settings, build_app(topic, behaviour))
    took = time.monotonic() - started
    events = read_events(behaviour.events)

    by_partition = max_running(events, lambda e: e.partition)
    overall = max_running(events, lambda e: "all")["all"]
    # How many partitions had a record running when each record started.
    running: set[int] = set()
    parallel: Counter[int] = Counter()
    for e in events:
        if e.kind == "S":
            running.add(e.partition)
            parallel[len(running)] += 1
        else:
            running.discard(e.partition)
    print(
        f"[ordering partition] {partitions * per} records in {took:.1f}s; most running per partition "
        f"{dict(by_partition)}, at once {overall}; records started with 1/2/3/4 partitions running: "
        f"{[parallel[n] for n in range(1, partitions + 1)]}"
    )
    assert dict(by_partition) == dict.fromkeys(range(partitions), 1), f"running at once: {dict(by_partition)}"
    for partition in range(partitions):
        offsets = [e.offset for e in events if e.partition == partition and e.kind == "S"]
        assert offsets == list(range(per)), f"partition {partition} started out of order: {offsets[:20]}..."
    assert Counter(e.id for e in handled(events)) == Counter(range(partitions * per))
    assert overall == partitions, (
        f"at most {overall} of {partitions} backlogged partitions ran at once (concurrency {partitions}): "
        "the partition fetched first fills the loop's window of poll_batch_size unstarted records, and "
        "the others wait for it to drain"
    )


# -- 8. a sync handler on the thread pool ----------------------------------------------------------------


def test_a_sync_handler_with_concurrency_8_runs_8_at_once_on_a_thread_pool(
    topic_factory: TopicFactory, kafka_bootstrap: str, group_id: str, tmp_path: Path, seed: int
) -> None:
    """A ``def`` handler sleeping 30 ms, concurrency 8, ordering none: it runs on the pool's
    threads (not the processing thread), up to 8 records at once and never more."""
    total = 160
    topic = topic_factory(2)
    produce_records(kafka_bootstrap, topic, total)
    behaviour = Behaviour(tmp_path / "events", (30, 30), seed, sync=True)
    settings = sections(kafka_bootstrap, group_id, concurrency=8, ordering="none")
    run_in_process(settings, build_app(topic, behaviour))
    events = read_events(behaviour.events)

    overall = max_running(events, lambda e: "all")["all"]
    threads = {e.thread for e in events}
    print(f"[sync pool] at once {overall}, on {len(threads)} threads {sorted(threads)}")
    assert overall == 8, f"{overall} records ran at once, expected 8"
    assert len(threads) == 8, f"the handler ran on {len(threads)} threads, expected a pool of 8: {threads}"
    assert not any(t.startswith(("streamer-processor/", "in-process-worker/")) for t in threads), threads
    assert Counter(e.id for e in handled(events)) == Counter(range(total))

"""`streamer run --workers 2` under real signals: SIGTERM to the supervisor's whole process group
(Ctrl-C in a terminal, ``kill -- -PGID``) stops every worker cleanly once, and a SIGKILLed
supervisor leaves no worker behind.

The supervisor runs in a process group of its own, as a shell job would; its workers run
``tests.integration.apps.supervised:app``, the recording app with one effects file per worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TopicFactory
from tests.integration.workers import (
    REPO,
    STOP_TIMEOUT_S,
    Effect,
    WorkerPool,
    clean_env,
    id_counts,
    offsets_by_partition,
    read_effects,
    streamer_command,
)
from tests.support import wait_for
from tests.support.kafka import committed_offsets, produce_records

APP = "tests.integration.apps.supervised:app"
RECORDS = 8000
#: Seconds for two workers to start, join and each handle their first records.
START_TIMEOUT_S = 60.0


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc); [] once it is gone."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Supervised:
    """A ``streamer run --workers 2`` process, its log and its workers' effects files."""

    proc: subprocess.Popen[bytes]
    log: Path
    effects: Path
    #: Every worker pid seen, so that teardown can kill one that outlived its supervisor.
    seen: set[int] = field(default_factory=set)

    def workers(self) -> list[int]:
        pids = children(self.proc.pid)
        self.seen.update(pids)
        return pids

    def handled(self, index: int) -> list[Effect]:
        return read_effects(Path(f"{self.effects}.{index}"))

    def signals(self, index: int) -> list[int]:
        """The signals delivered to worker ``index``, in order (see the supervised app)."""
        try:
            return [int(n) for n in Path(f"{self.effects}.{index}.signals").read_text().split()]
        except FileNotFoundError:
            return []

    def all_handled(self) -> list[Effect]:
        return self.handled(0) + self.handled(1)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines (supervisor's and workers') whose event is ``name``."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture
def supervised(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str, tmp_path: Path
) -> Iterator[tuple[Supervised, str]]:
    """Two workers under a supervisor on a fresh 4-partition topic of RECORDS records, both busy."""
    topic = topic_factory(partitions=4)
    produce_records(kafka_bootstrap, topic, RECORDS)
    slow = tmp_path / "slow"
    slow.touch()
    env = clean_env(
        STREAMER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        STREAMER_KAFKA__GROUP_ID=group_id,
        STREAMER_KAFKA__CLIENT=json.dumps({"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}),
        STREAMER_COMMIT__EVERY_RECORDS="100",
        # No HTTP endpoints: worker i would serve on the base port + i.
        STREAMER_METRICS__ENABLED="false",
        STREAMER_DEAD_LETTER__ENABLED="false",
        STREAMER_LOG_FORMAT="json",
        RECORDING_TOPIC=topic,
        RECORDING_EFFECTS=str(tmp_path / "effects"),
        RECORDING_SLEEP_US="2000",
        RECORDING_SLOW_WHILE=str(slow),
    )
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            streamer_command("run", APP, "--workers", "2"),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # a process group of its own, like a shell job
        )
    run = Supervised(proc, log, tmp_path / "effects")
    try:
        wait_for(lambda: len(run.workers()) == 2, 30, message=lambda: f"two workers started:\n{run.tail()}")

        def both_busy() -> bool:
            assert proc.poll() is None, run.tail()
            run.workers()
            return all(len(run.handled(i)) >= 150 for i in (0, 1))

        wait_for(both_busy, START_TIMEOUT_S, message=lambda: f"both workers handle records:\n{run.tail()}")
        yield run, topic
    finally:
        for pid in run.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def frontier(effects: list[Effect]) -> dict[int, int]:
    """Per partition, one past the highest offset handled."""
    return {p: max(offsets) + 1 for p, offsets in offsets_by_partition(effects).items()}


def assert_committed_what_was_handled(bootstrap: str, group: str, topic: str, effects: list[Effect]) -> None:
    """The committed offsets are exactly the handled ones: every offset below them, none above."""
    handled = frontier(effects)
    assert committed_offsets(bootstrap, group, topic) == handled
    for partition, offsets in offsets_by_partition(effects).items():
        assert set(offsets) == set(range(handled[partition])), f"partition {partition} has a gap"


def assert_the_next_run_rereads_nothing(
    bootstrap: str, group: str, topic: str, first: list[Effect], directory: Path
) -> None:
    """A bounded run of one worker resumes at the committed offsets and handles the rest once."""
    ends = frontier(first)
    with WorkerPool(directory, bootstrap, group, topic) as pool:
        second = pool.start("second", until_end=True)
        assert second.wait(120) == 0, second.describe()
    rest = read_effects(second.effects)
    for partition, offsets in offsets_by_partition(rest).items():
        assert offsets[0] == ends.get(partition, 0), f"partition {partition} resumed at {offsets[0]}"
    again = set(id_counts(first)) & set(id_counts(rest))
    assert not again, f"{len(again)} records handled before the stop were read again"
    assert set(id_counts(first, rest)) == set(range(RECORDS))


def test_sigterm_to_the_supervisors_process_group_stops_every_worker_cleanly_once(
    supervised: tuple[Supervised, str], kafka_bootstrap: str, group_id: str, tmp_path: Path
) -> None:
    run, topic = supervised
    os.killpg(run.proc.pid, signal.SIGTERM)
    try:
        code = run.proc.wait(timeout=STOP_TIMEOUT_S + 15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"supervisor still running:\n{run.tail()}") from None
    assert [run.signals(0), run.signals(1)] == [[signal.SIGTERM], [signal.SIGTERM]], run.tail()
    assert code == 0, run.tail()
    exits = {e["worker"]: e["exit_code"] for e in run.events("worker exited")}
    assert exits == {0: 0, 1: 0}, run.tail()
    assert "exiting at once" not in run.log.read_text(), run.tail()
    first = run.all_handled()
    assert_committed_what_was_handled(kafka_bootstrap, group_id, topic, first)
    assert_the_next_run_rereads_nothing(kafka_bootstrap, group_id, topic, first, tmp_path)


def test_sigkill_of_the_supervisor_leaves_no_worker_alive_and_each_commits_what_it_handled(
    supervised: tuple[Supervised, str], kafka_bootstrap: str, group_id: str, tmp_path: Path
) -> None:
    run, topic = supervised
    pids = run.workers()
    run.proc.kill()
    run.proc.wait()
    wait_for(
        lambda: not any(alive(pid) for pid in pids),
        STOP_TIMEOUT_S + 15,
        message=lambda: f"workers {[p for p in pids if alive(p)]} outlived the supervisor:\n{run.tail()}",
    )
    assert [run.signals(0), run.signals(1)] == [[signal.SIGTERM], [signal.SIGTERM]], "the death signal"
    first = run.all_handled()
    assert_committed_what_was_handled(kafka_bootstrap, group_id, topic, first)
    assert_the_next_run_rereads_nothing(kafka_bootstrap, group_id, topic, first, tmp_path)

"""The ``streamer`` command as users run it: bad settings are refused before anything is consumed,
and the crash/resume demo loses nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import make_unique_name
from tests.integration.workers import APP, REPO, clean_env, streamer_command
from tests.support.kafka import (
    REQUEST_TIMEOUT_S,
    admin,
    committed_offsets,
    create_topic,
    delete_topics,
    produce_records,
)

#: Seconds a refused start may take (imports, settings, one metadata request at most).
REFUSE_TIMEOUT_S = 30.0
DEMO_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    """A start that must be refused: what is wrong, and what stderr must name."""

    named: tuple[str, ...]
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the variable
    toml: str | None = None
    target: str = APP


CASES = {
    "bad-integer": Case(("commit.every_records", "'abc'"), env={"STREAMER_COMMIT__EVERY_RECORDS": "abc"}),
    "missing-group": Case(("kafka.group_id", "required"), env={"STREAMER_KAFKA__GROUP_ID": None}),
    "unknown-key-in-file": Case(
        ("commit.every_recods", "unknown setting"), toml="[commit]\nevery_records = 10\nevery_recods = 5\n"
    ),
    "reserved-client-key": Case(
        ("enable.auto.commit",), env={"STREAMER_KAFKA__CLIENT": '{"enable.auto.commit": true}'}
    ),
    "module-not-found": Case(
        ("tests.integration.apps.no_such_app",), target="tests.integration.apps.no_such_app:app"
    ),
    "attribute-not-found": Case(("'nope'", "recording"), target="tests.integration.apps.recording:nope"),
}


@dataclass
class Refused:
    """How one refused start went."""

    group: str
    effects: Path
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def refused(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, Refused]]]:
    """Every case of CASES started at once (each is mostly interpreter start-up), on a topic with records.

    Yields the topic and, per case, its group, effects file and completed process.
    """
    topic = create_topic(kafka_bootstrap, make_unique_name("t", "refused-starts"), 3)
    try:
        produce_records(kafka_bootstrap, topic, 30)
        started = {}
        for name, case in CASES.items():
            directory = tmp_path_factory.mktemp(name)
            group = make_unique_name("g", f"refused-{name}")
            env = clean_env(
                STREAMER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
                STREAMER_KAFKA__GROUP_ID=group,
                STREAMER_METRICS__ENABLED="false",
                RECORDING_TOPIC=topic,
                RECORDING_EFFECTS=str(directory / "effects"),
            )
            for key, value in case.env.items():
                if value is None:
                    env.pop(key)
                else:
                    env[key] = value
            args = ["run", case.target, "--until-end", "--no-progress"]
            if case.toml is not None:
                config = directory / "streamer.toml"
                config.write_text(case.toml)
                args += ["--config", str(config)]
            proc = subprocess.Popen(
                streamer_command(*args),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            started[name] = (group, directory / "effects", proc)
        results = {}
        try:
            for name, (group, effects, proc) in started.items():
                stdout, stderr = proc.communicate(timeout=REFUSE_TIMEOUT_S)
                completed = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
                results[name] = Refused(group, effects, completed)
        finally:
            for _, _, proc in started.values():
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        yield topic, results
    finally:
        delete_topics(kafka_bootstrap, [topic])


@pytest.mark.parametrize("name", CASES)
def test_bad_settings_exit_2_naming_the_problem(
    kafka_bootstrap: str, refused: tuple[str, dict[str, Refused]], name: str
) -> None:
    """A bad value, a missing key, an unknown key or a bad MODULE:APP: exit 2, the culprit named."""
    topic, results = refused
    outcome = results[name]
    stderr = outcome.result.stderr
    assert outcome.result.returncode == 2, f"exit {outcome.result.returncode}; stderr:\n{stderr}"
    for text in CASES[name].named:
        assert text in stderr, f"{text!r} not named in stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert not outcome.effects.exists(), "a refused worker handled records"
    assert committed_offsets(kafka_bootstrap, outcome.group, topic) == {}, "a refused worker committed"


def test_demo_loses_nothing(tmp_path: Path, kafka_bootstrap: str, redis_url: str) -> None:
    """``streamer demo`` on a small scale: every scenario loses nothing and its run 2 exits 0."""
    env = clean_env(STREAMER_DEMO_DIR=str(tmp_path), STREAMER_DEDUP__REDIS_URL=redis_url)
    args = [
        "demo",
        "--bootstrap",
        kafka_bootstrap,
        "--records",
        "5000",
        "--kill-at",
        "3000",
        "--work-us",
        "200",
    ]
    stdout_path, stderr_path = tmp_path / "demo.out", tmp_path / "demo.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        # A session of its own: if the demo outlives the timeout, its workers are killed with it.
        proc = subprocess.Popen(
            streamer_command(*args),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        try:
            code = proc.wait(timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        stdout, stderr = stdout_path.read_text(), stderr_path.read_text()
        report = f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr[-3000:]}"
        assert code == 0, report
        rows = {}
        for line in stdout.splitlines():
            label, _, cells = line.partition("  ")
            if label:
                rows[label.strip()] = cells.split()
        assert "records lost" in rows, report
        assert len(rows["records lost"]) >= 2, report  # with and without checkpoints, at least
        assert set(rows["records lost"]) == {"0"}, report
        assert set(rows["run 2 exit code"]) == {"0"}, report
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # The demo's topic, and the dead-letter topic its workers create next to it.
        for topic in re.findall(r"records to (\S+) \(", stdout_path.read_text()):
            existing = admin(kafka_bootstrap).list_topics(timeout=REQUEST_TIMEOUT_S).topics
            names = [name for name in existing if name == topic or name.startswith(f"{topic}.")]
            for failure in delete_topics(kafka_bootstrap, names):
                print(f"could not delete demo topic {failure}")

"""`streamer lag` against a real group, and the adaptive policy learning MTBF from a real crash."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from tests.integration.workers import REPO, WorkerPool, clean_env, streamer_command
from tests.support import wait_for
from tests.support.kafka import produce_records


def commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Commit ``offsets`` for ``group`` without joining it (assign, commit, close)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
        )
    finally:
        consumer.close()


def lag(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        streamer_command("lag", "--bootstrap", bootstrap, *args),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_lag_reports_committed_end_lag_and_age_per_partition(
    kafka_bootstrap: str, topic_factory: object, group_id: str
) -> None:
    topic = topic_factory(partitions=2)  # type: ignore[operator]
    produce_records(kafka_bootstrap, topic, 60)  # 30 per partition
    commit(kafka_bootstrap, group_id, {(topic, 0): 10, (topic, 1): 30})

    result = lag(kafka_bootstrap, "--group", group_id, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["partition"]: row for row in json.loads(result.stdout)}
    assert (rows[0]["committed"], rows[0]["end"], rows[0]["lag"]) == (10, 30, 20)
    assert (rows[1]["committed"], rows[1]["end"], rows[1]["lag"]) == (30, 30, 0)
    assert rows[0]["seconds"] is not None, "age of the record at offset 10"
    assert rows[0]["seconds"] >= 0
    assert rows[1]["seconds"] == 0.0, "caught up: no age"

    table = lag(kafka_bootstrap, "--group", group_id)
    assert table.returncode == 0
    assert "total" in table.stdout
    assert " 20 " in table.stdout


def test_lag_of_an_unknown_group_exits_4_and_says_so(kafka_bootstrap: str, group_id: str) -> None:
    result = lag(kafka_bootstrap, "--group", group_id)
    assert result.returncode == 4
    assert group_id in result.stderr
    assert "no committed offsets" in result.stderr


def test_adaptive_policy_learns_the_failure_from_the_crashed_runs_commit_metadata(
    kafka_bootstrap: str, topic: str, group_id: str, tmp_path: Path
) -> None:
    produce_records(kafka_bootstrap, topic, 3000)
    adaptive = {
        "STREAMER_COMMIT__POLICY": "adaptive",
        "STREAMER_COMMIT__ADAPTIVE_MAX_SECONDS": "0.2",
        "STREAMER_COMMIT__ADAPTIVE_MIN_SECONDS": "0.1",
    }
    with WorkerPool(tmp_path, kafka_bootstrap, group_id, topic) as pool:
        first = pool.start(
            "first", every_records=0, sleep_us=2000, env=adaptive, client={"session.timeout.ms": 6000}
        )
        first.wait_handled(300)
        wait_for(
            lambda: _has_running_commit(kafka_bootstrap, group_id, topic),
            30,
            message="a commit with state=running landed",
        )
        first.send(signal.SIGKILL)
        first.wait(10)

        second = pool.start(
            "second", until_end=True, every_records=0, env=adaptive, client={"session.timeout.ms": 6000}
        )
        assert second.wait(120) == 0, second.describe()
    log = second.log.read_text()
    assert "earlier run ended without a clean stop" in log, log[-2000:]


def _has_running_commit(bootstrap: str, group: str, topic: str) -> bool:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    finally:
        consumer.close()
    return any(p.offset >= 0 and (p.metadata or "").find("state=running") >= 0 for p in parts)

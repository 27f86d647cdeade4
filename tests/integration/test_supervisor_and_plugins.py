"""`streamer run --workers N` (a supervisor over real worker processes) and chains assembled from
plugin entry points by the settings alone (the example plugin, installed by dev/bootstrap)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import redis

from tests.integration.workers import REPO, clean_env, id_counts, read_effects, streamer_command
from tests.support import wait_for
from tests.support.kafka import committed_offsets, end_offsets, produce_records


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_supervisor_restarts_a_killed_worker_and_stops_all_on_sigterm(
    kafka_bootstrap: str, topic_factory: object, group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=4)  # type: ignore[operator]
    produce_records(kafka_bootstrap, topic, 4000)
    effects, slow, log = tmp_path / "effects", tmp_path / "slow", tmp_path / "supervisor.log"
    slow.touch()
    env = clean_env(
        STREAMER_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        STREAMER_KAFKA__GROUP_ID=group_id,
        STREAMER_KAFKA__CLIENT=json.dumps({"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}),
        STREAMER_COMMIT__EVERY_RECORDS="100",
        STREAMER_METRICS__PORT="0",
        STREAMER_DEAD_LETTER__ENABLED="false",
        RECORDING_TOPIC=topic,
        RECORDING_EFFECTS=str(effects),
        RECORDING_SLEEP_US="2000",
        RECORDING_SLOW_WHILE=str(slow),
    )
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            streamer_command("run", "tests.integration.apps.recording:app", "--workers", "2"),
            cwd=REPO,
            env=env,
            stderr=out,
            stdout=out,
        )
    try:
        wait_for(lambda: len(children(supervisor.pid)) == 2, 30, message="two workers started")
        wait_for(lambda: len(read_effects(effects)) >= 200, 60, message="workers handle records")
        victim = children(supervisor.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: b"worker restarted" in log.read_bytes(), 30, message="supervisor restarted the worker"
        )
        wait_for(
            lambda: len(children(supervisor.pid)) == 2 and victim not in children(supervisor.pid),
            30,
            message="two workers again",
        )
        slow.unlink()
        wait_for(
            lambda: set(id_counts(read_effects(effects))) >= set(range(4000)),
            90,
            message="every record handled",
        )
        wait_for(
            lambda: (
                committed_offsets(kafka_bootstrap, group_id, topic) == end_offsets(kafka_bootstrap, topic)
            ),
            30,
            message="everything committed",
        )
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if supervisor.poll() is None:
            for child in children(supervisor.pid):
                os.kill(child, signal.SIGKILL)
            supervisor.kill()
            supervisor.wait()
    assert b"worker crashed; restarting" in log.read_bytes()


def test_settings_alone_wire_plugin_chains_from_entry_points(
    kafka_bootstrap: str, redis_url: str, topic_factory: object, group_id: str, tmp_path: Path
) -> None:
    topic = topic_factory(partitions=2)  # type: ignore[operator]
    totals = f"test-totals:{uuid.uuid4().hex[:8]}"
    orders = [
        {"customer": "ada", "amount": 3},
        {"customer": "bo", "amount": 0.5},
        {"amount": 9},
        {"customer": "ada", "amount": 4},
    ]
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i, order in enumerate(orders):
        producer.produce(
            topic, json.dumps(order).encode(), partition=i % 2, headers=[("message-id", f"o{i}")]
        )
    producer.produce(topic, b"{not json", partition=0, headers=[("message-id", "poison")])
    assert producer.flush(30) == 0
    options = f'{{ redis_url = "{redis_url}", totals_key = "{totals}", min_amount = 1 }}'
    config = tmp_path / "streamer.toml"
    config.write_text(f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
group_id = "{group_id}"
[metrics]
enabled = false
[topics."{topic}"]
decoder = "json"
chain = [
  "orders-require-customer",
  {{ use = "orders-totals", options = {options} }},
]
""")
    done = subprocess.run(
        streamer_command("run", "--config", str(config), "--until-end"),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = redis.Redis.from_url(redis_url)
    try:
        assert {k.decode(): float(v) for k, v in client.hgetall(totals).items()} == {"ada": 7.0}
    finally:
        client.delete(totals)
    parked = sum(end_offsets(kafka_bootstrap, f"{topic}.dlq").values())
    assert parked == 2, "the order without a customer and the poison record are parked"

"""The brief's story on the local services: crash at record 87,000, resume near 86,000.

``streamer demo`` produces 100,000 records, runs a worker as a separate process, kills it with
SIGKILL near record 87,000, restarts it, and reports where it resumed, how much it re-read and
lost, and how long both runs took: once with checkpointing (every 1,000 records / 5 s) and once
without (a commit only at the end), over the same topic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # not re-exported in the stubs

from streamer.app import App
from streamer.message import Message

PARTITIONS = 3

# -- the worker side: an app whose side effect is a line "partition offset" per record ----------

app = App(name="demo")
_LOG_FD: int | None = None
_WORK_S = int(os.environ.get("STREAMER_DEMO_WORK_US", "0")) / 1e6


@app.handler(os.environ.get("STREAMER_DEMO_TOPIC", "streamer-demo"))
def record_effect(msg: Message) -> None:
    """Simulate some work, then write the record's position: the effect a crash may repeat."""
    global _LOG_FD  # noqa: PLW0603 - one descriptor per worker process, opened on first use
    if _WORK_S:
        deadline = time.perf_counter() + _WORK_S
        while time.perf_counter() < deadline:
            pass
    if _LOG_FD is None:
        _LOG_FD = os.open(os.environ["STREAMER_DEMO_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(_LOG_FD, b"%d %d\n" % (msg.partition, msg.offset))


# -- the driver side --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one crash-and-resume scenario measured."""

    killed_at: int
    resumed_from: int
    reread: int
    repeated: int
    lost: int
    first_run_s: float
    second_run_s: float
    exit_code: int


def run_demo(*, bootstrap: str, records: int, kill_at: int, every_records: int, work_us: int) -> int:
    """Run both scenarios and print the comparison; 0 when nothing was lost."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    topic = f"streamer-demo-{stamp}"
    workdir = Path(os.environ.get("STREAMER_DEMO_DIR", ".dev/demo")) / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"producing {records:,} records to {topic} ({PARTITIONS} partitions) on {bootstrap}")
    _create_topic(bootstrap, topic)
    _produce(bootstrap, topic, records)

    scenarios = {
        "checkpoints": (every_records, 5.0, False),
        "checkpoints+dedup": (every_records, 5.0, True),
        "no checkpoints": (0, 0.0, False),
    }
    results: dict[str, Outcome] = {}
    for name, (n, secs, dedup) in scenarios.items():
        print(f"\n== {name}: run 1, SIGKILL near record {kill_at:,}")
        group = f"{topic}-{name.replace('+', '-').replace(' ', '-')}"
        env = {
            **os.environ,
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "STREAMER_KAFKA__GROUP_ID": group,
            "STREAMER_COMMIT__EVERY_RECORDS": str(n),
            "STREAMER_COMMIT__EVERY_SECONDS": str(secs),
            "STREAMER_DEDUP__ENABLED": "true" if dedup else "false",
            "STREAMER_DEMO_TOPIC": topic,
            "STREAMER_DEMO_WORK_US": str(work_us),
            "STREAMER_LOG_LEVEL": os.environ.get("STREAMER_LOG_LEVEL", "WARNING"),
            # Static membership: the restarted worker takes its partitions back at once instead
            # of waiting a session timeout for the killed one to be declared dead.
            "STREAMER_KAFKA__CLIENT": f'{{"group.instance.id": "{group}-worker-1"}}',
        }
        results[name] = _scenario(env, workdir / group, records, kill_at, bootstrap, group, topic)
    _print_table(results, records)
    return 0 if all(r.lost == 0 and r.exit_code == 0 for r in results.values()) else 1


def _scenario(
    env: dict[str, str], base: Path, records: int, kill_at: int, bootstrap: str, group: str, topic: str
) -> Outcome:
    cmd = [sys.executable, "-m", "streamer", "run", "streamer.demo:app", "--until-end", "--no-progress"]
    first_log, second_log = base.with_suffix(".run1"), base.with_suffix(".run2")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env={**env, "STREAMER_DEMO_LOG": str(first_log)})
    killed_at = _kill_when(proc, first_log, kill_at)
    first_run_s = time.monotonic() - started
    print(f"   killed with SIGKILL after {killed_at:,} records ({first_run_s:.1f} s)")

    resume_points = _committed(bootstrap, group, topic)
    resumed_from = sum(resume_points.values())
    print(f"== run 2: resuming from the last checkpoint (record {resumed_from:,})")
    started = time.monotonic()
    exit_code = subprocess.run(cmd, env={**env, "STREAMER_DEMO_LOG": str(second_log)}, check=False).returncode
    second_run_s = time.monotonic() - started

    first, second = _positions(first_log), _positions(second_log)
    return Outcome(
        killed_at=killed_at,
        resumed_from=resumed_from,
        reread=sum(1 for p, o in first if o >= resume_points.get(p, 0)),
        repeated=len(first & second),
        lost=records - len(first | second),
        first_run_s=first_run_s,
        second_run_s=second_run_s,
        exit_code=exit_code,
    )


def _kill_when(proc: subprocess.Popen[bytes], log: Path, kill_at: int) -> int:
    """SIGKILL ``proc`` once ``log`` holds ``kill_at`` lines; return how many it held."""
    while proc.poll() is None:
        if _count_lines(log) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return _count_lines(log)
        time.sleep(0.005)
    raise RuntimeError(f"the worker exited (code {proc.returncode}) before record {kill_at:,}")


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _positions(path: Path) -> set[tuple[int, int]]:
    if not path.exists():
        return set()
    return {(int(p), int(o)) for p, o in (line.split() for line in path.read_text().splitlines() if line)}


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)


def _produce(bootstrap: str, topic: str, records: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all"})
    padding = b"x" * 80
    for i in range(records):
        while True:
            try:
                producer.produce(
                    topic,
                    value=b"%08d|" % i + padding,
                    partition=i % PARTITIONS,
                    headers=[("message-id", str(i).encode())],
                )
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60) != 0:
        raise RuntimeError("could not deliver every demo record")


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return {p.partition: max(p.offset, 0) for p in parts}
    finally:
        consumer.close()


def _print_table(results: dict[str, Outcome], records: int) -> None:
    names = list(results)
    rows: list[tuple[str, Callable[[Outcome], str]]] = [
        ("killed (SIGKILL) after record", lambda r: f"{r.killed_at:,}"),
        ("run 2 resumed from record", lambda r: f"{r.resumed_from:,}"),
        ("records re-read", lambda r: f"{r.reread:,}"),
        ("side effects repeated", lambda r: f"{r.repeated:,}"),
        ("records lost", lambda r: f"{r.lost:,}"),
        ("run 1 wall time", lambda r: f"{r.first_run_s:.1f} s"),
        ("run 2 wall time", lambda r: f"{r.second_run_s:.1f} s"),
        ("run 2 exit code", lambda r: str(r.exit_code)),
    ]
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(n), 14) + 2 for n in names]
    print(f"\n{records:,} records; the worker was killed mid-run and restarted\n")
    print(" " * width + "".join(n.rjust(c) for n, c in zip(names, cols, strict=True)))
    for label, cell in rows:
        print(
            label.ljust(width) + "".join(cell(results[n]).rjust(c) for n, c in zip(names, cols, strict=True))
        )

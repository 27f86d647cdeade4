"""JobCheckpoint against real Redis: a batch job killed with SIGKILL resumes near where it died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from streamer.checkpoint import JobCheckpoint
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]


def _effects(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _job(redis_url: str, job_id: str, total: int, every: int, effects: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.jobs.checkpointed_job",
            redis_url,
            job_id,
            str(total),
            str(every),
            str(effects),
            "20",  # microseconds of work per record: slow enough to be killed mid-run
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_killed_job_resumes_within_one_interval_and_completes(redis_url: str, tmp_path: Path) -> None:
    job_id, total, every = f"job-{uuid.uuid4().hex[:8]}", 200_000, 500
    effects = tmp_path / "effects"
    first = _job(redis_url, job_id, total, every, effects)
    try:
        wait_for(lambda: _count(effects) >= 87_000, timeout=60, message="job reached record 87,000")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
        first.communicate()
    done_before_kill = len(_effects(effects))
    assert done_before_kill < total, "the job finished before it could be killed"

    second = _job(redis_url, job_id, total, every, effects)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0
    resumed = int(out.split()[1])

    seen = _effects(effects)
    assert set(seen) == set(range(total)), "every record was processed"
    assert done_before_kill - every <= resumed <= done_before_kill
    assert len(seen) - total == done_before_kill - resumed, "re-done records are those after the checkpoint"
    assert redis.Redis.from_url(redis_url).get(f"streamer:job:{job_id}") is None, "completed job left no key"


def test_checkpoint_saves_on_interval_and_on_exception(redis_url: str) -> None:
    client: redis.Redis = redis.Redis.from_url(redis_url)
    checkpoint = JobCheckpoint(client, f"unit-{uuid.uuid4().hex[:8]}", every_records=3, every_seconds=0)
    assert checkpoint.position() is None
    assert [checkpoint.advance(n) for n in (1, 2, 3, 4)] == [False, False, True, False]
    assert JobCheckpoint(client, checkpoint.key.rsplit(":", 1)[1]).position() == 3

    def crash_after_advancing() -> None:
        with checkpoint:
            checkpoint.advance(5)
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        crash_after_advancing()
    assert checkpoint.position() == 5, "an exception saves the latest position"
    with checkpoint:
        checkpoint.advance(6)
    assert checkpoint.position() is None, "a clean exit completes the job"

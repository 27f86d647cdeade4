"""A Redis-backed job checkpoint for batch jobs over sources other than Kafka.

The brief's CheckpointedProcessor as a reusable helper: read the saved position on start, save it
every N records or T seconds (whichever first), delete it when the job completes::

    checkpoint = JobCheckpoint.from_url("redis://127.0.0.1:6379/0", "nssf-migration", every_records=500)
    start = checkpoint.position() or 0
    for offset in range(start, total):
        process(offset)
        checkpoint.advance(offset + 1)   # the position to resume from: the next record to do
    checkpoint.complete()

A crash re-runs at most one interval of records; pair it with idempotent processing (for example
the dedup store) to make re-running harmless.
"""

from __future__ import annotations

import json
import time
from types import TracebackType

import redis


class JobCheckpoint:
    """The saved position of one job, in one Redis key."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        *,
        every_records: int = 1000,
        every_seconds: float = 5.0,
        namespace: str = "streamer:job",
    ) -> None:
        if not job_id:
            raise ValueError("job_id must be a non-empty string")
        if every_records < 0 or every_seconds < 0:
            raise ValueError("every_records and every_seconds must be >= 0 (0 turns one off)")
        self._client = client
        self.key = f"{namespace}:{job_id}"
        self._every_records = every_records
        self._every_seconds = every_seconds
        self._since_save = 0
        self._last_save = time.monotonic()
        self._position: int | None = None
        self.saves = 0

    @classmethod
    def from_url(
        cls, url: str, job_id: str, *, every_records: int = 1000, every_seconds: float = 5.0
    ) -> JobCheckpoint:
        """Connect to ``redis://`` / ``rediss://`` and return the checkpoint of ``job_id``."""
        return cls(
            redis.Redis.from_url(url), job_id, every_records=every_records, every_seconds=every_seconds
        )

    def position(self) -> int | None:
        """The saved position (the next record to process), or None if the job never saved one."""
        raw = self._client.get(self.key)
        if raw is None:
            return None
        self._position = int(json.loads(raw)["position"])
        return self._position

    def advance(self, position: int) -> bool:
        """Note that everything before ``position`` is done; save if the interval is due.

        Returns True when it saved.
        """
        self._position = position
        self._since_save += 1
        due_records = self._every_records and self._since_save >= self._every_records
        due_time = self._every_seconds and time.monotonic() - self._last_save >= self._every_seconds
        if due_records or due_time:
            self.save()
            return True
        return False

    def save(self) -> None:
        """Save the current position now."""
        if self._position is None:
            return
        payload = {"position": self._position, "saved_at": time.time()}
        self._client.set(self.key, json.dumps(payload))
        self._since_save = 0
        self._last_save = time.monotonic()
        self.saves += 1

    def complete(self) -> None:
        """The job finished: delete its checkpoint so that the next run starts from the beginning."""
        self._client.delete(self.key)
        self._position = None

    def __enter__(self) -> JobCheckpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On an exception keep (and save) the position so a restart resumes; on success, complete.
        if exc_type is None:
            self.complete()
        else:
            self.save()

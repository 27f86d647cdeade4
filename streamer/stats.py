"""Counters of one worker run: read by the progress display, the metrics and the tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class WorkerStats:
    """Plain counters the loop bumps; cheap on the hot path, read from other threads."""

    processed: int = 0
    dropped: int = 0
    failed: int = 0
    commits: int = 0
    commit_errors: int = 0
    rebalances: int = 0
    #: Records whose key was already done: the chain was skipped.
    dedup_hits: int = 0
    #: Claims found held by another live worker (waited for, never run concurrently).
    dedup_contested: int = 0
    #: Failed calls to the dedup store.
    dedup_errors: int = 0
    #: Records processed without dedup because the store was down and on_unavailable = "proceed".
    processed_without_dedup: int = 0
    #: Bounded runs: records to read in all assigned partitions, from their start to the end offsets.
    total: int | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        """Records finished in any way: handled, dropped or deduplicated."""
        return self.processed + self.dropped + self.dedup_hits

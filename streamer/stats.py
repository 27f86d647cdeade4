"""Counters of one worker run: read by the progress display, the metrics and the tests."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

#: Buckets (seconds) of the handler and commit duration histograms.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Histogram:
    """A histogram cheap enough for the hot path: a bisect and three increments, no lock.

    prometheus-client's Histogram takes a lock and walks its buckets in Python on every observe;
    the worker observes one per record, so it keeps its own and exports it at scrape time.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations <= it), ending with +Inf."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Recent(Generic[T]):
    """The last ``size`` items of a kind, oldest first: added by any thread, read by another.

    For rare events (errors, dead-lettered records, commits), never per record: ``add`` takes a
    lock so that a reader on the HTTP thread copies a consistent list.
    """

    __slots__ = ("_items", "_lock", "total")

    def __init__(self, size: int) -> None:
        self._items: deque[T] = deque(maxlen=size)
        self._lock = threading.Lock()
        #: Items added over the run, also those the buffer no longer holds.
        self.total = 0

    def add(self, item: T) -> None:
        """Keep ``item``, forgetting the oldest one when full."""
        with self._lock:
            self._items.append(item)
            self.total += 1

    def items(self) -> list[T]:
        """A copy of the items kept, oldest first."""
        with self._lock:
            return list(self._items)


@dataclass(frozen=True, slots=True)
class Incident:
    """An error the worker met: a record's failed attempt, a failed commit, a store outage.

    ``text`` never quotes a record: for a record's failure it names the exception types only
    (an application's message may quote the value); the log line has the whole message.
    """

    #: Epoch seconds.
    at: float
    #: "record", "commit", "dead-letter", "dedup" or "offsets".
    kind: str
    text: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A record parked in its dead-letter topic: where it was, why, when; never its key or value."""

    #: Epoch seconds.
    at: float
    topic: str
    partition: int
    offset: int
    #: The exception types that parked it, outermost first (e.g. "PermanentError: ValueError").
    reason: str
    dead_letter_topic: str
    attempts: int


def error_types(exc: BaseException) -> str:
    """The types of ``exc`` and of what caused it, outermost first: ``PermanentError: ValueError``.

    Only names: an exception's message may quote the record it failed on.
    """
    names: list[str] = []
    seen: object = exc
    while isinstance(seen, BaseException) and len(names) < 4:
        names.append(type(seen).__name__)
        # RetryRecord and RecordFailed carry their cause as .cause, not always as __cause__.
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return ": ".join(names)


#: Errors and dead-lettered records the status page shows.
RECENT_SIZE = 20
#: Commit times kept for the commit rate (a minute of commits at 4 per second).
COMMIT_TIMES = 256


@dataclass
class TopicStats:
    """Per-topic counters by outcome, and the handler duration histogram."""

    ok: int = 0
    dropped: int = 0
    deduplicated: int = 0
    dead_lettered: int = 0
    failed: int = 0
    #: Records at offsets this group had already processed before (a crash or a handover).
    reprocessed: int = 0
    #: Records an earlier owner finished out of order (its commit's offset map): not run again.
    skipped: int = 0
    #: Attempts that ran past their per-attempt timeout by more than a grace period: blocked
    #: outside Python code (a C call, a busy coroutine), where the timeout cannot interrupt them.
    overruns: int = 0
    #: Seconds after which an attempt counts as an overrun (the timeout plus a grace); 0: none.
    overrun_after: float = 0.0
    handler_seconds: Histogram = field(default_factory=Histogram)


@dataclass
class WorkerStats:
    """Plain counters the loop bumps; cheap on the hot path, read from other threads."""

    #: Attempts scheduled for a later retry.
    retries: int = 0
    commits: int = 0
    commit_errors: int = 0
    rebalances: int = 0
    #: Claims found held by another live worker (waited for, never run concurrently).
    dedup_contested: int = 0
    #: Failed calls to the dedup store.
    dedup_errors: int = 0
    #: Restarts of the dedup Redis that lost its data (run id changed, the group's marker gone).
    dedup_store_resets: int = 0
    #: Records processed without dedup because the store was down and on_unavailable = "proceed".
    processed_without_dedup: int = 0
    #: Bounded runs: records to read in all assigned partitions, from their start to the end offsets.
    total: int | None = None
    started_at: float = field(default_factory=time.monotonic)
    topics: dict[str, TopicStats] = field(default_factory=dict)
    #: Commit round trips: steady-state commits, and the revoke / final ones.
    commit_seconds_steady: Histogram = field(default_factory=Histogram)
    commit_seconds_final: Histogram = field(default_factory=Histogram)
    assigned: int = 0
    revoked: int = 0
    lost: int = 0
    #: Offsets found going backwards inside an assignment (a reset, a recreated topic).
    offset_resets: int = 0
    #: True while work at risk is at its bound and the worker takes no records (commits failing).
    checkpoint_blocked: bool = False
    #: monotonic() of the last poll; liveness is "polled within max.poll.interval.ms".
    last_poll: float = field(default_factory=time.monotonic)
    #: Outputs acknowledged, by topic; delivery failures; waits for room in the producer.
    outputs: dict[str, int] = field(default_factory=dict)
    output_errors: int = 0
    output_waits: int = 0
    #: Seconds from produce() to the acknowledgement of an output.
    output_seconds: Histogram = field(default_factory=Histogram)
    #: Exactly-once: transactions committed and aborted, and how long each was open.
    transactions: int = 0
    transactions_aborted: int = 0
    transaction_seconds: Histogram = field(default_factory=Histogram)
    #: The last errors and dead-lettered records, and when the last commits landed (monotonic).
    errors: Recent[Incident] = field(default_factory=lambda: Recent(RECENT_SIZE))
    dead_letters: Recent[DeadLettered] = field(default_factory=lambda: Recent(RECENT_SIZE))
    commit_times: Recent[float] = field(default_factory=lambda: Recent(COMMIT_TIMES))

    def error(
        self,
        kind: str,
        text: str,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        """Keep an error for the status page (``text`` must not quote a record)."""
        self.errors.add(Incident(time.time(), kind, text, topic, partition, offset))

    # Totals over topics: the loop counts per topic only (one increment per record).

    @property
    def processed(self) -> int:
        """Records whose chain succeeded."""
        return sum(t.ok for t in list(self.topics.values()))

    @property
    def dropped(self) -> int:
        """Records dropped on purpose (DropRecord)."""
        return sum(t.dropped for t in list(self.topics.values()))

    @property
    def dedup_hits(self) -> int:
        """Records whose key was already done: the chain was skipped."""
        return sum(t.deduplicated for t in list(self.topics.values()))

    @property
    def skipped(self) -> int:
        """Records skipped because an earlier owner's offset map says they finished."""
        return sum(t.skipped for t in list(self.topics.values()))

    @property
    def dead_lettered(self) -> int:
        """Records parked in a dead-letter topic."""
        return sum(t.dead_lettered for t in list(self.topics.values()))

    @property
    def failed(self) -> int:
        """Records that failed with nothing to park them (the worker stopped)."""
        return sum(t.failed for t in list(self.topics.values()))

    @property
    def finished(self) -> int:
        """Records finished in any way: handled, dropped, deduplicated or parked."""
        return self.processed + self.dropped + self.dedup_hits + self.dead_lettered + self.skipped

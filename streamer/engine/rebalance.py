"""The rebalance listener: the only code that creates and retires partition states.

Its callbacks run inside the loop's poll. Each one is wrapped so that an error in it (the
broker slow to answer ``committed()``, Redis down while loading high-water marks) is logged and
absorbed: a partition always gets a state, fetches, and is committed normally.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog
from confluent_kafka import KafkaException

from streamer.engine.checkpoint import Checkpoint
from streamer.engine.offsetmap import decode
from streamer.engine.outputs import TransactionFailedError
from streamer.engine.partition import TP, PartitionState, take_finished
from streamer.engine.processor import Processor
from streamer.highwater import HighWaterStore
from streamer.source import Committed, Source
from streamer.stats import WorkerStats

if TYPE_CHECKING:
    from streamer.commit import CommitPolicy

log = structlog.get_logger("streamer.rebalance")


class RebalanceListener:
    """Assigns, revokes and loses partitions: builds their states, commits them on the way out."""

    def __init__(
        self,
        source: Source,
        states: dict[TP, PartitionState],
        processor: Processor,
        checkpoint: Checkpoint,
        stats: WorkerStats,
        *,
        until_end: bool,
        earliest: bool,
        highwater: HighWaterStore | None,
        settle_timeout: float,
        run_start: str,
        on_retired: Callable[[PartitionState], None],
        on_handover: Callable[[list[TP]], None] | None = None,
    ) -> None:
        self._source = source
        self._states = states
        self._processor = processor
        self._checkpoint = checkpoint
        self._stats = stats
        self._until_end = until_end
        self._earliest = earliest
        self._highwater = highwater
        self._settle_timeout = settle_timeout
        self._run_start = run_start
        #: Earlier runs whose end the policy has learned from (each counts once).
        self._observed: set[str] = set()
        self._on_retired = on_retired
        self._on_handover = on_handover
        self.ever_assigned = False
        self.joined = False
        #: Set during the final close: the last commit already recorded a clean stop.
        self.closing = False
        self.member = MemberId(source, stats)

    def on_assign(self, partitions: list[TP]) -> None:
        """New partitions: a fresh state each, fetching (librdkafka keeps an old pause flag)."""
        self._stats.rebalances += 1
        self._stats.assigned += 1
        self.ever_assigned = self.joined = True
        if not partitions:
            return
        committed = self._committed(partitions)
        marks: dict[TP, int] = {}
        if self._highwater is not None:
            try:
                marks = self._highwater.load(partitions)
            except Exception as exc:  # noqa: BLE001 - only a metric depends on them; never the assignment
                log.warning("could not load processed high-water marks", error=repr(exc))
        for tp in partitions:
            start = committed[tp].offset if tp in committed else None
            end, done = self._end_offset(tp, start) if self._until_end else (None, False)
            state = PartitionState(tp, start, end=end)
            state.done = done
            state.reprocess_below = marks.get(tp, -1) + 1
            if start is not None and tp in committed:
                state.skip = self._skip(tp, start, committed[tp].metadata)
            self._states[tp] = state
        # A partition paused when it was revoked stays paused in librdkafka when assigned back.
        self._guard("resume", lambda: self._source.resume(list(partitions)))
        log.info(
            "partitions assigned",
            partitions=show_tps(partitions),
            resume_from={f"{t}[{p}]": c.offset for (t, p), c in sorted(committed.items())},
        )

    @staticmethod
    def _skip(tp: TP, start: int, metadata: str | None) -> frozenset[int]:
        """The offsets above ``start`` that the last owner finished (its commit's offset map)."""
        text = parse_metadata(metadata).get("map")
        if not text:
            return frozenset()
        try:
            return decode(start, text)
        except ValueError as exc:
            # Re-running those records is safe (at least once); skipping wrong ones would not be.
            log.warning("ignoring an unreadable offset map", partition=f"{tp[0]}[{tp[1]}]", error=str(exc))
            return frozenset()

    def _committed(self, partitions: list[TP]) -> Mapping[TP, Committed]:
        try:
            committed = self._source.committed(partitions)
        except KafkaException as exc:
            log.warning("could not read committed offsets at assignment", error=str(exc))
            return {}
        self._observe_failures(committed)
        return committed

    def _end_offset(self, tp: TP, start: int | None) -> tuple[int | None, bool]:
        """Bounded runs: the partition's end offset, and whether it is reached already."""
        try:
            low, high = self._source.watermarks(tp)
        except KafkaException as exc:
            log.warning("could not read the end offset; bounded run waits", error=str(exc))
            return None, False
        first = start if start is not None else (low if self._earliest else high)
        self._stats.total = (self._stats.total or 0) + max(high - first, 0)
        return high, first >= high

    def on_revoke(self, partitions: list[TP]) -> None:
        """Hand partitions over: let their running record finish, land marks, commit, retire."""
        self._stats.rebalances += 1
        self._stats.revoked += 1
        mine = [self._states[tp] for tp in partitions if tp in self._states]
        for state in mine:
            state.revoked = True
        settled = not mine or self._processor.settle(mine, self._settle_timeout)
        if not settled:
            log.warning(
                "a record of a revoked partition is still running; handing over what finished",
                waited_seconds=self._settle_timeout,
            )
        if mine and not self.closing:
            states = {state.tp: state for state in mine}
            for state in mine:
                take_finished(state)
            self._guard("commit on revoke", lambda: self._checkpoint.commit(states, reason="handoff") or None)
        for state in mine:
            del self._states[state.tp]
            self._on_retired(state)
        handover = self._on_handover
        if settled and mine and handover is not None:
            # Nothing of them runs here any more: the next owner need not wait for the leases.
            # (A record still running keeps its lease renewed until it ends, then it expires.)
            self._guard("release the dedup leases", lambda: handover([s.tp for s in mine]))
        log.info("partitions revoked", partitions=show_tps(partitions))

    def on_lost(self, partitions: list[TP]) -> None:
        """Partitions taken away without a handover: another worker may own them; never commit."""
        self._stats.rebalances += 1
        self._stats.lost += 1
        gone = []
        for tp in partitions:
            state = self._states.pop(tp, None)
            if state is not None:
                state.revoked = True
                gone.append(state)
                self._on_retired(state)
        if gone:
            self._processor.lost(gone)
        log.warning("partitions lost", partitions=show_tps(partitions))
        if self._checkpoint.transaction is not None and self._checkpoint.fatal is None:
            # The open transaction may hold outputs of records the new owner runs again: it must
            # never commit. The worker aborts it and stops; its restart resumes at the last commit.
            self._checkpoint.fatal = TransactionFailedError(
                "partitions lost (fenced): the open transaction is aborted, nothing more is committed"
            )

    def _observe_failures(self, committed: Mapping[TP, Committed]) -> None:
        """Count earlier runs that stopped without a clean commit: the adaptive policy's MTBF.

        A run's last commit says ``state=running`` when it never stopped cleanly. It died after
        that commit, before the next was due (``every`` seconds later) and before now: its up time
        is taken as its start to that commit plus half an interval, or to now if that is sooner
        (a restarted worker assigned at once). The commit also carries what that run had learned
        (``up``/``fails``): the policy takes it over, then adds this failure.
        """
        policy: CommitPolicy = self._checkpoint.policy
        now = time.time()
        failed_runs: dict[str, float] = {}
        for entry in committed.values():
            meta = parse_metadata(entry.metadata)
            run = meta.get("run_start")
            if run is None or run == self._run_start or run in self._observed:
                continue
            try:
                if "fails" in meta and "up" in meta:
                    policy.carry(float(meta["up"]), int(meta["fails"]))
                if meta.get("state") == "running" and "at" in meta:
                    started, last = float(run), float(meta["at"])
                    uptime = min(now, last + float(meta.get("every", 0)) / 2) - started
                    failed_runs[run] = max(uptime, failed_runs.get(run, 0.0))
            except ValueError:
                continue  # not streamer's numbers: learn nothing from it
        for run, uptime in failed_runs.items():
            self._observed.add(run)
            log.info("earlier run ended without a clean stop", uptime_seconds=round(uptime, 3))
            policy.failure_observed(uptime)

    @staticmethod
    def _guard(what: str, call: Callable[[], object]) -> None:
        """Run ``call``; an error inside a rebalance callback is logged, never raised into poll."""
        try:
            call()
        except Exception as exc:
            log.exception("error in a rebalance callback", step=what, error=str(exc))


class MemberId:
    """The consumer's member id in its group, read by the loop after each rebalance event.

    librdkafka's memberid() is a round trip to its own main thread (~50 us), and called from
    another thread it waits while the loop is inside consume(): the loop reads it between polls
    (``refresh``) once per rebalance event, and each second until it is known; any thread reads
    ``value``.
    """

    __slots__ = ("_at", "_events", "_source", "_stats", "value")

    def __init__(self, source: Source, stats: WorkerStats) -> None:
        self._source = source
        self._stats = stats
        self._events = -1
        self._at = 0.0
        #: The member id, or None before the first join (or when the source has none).
        self.value: str | None = None

    def refresh(self, now: float) -> None:
        """Read the member id again if a rebalance happened since (loop thread; ``now`` monotonic)."""
        stats = self._stats
        events = stats.assigned + stats.revoked + stats.lost
        if events == self._events and (self.value is not None or now - self._at < 1.0):
            return
        self._events, self._at = events, now
        # KafkaSource.member_id(); a source without one (MemorySource) has no member id.
        ask = getattr(self._source, "member_id", None)
        if ask is None:
            return
        try:
            member = ask()
        except (RuntimeError, KafkaException):  # the consumer is closed
            member = None
        self.value = member if isinstance(member, str) and member else None


def parse_metadata(metadata: str | None) -> dict[str, str]:
    """The fields of streamer's commit metadata (``streamer/1 key=value ...``)."""
    if not metadata or not metadata.startswith("streamer/1 "):
        return {}
    return dict(part.split("=", 1) for part in metadata.split()[1:] if "=" in part)


def show_tps(partitions: list[TP]) -> list[str]:
    """Partitions as ``topic[partition]``, for log lines."""
    return [f"{t}[{p}]" for t, p in sorted(partitions)]

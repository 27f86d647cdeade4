"""Commit policies: when the worker checkpoints its offsets.

Committing every record costs throughput; committing rarely costs re-work after every crash. A
policy answers one question per finished record, cheaply: is a commit due now?
"""

from __future__ import annotations

import math
from typing import Protocol

import structlog

from streamer.settings import CommitSettings

log = structlog.get_logger("streamer.commit")


class CommitPolicy(Protocol):
    """Decides when a commit is due, and learns from the commits made."""

    def due(self, records_since_commit: int, seconds_since_commit: float) -> bool:
        """Say whether to commit now."""
        ...

    def committed(self, cost_seconds: float) -> None:
        """Learn that a commit cost the processing ``cost_seconds`` (see ``Checkpoint``)."""
        ...

    def failure_observed(self, uptime_seconds: float) -> None:
        """Learn that a previous run ended without a clean stop after ``uptime_seconds``."""
        ...

    def carry(self, uptime_seconds: float, failures: int) -> None:
        """Take over what an earlier run had learned: its failed runs' total up time and count."""
        ...

    @property
    def learned(self) -> tuple[float, int]:
        """The failed runs' total up time and count learned so far (carried in commit metadata)."""
        ...

    @property
    def every_records(self) -> int:
        """Records between commits (0: not counted)."""
        ...

    @property
    def every_seconds(self) -> float:
        """Seconds between commits (0: not timed)."""
        ...


class IntervalPolicy:
    """Commit every N records or every T seconds, whichever comes first; 0 turns either off."""

    def __init__(self, every_records: int, every_seconds: float) -> None:
        self._records = every_records or math.inf
        self._seconds = every_seconds or math.inf
        self._every_records = every_records
        self._every_seconds = every_seconds

    def due(self, records_since_commit: int, seconds_since_commit: float) -> bool:
        """Say whether to commit now."""
        return records_since_commit >= self._records or (
            records_since_commit > 0 and seconds_since_commit >= self._seconds
        )

    def committed(self, cost_seconds: float) -> None:
        """A fixed interval learns nothing."""

    def failure_observed(self, uptime_seconds: float) -> None:
        """A fixed interval learns nothing."""

    def carry(self, uptime_seconds: float, failures: int) -> None:
        """A fixed interval learns nothing."""

    @property
    def learned(self) -> tuple[float, int]:
        """Nothing learned."""
        return 0.0, 0

    @property
    def every_records(self) -> int:
        """Records between commits (0: not counted)."""
        return self._every_records

    @property
    def every_seconds(self) -> float:
        """Seconds between commits (0: not timed)."""
        return self._every_seconds


class AdaptivePolicy(IntervalPolicy):
    """Pick the commit interval by Young's rule: T = sqrt(2 x commit cost x MTBF), within bounds.

    The commit cost is what a commit takes from the processing, not its round trip: the engine
    commits from the loop thread while the processing thread goes on with the records handed
    over, so a 7 ms round trip may cost the records 0.1 ms (the loop's own CPU time for the
    commit, plus any time the processing thread sat idle meanwhile; measured by the checkpoint,
    a moving average here). Until a commit is measured, ``PRIOR_COST_S`` stands in.

    The MTBF starts from the setting; once failed runs are observed (an earlier run's last
    commit says ``state=running``), it is their mean up time, over the last ``MEMORY`` failures.
    What was learned travels in the commit metadata, so that each run starts from all the
    failures before it, not only the last one. ``every_records`` still caps the records at risk
    when set.
    """

    #: Weight of the newest commit in the moving average of commit cost.
    _ALPHA = 0.2
    #: The commit cost assumed until one is measured: about a commit's CPU time in the loop.
    PRIOR_COST_S = 0.0005
    #: Failures the learned MTBF averages over (older ones fade out).
    MEMORY = 32

    def __init__(self, settings: CommitSettings) -> None:
        self._min = settings.adaptive_min_seconds
        self._max = settings.adaptive_max_seconds
        self._mtbf = settings.mtbf_seconds
        self._cost: float | None = None
        self._uptime_total = 0.0
        self._failures = 0
        super().__init__(settings.every_records, self._choose())
        self._logged = self._every_seconds

    @staticmethod
    def young_interval(cost_seconds: float, mtbf_seconds: float) -> float:
        """Young's optimal checkpoint interval for a checkpoint cost and a mean time between failures."""
        return math.sqrt(2.0 * cost_seconds * mtbf_seconds)

    def due(self, records_since_commit: int, seconds_since_commit: float) -> bool:
        """Say whether to commit now: at once when nothing is measured yet, then on the interval.

        The first commit of a run measures the cost, and it leaves the run's start in the commit
        metadata: a run that crashes before its first interval ends is then still seen by the
        next one (else a crash loop shorter than the prior interval would never commit at all).
        """
        if self._cost is None:
            return records_since_commit > 0
        return super().due(records_since_commit, seconds_since_commit)

    def committed(self, cost_seconds: float) -> None:
        """Fold a measured commit cost into the average and re-pick the interval."""
        if cost_seconds < 0:
            return
        self._cost = (
            cost_seconds
            if self._cost is None
            else (self._ALPHA * cost_seconds + (1 - self._ALPHA) * self._cost)
        )
        self._set_seconds(self._choose())

    def failure_observed(self, uptime_seconds: float) -> None:
        """Learn the MTBF from a restart after a failure."""
        self._failures += 1
        self._uptime_total += max(uptime_seconds, 0.0)
        if self._failures > self.MEMORY:
            self._uptime_total *= self.MEMORY / self._failures
            self._failures = self.MEMORY
        self._learn()

    def carry(self, uptime_seconds: float, failures: int) -> None:
        """Take over an earlier run's history when it knows of more failures than this one."""
        if failures > self._failures and uptime_seconds >= 0:
            self._uptime_total, self._failures = uptime_seconds, min(failures, self.MEMORY)
            self._learn()

    @property
    def learned(self) -> tuple[float, int]:
        """The failed runs' total up time and count learned so far."""
        return self._uptime_total, self._failures

    @property
    def cost_seconds(self) -> float | None:
        """The measured commit cost (a moving average); None until a commit was measured."""
        return self._cost

    @property
    def mtbf_seconds(self) -> float:
        """The mean time between failures in use: the setting until failed runs are observed."""
        return self._mtbf

    def _learn(self) -> None:
        self._mtbf = max(self._uptime_total / self._failures, 1.0)
        self._set_seconds(self._choose())

    def _choose(self) -> float:
        cost = self.PRIOR_COST_S if self._cost is None else self._cost
        return min(self._max, max(self._min, self.young_interval(cost, self._mtbf)))

    def _set_seconds(self, seconds: float) -> None:
        # Apply every change; log one only when the interval moved 10 % or more from the last one
        # logged, so that noise in the measured commit cost stays quiet.
        self._every_seconds = seconds
        self._seconds = seconds
        if abs(seconds - self._logged) >= 0.1 * self._logged:
            log.info(
                "commit interval changed",
                every_seconds=round(seconds, 3),
                previous_seconds=round(self._logged, 3),
                commit_cost_ms=None if self._cost is None else round(self._cost * 1000, 3),
                mtbf_seconds=round(self._mtbf, 1),
            )
            self._logged = seconds


def policy_from_settings(settings: CommitSettings) -> CommitPolicy:
    """Build the commit policy the settings ask for."""
    if settings.policy == "adaptive":
        return AdaptivePolicy(settings)
    return IntervalPolicy(settings.every_records, settings.every_seconds)

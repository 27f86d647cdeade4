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
        """Learn that a commit took ``cost_seconds`` from request to acknowledgement."""
        ...

    def failure_observed(self, uptime_seconds: float) -> None:
        """Learn that a previous run ended without a clean stop after ``uptime_seconds``."""
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

    The commit cost is a moving average of measured commit round trips; the MTBF starts from the
    setting and, once restarts after failures are observed, becomes the observed uptime per failure.
    ``every_records`` still caps the records at risk when set.
    """

    #: Weight of the newest commit in the moving average of commit cost.
    _ALPHA = 0.2

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
        self._mtbf = max(self._uptime_total / self._failures, 1.0)
        self._set_seconds(self._choose())

    def _choose(self) -> float:
        if self._cost is None:
            return self._max  # nothing measured yet: commit at the outer bound until we know
        return min(self._max, max(self._min, self.young_interval(self._cost, self._mtbf)))

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

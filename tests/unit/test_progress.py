"""Progress.render: the status line drawn from a worker's counters."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from streamer import progress
from streamer.progress import Progress
from streamer.stats import TopicStats, WorkerStats


def make_stats(processed: int = 0, dropped: int = 0, **fields: object) -> WorkerStats:
    """WorkerStats whose one topic has ``processed`` ok and ``dropped`` records."""
    stats = WorkerStats(**fields)  # type: ignore[arg-type]
    stats.topics["t"] = TopicStats(ok=processed, dropped=dropped)
    return stats


NOW = 1_000.0


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``time.monotonic()`` inside streamer.progress return NOW, so rates are exact."""
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: NOW))


def render(stats: WorkerStats, width: int = 10) -> str:
    return Progress(stats, io.StringIO()).render(width=width)


def test_render_with_a_known_total_shows_bar_count_percent_rate_and_eta() -> None:
    stats = make_stats(processed=49_000, dropped=1_000, total=100_000, started_at=NOW - 10)
    assert render(stats) == "[#####-----] 50,000/100,000   50%  5,000 rec/s  ETA 0:10"


def test_render_counts_dropped_records_as_done() -> None:
    stats = make_stats(processed=0, dropped=25, total=100, started_at=NOW - 1)
    assert render(stats).startswith("[##--------] 25/100")


def test_render_eta_is_minutes_and_seconds() -> None:
    stats = make_stats(processed=1_000, total=100_000, started_at=NOW - 10)  # 100 rec/s, 990 s left
    assert render(stats).endswith("ETA 16:30")


def test_render_with_nothing_done_shows_an_unknown_eta() -> None:
    stats = make_stats(total=1_000, started_at=NOW - 5)
    assert render(stats) == "[----------] 0/1,000    0%  0 rec/s  ETA --:--"


def test_render_when_all_done_shows_a_full_bar() -> None:
    stats = make_stats(processed=1_000, total=1_000, started_at=NOW - 2)
    assert render(stats) == "[##########] 1,000/1,000  100%  500 rec/s  ETA 0:00"


def test_render_without_a_total_shows_count_and_rate_only() -> None:
    stats = make_stats(processed=12_000, dropped=345, started_at=NOW - 2)
    assert render(stats) == "12,345 records  6,172 rec/s"


def test_render_with_a_zero_total_shows_count_and_rate_only() -> None:
    stats = make_stats(processed=3, total=0, started_at=NOW - 1)
    assert render(stats) == "3 records  3 rec/s"


def test_render_uses_the_requested_bar_width() -> None:
    stats = make_stats(processed=1, total=4, started_at=NOW - 1)
    assert render(stats, width=30).startswith("[" + "#" * 7 + "-" * 23 + "]")


def test_render_reflects_counters_as_they_change() -> None:
    stats = make_stats(total=10, started_at=NOW - 1)
    display = Progress(stats, io.StringIO())
    assert "0/10" in display.render()
    stats.topics["t"].ok = 4
    assert "4/10" in display.render()


def test_stop_draws_the_final_state_on_its_own_line() -> None:
    out = io.StringIO()
    display = Progress(make_stats(processed=7, total=7, started_at=NOW - 1), out, interval=3600)
    display.start()
    display.stop()
    assert out.getvalue() == "[" + "#" * 30 + "] 7/7  100%  7 rec/s  ETA 0:00\n"

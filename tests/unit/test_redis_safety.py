"""The start-up checks of the dedup Redis, on the facts INFO gives."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from streamer.errors import ConfigError
from streamer.redis_safety import RedisFacts, UnsafeRedisError, check


def facts(
    policy: str = "noeviction", maxmemory: int = 0, *, aof: bool = True, rdb: bool | None = False
) -> RedisFacts:
    return RedisFacts("7.0.15", "run-1", policy, maxmemory, aof, rdb)


@pytest.mark.parametrize(
    "policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl"]
)
def test_a_policy_that_may_evict_marks_is_refused_naming_the_setting(policy: str) -> None:
    with pytest.raises(UnsafeRedisError, match=f"maxmemory-policy {policy}.*noeviction") as raised:
        check(facts(policy, 1 << 30), refuse=True)
    assert isinstance(raised.value, ConfigError)  # the CLI prints it and exits 2, no traceback


def test_in_warn_mode_an_evicting_policy_is_logged_as_an_error() -> None:
    with capture_logs() as logs:
        check(facts("allkeys-lru", 1 << 30), refuse=False)
    assert [(e["event"], e["log_level"], e["policy"]) for e in logs] == [
        ("dedup Redis may evict marks", "error", "allkeys-lru")
    ]


def test_without_maxmemory_no_policy_evicts() -> None:
    with capture_logs() as logs:
        check(facts("allkeys-lru", 0), refuse=True)
    assert logs == []


def test_no_persistence_at_all_is_a_loud_error_never_a_refusal() -> None:
    with capture_logs() as logs:
        check(facts(aof=False, rdb=False), refuse=True)
    assert [(e["event"], e["log_level"]) for e in logs] == [("dedup Redis has no persistence", "error")]


@pytest.mark.parametrize(("aof", "rdb"), [(True, False), (False, True), (True, None)])
def test_aof_or_rdb_snapshots_count_as_persistence(aof: bool, rdb: bool | None) -> None:
    with capture_logs() as logs:
        check(facts(aof=aof, rdb=rdb), refuse=True)
    assert logs == []


def test_an_unreadable_save_setting_without_aof_is_a_warning() -> None:
    with capture_logs() as logs:
        check(facts(aof=False, rdb=None), refuse=True)
    assert [e["log_level"] for e in logs] == ["warning"]

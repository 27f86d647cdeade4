"""Start-up checks of the dedup Redis: would it silently lose marks?

A mark that Redis drops makes a re-read record run again, with no error anywhere. Two settings do
it quietly: an eviction policy that may evict our keys once ``maxmemory`` is reached (every
``allkeys-*`` policy, and every ``volatile-*`` one, since all our keys carry a TTL), and no
persistence at all (a restart empties the store). A third loss is seen only while running: a
Redis restart that came back without the data, found by its run id changing and the group's
marker key being gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import structlog

from streamer.errors import ConfigError

log = structlog.get_logger("streamer.dedup")


class UnsafeRedisError(ConfigError):
    """The dedup Redis is configured to lose marks (and ``[dedup] redis_checks = "refuse"``)."""


@dataclass(frozen=True)
class RedisFacts:
    """What the checks found out."""

    version: str
    run_id: str
    eviction_policy: str
    maxmemory: int
    aof: bool
    rdb_saves: bool | None  # None: CONFIG GET refused (managed Redis)

    @property
    def may_evict(self) -> bool:
        """Whether Redis may evict dedup keys under memory pressure."""
        return self.maxmemory > 0 and self.eviction_policy != "noeviction"

    @property
    def persistent(self) -> bool | None:
        """Whether a restart keeps the marks (None: unknown)."""
        if self.aof:
            return True
        return self.rdb_saves


def facts(client: redis.Redis) -> RedisFacts:
    """Read what the checks need (INFO, and CONFIG GET save where allowed)."""
    info: dict[str, Any] = client.info("server") | client.info("memory") | client.info("persistence")
    try:
        save = client.config_get("save").get("save")
        rdb: bool | None = bool(str(save or "").strip())
    except redis.ResponseError:
        rdb = None
    return RedisFacts(
        version=str(info.get("redis_version", "?")),
        run_id=str(info.get("run_id", "")),
        eviction_policy=str(info.get("maxmemory_policy", "noeviction")),
        maxmemory=int(info.get("maxmemory", 0) or 0),
        aof=bool(int(info.get("aof_enabled", 0) or 0)),
        rdb_saves=rdb,
    )


def check(found: RedisFacts, *, refuse: bool) -> None:
    """Refuse (or warn) when Redis may evict marks; warn loudly when it keeps none across a restart."""
    if found.may_evict:
        text = (
            f"the dedup Redis has maxmemory-policy {found.eviction_policy} with maxmemory "
            f"{found.maxmemory}: it may evict dedup marks, and a re-read record whose mark was "
            'evicted runs again. Set maxmemory-policy noeviction on it (or [dedup] redis_checks = "warn")'
        )
        if refuse:
            raise UnsafeRedisError(text)
        log.error(
            "dedup Redis may evict marks",
            policy=found.eviction_policy,
            maxmemory=found.maxmemory,
            consequence="a re-read record whose mark was evicted runs again",
            fix="maxmemory-policy noeviction",
        )
    if found.persistent is False:
        log.error(
            "dedup Redis has no persistence",
            consequence="a restart loses every mark; records re-read after it run again",
            fix="appendonly yes (see the README)",
        )
    elif found.persistent is None:
        log.warning("could not read the dedup Redis' save setting (CONFIG GET refused); persistence unknown")

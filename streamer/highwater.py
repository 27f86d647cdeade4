"""Processed high-water marks: per partition, the highest offset the group ever started.

Kept in Redis, written once per poll batch, so they survive a crash. After a restart or a handover
the new owner counts every record below the mark as *reprocessed*: the work a crash (or a
rebalance) cost. Best effort: a failure here is logged and never stops processing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import redis
import structlog
from redis.exceptions import RedisClusterException

log = structlog.get_logger("streamer.highwater")

TP = tuple[str, int]

_SAVE = """
local ttl = tonumber(ARGV[#ARGV])
for i, key in ipairs(KEYS) do
  local new = tonumber(ARGV[i])
  local cur = tonumber(redis.call('GET', key) or '-1')
  if new > cur then
    redis.call('SET', key, ARGV[i], 'PX', ttl)
  else
    redis.call('PEXPIRE', key, ttl)
  end
end
return #KEYS
"""


class HighWaterStore:
    """Reads and raises the processed high-water marks of one consumer group."""

    _QUIET_SECONDS = 60.0

    def __init__(self, client: redis.Redis, namespace: str, group: str, ttl_seconds: float) -> None:
        self._client = client
        # Not under the dedup keys' "<namespace>:{<group>}:" prefix: no idempotency key can collide.
        self._prefix = f"{namespace}:hwm:{{{group}}}:"
        self._save = client.register_script(_SAVE)
        self._ttl_ms = int(ttl_seconds * 1000)
        self._last_warning = 0.0
        self.errors = 0

    def _key(self, tp: TP) -> str:
        return f"{self._prefix}{tp[0]}:{tp[1]}"

    def load(self, partitions: Sequence[TP]) -> dict[TP, int]:
        """The marks of ``partitions`` (absent when never written); one round trip."""
        if not partitions:
            return {}
        try:
            values = self._client.mget([self._key(tp) for tp in partitions])
        except (redis.RedisError, RedisClusterException) as exc:
            self._warn("could not read processed high-water marks", exc)
            return {}
        return {tp: int(v) for tp, v in zip(partitions, values, strict=True) if v is not None}

    def save(self, marks: Mapping[TP, int]) -> None:
        """Raise the marks to ``marks`` where higher; one round trip."""
        if not marks:
            return
        keys = [self._key(tp) for tp in marks]
        try:
            self._save(keys=keys, args=[*marks.values(), self._ttl_ms])
        except (redis.RedisError, RedisClusterException) as exc:
            self._warn("could not save processed high-water marks", exc)

    def _warn(self, what: str, exc: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_warning >= self._QUIET_SECONDS:
            self._last_warning = now
            log.warning(what, error=str(exc), effect="the reprocessed-records metric may undercount")

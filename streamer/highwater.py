"""Processed high-water marks: per partition, the highest offset the group ever started.

Kept in Redis, written once per poll batch, so they survive a crash. After a restart or a handover
the new owner counts every record below the mark as *reprocessed*: the work a crash (or a
rebalance) cost. Best effort: a failure here is logged and never stops processing. A save is
written to a connection of its own without waiting for the reply (read at a later save): the
poll batch never waits a round trip for a metric.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import structlog
from redis.exceptions import RedisClusterException

from streamer.resp import dedicated_connection, load, packed, script_sha

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
_SAVE_SHA = script_sha(_SAVE)
#: Replies left unread before a save waits for them (Redis that slow is a problem of its own).
_MAX_UNREAD = 64


class HighWaterStore:
    """Reads and raises the processed high-water marks of one consumer group."""

    _QUIET_SECONDS = 60.0

    def __init__(self, client: redis.Redis, namespace: str, group: str, ttl_seconds: float) -> None:
        self._client = client
        # Not under the dedup keys' "<namespace>:{<group>}:" prefix: no idempotency key can collide.
        self._prefix = f"{namespace}:hwm:{{{group}}}:"
        self._ttl_ms = int(ttl_seconds * 1000)
        self._last_warning = 0.0
        self.errors = 0
        self._conn: Any = None
        self._unread = 0

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
        """Raise the marks to ``marks`` where higher; sent without waiting for the reply."""
        if not marks:
            return
        keys = [self._key(tp).encode() for tp in marks]
        args = [b"EVALSHA", _SAVE_SHA, b"%d" % len(keys), *keys, *(b"%d" % v for v in marks.values())]
        try:
            conn = self._connection()
            while self._unread and (self._unread > _MAX_UNREAD or conn.can_read(timeout=0)):
                self._read(conn)  # an earlier save's reply
            conn.send_packed_command([packed([*args, b"%d" % self._ttl_ms])], check_health=False)
            self._unread += 1
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            self._drop()
            self._warn("could not save processed high-water marks", exc)

    def _read(self, conn: Any) -> None:
        self._unread -= 1
        try:
            conn.read_response()
        except redis.ResponseError as exc:  # refused (OOM, a key of another type): the rest replies
            self._warn("could not save processed high-water marks", exc)

    def _connection(self) -> Any:
        if self._conn is None:
            self._pool, conn = dedicated_connection(self._client, self._prefix)
            self._conn, self._unread = conn, 1
            conn.send_packed_command([load(_SAVE)], check_health=False)
        return self._conn

    def _drop(self) -> None:
        conn, self._conn, self._unread = self._conn, None, 0
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)

    def close(self) -> None:
        """Read what is still owed and give the connection back."""
        try:
            while self._conn is not None and self._unread:
                self._read(self._conn)
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            self._warn("could not save processed high-water marks", exc)
        finally:
            self._drop()

    def _warn(self, what: str, exc: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_warning >= self._QUIET_SECONDS:
            self._last_warning = now
            log.warning(what, error=str(exc), effect="the reprocessed-records metric may undercount")

"""Idempotency: a Redis-backed dedup store, so a record re-read after a crash is not re-run.

Each record has an idempotency key (a header, else the app's key function, else
``topic/partition/offset``), namespaced by consumer group. One Redis key per idempotency key holds
its state:

- absent: never seen, or its window expired;
- ``c:<worker token>`` with a short TTL (the lease): a worker is running the chain for it now;
- ``1`` with the dedup window as TTL: done; a re-read skips the chain.

The worker claims all keys of a poll batch in one script call before the chain runs, and marks the
finished ones done in one call before their offsets can be committed. Keys carry the group as a
Redis Cluster hash tag, so every key a batch script touches lives in one slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import redis
import structlog
from redis.exceptions import RedisClusterException

from streamer.errors import StreamerError
from streamer.message import Message

if TYPE_CHECKING:
    from streamer.settings import DedupSettings
    from streamer.stats import WorkerStats

_T = TypeVar("_T")

log = structlog.get_logger("streamer.dedup")

KeyFunction = Callable[[Message], "str | bytes | None"]

#: Longer idempotency keys are stored as a 16-byte digest: Redis memory per key stays small.
_MAX_RAW_KEY = 32


class ClaimStatus(IntEnum):
    """What a claim found."""

    CLAIMED = 0  # ours now (or already ours): run the chain
    DONE = 1  # already done: skip the chain, count a dedup hit
    CONTESTED = 2  # another live worker holds the lease: wait for done or lease expiry


class DedupUnavailableError(StreamerError):
    """The dedup store could not be reached; the worker fails closed until it is back."""


class DedupStore(Protocol):
    """Where idempotency keys and their claims live (Redis, or an in-memory twin in tests)."""

    def claim(self, keys: Sequence[bytes], token: str, lease_ms: int) -> list[ClaimStatus]:
        """Claim every key not done and not leased by another token; one round trip."""
        ...

    def mark_done(self, keys: Sequence[bytes], window_ms: int) -> None:
        """Mark keys done for ``window_ms``; one round trip."""
        ...

    def release(self, keys: Sequence[bytes], token: str) -> None:
        """Drop the claims ``token`` holds on ``keys`` (the chain failed)."""
        ...


_CLAIM = """
local token, lease = ARGV[1], tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  -- One command for the common case (a key never seen); a second only when it exists.
  if redis.call('SET', key, token, 'NX', 'PX', lease) then
    out[i] = 0
  else
    local v = redis.call('GET', key)
    if v == '1' then
      out[i] = 1
    elseif v == token then
      redis.call('PEXPIRE', key, lease)
      out[i] = 0
    elseif not v then
      redis.call('SET', key, token, 'PX', lease)
      out[i] = 0
    else
      out[i] = 2
    end
  end
end
return out
"""

_MARK = """
for _, key in ipairs(KEYS) do
  redis.call('SET', key, '1', 'PX', ARGV[1])
end
return #KEYS
"""

_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('DEL', key)
  end
end
return n
"""


class RedisDedupStore:
    """The dedup store on Redis: three Lua scripts, each one round trip per batch."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._claim = client.register_script(_CLAIM)
        self._mark = client.register_script(_MARK)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 2.0) -> RedisDedupStore:
        """Connect to ``redis://`` or ``rediss://`` (TLS) URLs, with ACL user and password if given."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            retry_on_timeout=False,
        )
        return cls(client)

    def claim(self, keys: Sequence[bytes], token: str, lease_ms: int) -> list[ClaimStatus]:
        """Claim every key not done and not leased by another token; one round trip."""
        if not keys:
            return []
        result = self._call(self._claim, keys, [token, lease_ms])
        return [ClaimStatus(int(code)) for code in result]

    def mark_done(self, keys: Sequence[bytes], window_ms: int) -> None:
        """Mark keys done for ``window_ms``; one round trip."""
        if keys:
            self._call(self._mark, keys, [window_ms])

    def release(self, keys: Sequence[bytes], token: str) -> None:
        """Drop the claims ``token`` holds on ``keys``."""
        if keys:
            self._call(self._release, keys, [token])

    def ping(self) -> None:
        """Raise DedupUnavailableError unless Redis answers."""
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise DedupUnavailableError(f"redis unreachable: {exc}") from exc

    def _call(self, script: Any, keys: Sequence[bytes], args: list[object]) -> list[int]:
        try:
            result = script(keys=list(keys), args=args)
        except (redis.RedisError, RedisClusterException) as exc:
            # Connection errors and timeouts, but also READONLY on a replica, OOM, ...: in every
            # case no claim or mark is known to have landed, so the caller fails closed. Redis
            # Cluster's own errors (no slot coverage, a cluster down) are not RedisErrors.
            raise DedupUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc
        return list(result) if isinstance(result, list) else [int(result)]


class MemoryDedupStore:
    """An in-memory twin of the dedup store for unit tests and plugin authors (no TTLs)."""

    def __init__(self) -> None:
        self.state: dict[bytes, str] = {}

    def claim(self, keys: Sequence[bytes], token: str, lease_ms: int) -> list[ClaimStatus]:
        """Claim every key not done and not leased by another token."""
        out = []
        for key in keys:
            value = self.state.get(key)
            if value is None or value == token:
                self.state[key] = token
                out.append(ClaimStatus.CLAIMED)
            elif value == "1":
                out.append(ClaimStatus.DONE)
            else:
                out.append(ClaimStatus.CONTESTED)
        return out

    def mark_done(self, keys: Sequence[bytes], window_ms: int) -> None:
        """Mark keys done."""
        for key in keys:
            self.state[key] = "1"

    def release(self, keys: Sequence[bytes], token: str) -> None:
        """Drop the claims ``token`` holds."""
        for key in keys:
            if self.state.get(key) == token:
                del self.state[key]


class KeyBuilder:
    """Builds the Redis key of a record: ``<namespace>:{<group>}:<idempotency key>``."""

    def __init__(self, namespace: str, group: str, header: str, key_fn: KeyFunction | None) -> None:
        self._prefix = f"{namespace}:{{{group}}}:".encode()
        self._header = header
        self._key_fn = key_fn

    def idempotency_key(self, msg: Message) -> bytes:
        """The record's idempotency key: its header, else the key function, else its position."""
        value: str | bytes | None = msg.header(self._header) if self._header else None
        if value is None and self._key_fn is not None:
            value = self._key_fn(msg)
        if value is None:
            value = f"{msg.topic}/{msg.partition}/{msg.offset}"
        return value.encode() if isinstance(value, str) else value

    def redis_key(self, msg: Message) -> bytes:
        """The Redis key holding the record's dedup state."""
        key = self.idempotency_key(msg)
        if len(key) > _MAX_RAW_KEY:
            key = hashlib.blake2b(key, digest_size=16).digest()
        return self._prefix + key


class StopDuringOutageError(StreamerError):
    """A stop was requested while waiting for the dedup store; nothing more can be finished."""


#: Keeps the worker in its group for the given seconds, partitions paused; False if asked to stop.
WaitFunction = Callable[[float], bool]
OutageHook = Callable[[bool], None]


class DedupStage:
    """The dedup stage of the loop: claim a batch's keys before the chain, mark them done after.

    While the store is unreachable it fails closed: ``on_outage(True)`` lets the worker pause its
    partitions, ``wait`` keeps it in the group between retries, ``on_outage(False)`` resumes.
    With ``on_unavailable = "proceed"`` it instead lets records through, counting each.
    """

    _BACKOFF_MAX = 5.0

    def __init__(
        self,
        store: DedupStore,
        settings: DedupSettings,
        keys: KeyBuilder,
        stats: WorkerStats,
        token: str,
        wait: WaitFunction,
        on_outage: OutageHook,
    ) -> None:
        self._store = store
        self._keys = keys
        self._stats = stats
        self._token = f"c:{token}"
        self._wait = wait
        self._on_outage = on_outage
        self._lease_ms = int(settings.lease_seconds * 1000)
        self._window_ms = int(settings.window_seconds * 1000)
        self._proceed = settings.on_unavailable == "proceed"
        self.per_record = settings.mark_mode == "per_record"
        self.lease_seconds = settings.lease_seconds
        self._in_outage = False

    def key(self, msg: Message) -> bytes:
        """The Redis key of a record."""
        return self._keys.redis_key(msg)

    def claim(self, keys: Sequence[bytes]) -> list[ClaimStatus]:
        """Claim ``keys`` in one round trip, retrying while the store is down (fail closed)."""
        result = self._retrying("claim", lambda: self._store.claim(keys, self._token, self._lease_ms))
        if result is None:  # store down, proceeding without dedup
            self._stats.processed_without_dedup += len(keys)
            return [ClaimStatus.CLAIMED] * len(keys)
        return result

    def resolve_contested(self, key: bytes) -> ClaimStatus:
        """Wait until another worker's claim on ``key`` is done or its lease expired."""
        self._stats.dedup_contested += 1
        log.info("record claimed by another worker; waiting for it", lease_seconds=self.lease_seconds)
        delay = 0.05
        while True:
            (status,) = self.claim([key])
            if status is not ClaimStatus.CONTESTED:
                return status
            if not self._wait(delay):
                raise StopDuringOutageError("stop requested while waiting for a contested claim")
            delay = min(delay * 2, 1.0)

    def mark_done(self, keys: Sequence[bytes], *, block: bool = True) -> bool:
        """Mark ``keys`` done in one round trip; False if the store is down and ``block`` is off."""
        if not keys:
            return True
        if not block:
            try:
                self._store.mark_done(keys, self._window_ms)
            except DedupUnavailableError:
                self._stats.dedup_errors += 1
                if self._proceed:
                    self._stats.processed_without_dedup += len(keys)
                return self._proceed
            return True

        def mark() -> bool:
            self._store.mark_done(keys, self._window_ms)
            return True

        if self._retrying("mark", mark) is None:
            # Proceeding without dedup: these records ran, but a re-read would run them again.
            self._stats.processed_without_dedup += len(keys)
        return True

    def renew(self, keys: Sequence[bytes]) -> None:
        """Extend our leases on ``keys`` (a chain running longer than the lease); best effort, once."""
        try:
            self._store.claim(keys, self._token, self._lease_ms)
        except DedupUnavailableError:
            self._stats.dedup_errors += 1

    @property
    def in_outage(self) -> bool:
        """Whether the store was found down and has not answered since."""
        return self._in_outage

    def release(self, keys: Sequence[bytes]) -> None:
        """Drop our claims on ``keys``, best effort: an unreleased claim expires with its lease."""
        if not keys:
            return
        try:
            self._store.release(keys, self._token)
        except DedupUnavailableError:
            self._stats.dedup_errors += 1

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T | None:
        delay = 0.1
        while True:
            try:
                result = call()
            except DedupUnavailableError as exc:
                self._stats.dedup_errors += 1
                if self._proceed:
                    log.warning("dedup store unavailable; proceeding without dedup", op=what, error=str(exc))
                    return None
                if not self._in_outage:
                    self._in_outage = True
                    log.error(
                        "dedup store unavailable; pausing partitions, committing nothing",
                        op=what,
                        error=str(exc),
                    )
                    self._on_outage(True)
                else:
                    log.warning("dedup store still unavailable", op=what, retry_in=round(delay, 2))
                if not self._wait(delay):
                    raise StopDuringOutageError(f"stop requested during a dedup outage ({what})") from exc
                delay = min(delay * 2, self._BACKOFF_MAX)
                continue
            if self._in_outage:
                self._in_outage = False
                log.info("dedup store available again; resuming partitions")
                self._on_outage(False)
            return result

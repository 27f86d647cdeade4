"""Idempotency: a Redis-backed dedup store, so a record re-read after a crash is not re-run.

Each record has an idempotency key (a header, else the app's key function, else its position
``topic/partition/offset``). The store keeps, per consumer group (the group is a Redis Cluster
hash tag, so every key of a group lives in one slot):

- a **lease per partition** (``L:<topic>:<partition>``, a token with a short TTL): the worker
  running a partition's records holds it, renews it while a chain runs and releases it when it
  hands the partition over. A second worker finds the partition's records *contested* and waits:
  no record runs on two workers at once, also when its chain outlives the lease. One Redis write
  per poll batch, not one per record.
- **done marks of id-keyed records** in hashes bucketed by time (``h:<bucket>:<shard>``): a bucket
  spans one window and expires as a whole one window after it ends, so no key carries a TTL of
  its own; each bucket is split into shards small enough for Redis' compact listpack encoding,
  and a mark is a 10-byte field of the key's digest. A lookup asks the current bucket and the one
  before.
- **done marks of position-keyed records** as one bit per offset in per-partition bitmaps
  (``o:<topic>:<partition>:<chunk>`` of 65,536 offsets each).

Marks are written as each record's chain finishes, *without waiting for the reply*: the
commands go out on a connection of their own every ``mark_every`` records, and their replies are
read before the offsets that depend on them are published for commit. Bytes written to a socket
reach Redis even when the process is SIGKILLed the moment after, so a crash repeats at most the
records finished since the last send.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import redis
import structlog
from redis.exceptions import RedisClusterException

from streamer.errors import StreamerError
from streamer.logs import current_record
from streamer.message import Message
from streamer.redis_safety import check, facts
from streamer.resp import dedicated_connection, load, packed, script_sha

if TYPE_CHECKING:
    from streamer.settings import DedupSettings
    from streamer.stats import WorkerStats

_T = TypeVar("_T")

log = structlog.get_logger("streamer.dedup")

KeyFunction = Callable[[Message], "str | bytes | None"]
TP = tuple[str, int]

#: Format 1 (streamer ≤ 0.4) kept idempotency keys up to this length as they were, longer ones
#: as a 16-byte digest: what a legacy lookup rebuilds.
_MAX_RAW_KEY = 32
#: Offsets per bitmap of position-keyed marks (8 KiB when full).
CHUNK_BITS = 16
_CHUNK_MASK = (1 << CHUNK_BITS) - 1
#: Bytes of a key's digest stored per id-keyed mark (after the bytes that pick its shard).
FIELD_BYTES = 10
#: A worker whose clock runs ahead may already write the next bucket: look there too this close
#: to a bucket's end.
_SKEW_MS = 120_000
#: Entries per shard the shard count aims at (Redis keeps hashes up to 128 entries compact by
#: default: ``hash-max-listpack-entries``).
_PER_SHARD = 64


class ClaimStatus(IntEnum):
    """What a claim found."""

    CLAIMED = 0  # its partition's lease is ours and it is not done: run the chain
    DONE = 1  # already done: skip the chain, count a dedup hit
    CONTESTED = 2  # another live worker holds its partition's lease: wait for done or lease expiry


#: A claim sent ahead: calling it waits for the statuses.
ClaimAnswer = Callable[[], list[ClaimStatus]]


class DedupUnavailableError(StreamerError):
    """The dedup store could not be reached; the worker fails closed until it is back."""


class DedupKey:
    """A record's dedup identity: equal for two records with the same idempotency key.

    ``digest`` is the 16-byte digest of an id key, or None for a record keyed by its position;
    ``topic`` and ``partition`` are the record's own (its partition's lease covers it).
    """

    __slots__ = ("claimed", "digest", "ident", "offset", "partition", "raw", "topic")

    def __init__(self, raw: bytes, digest: bytes | None, topic: str, partition: int, offset: int) -> None:
        self.raw = raw
        self.digest = digest
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.ident: object = digest if digest is not None else (topic, partition, offset)
        #: Where the store holds this record's id claim (set by a claim).
        self.claimed: bytes | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DedupKey) and self.ident == other.ident

    def __hash__(self) -> int:
        return hash(self.ident)

    def __repr__(self) -> str:
        return f"DedupKey({self.raw!r})"

    @property
    def tp(self) -> TP:
        """The record's partition."""
        return self.topic, self.partition


class DedupStore(Protocol):
    """Where claims and done marks live (Redis, or an in-memory twin in tests)."""

    def claim(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> list[ClaimStatus]:
        """Claim each key not done: an id claim, or its partition's lease; one round trip."""
        ...

    def claim_send(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> ClaimAnswer:
        """``claim`` sent ahead: the function returned waits for its answer."""
        ...

    def send_marks(self, keys: Sequence[DedupKey]) -> None:
        """Write done marks without waiting for the reply (``wait_marks`` waits); never raises."""
        ...

    def wait_marks(self) -> None:
        """Wait until every mark sent has landed; DedupUnavailableError keeps them for a re-send."""
        ...

    def renew(self, keys: Iterable[DedupKey], token: str, lease_ms: int) -> None:
        """Extend the claims (and partition leases) ``token`` holds for ``keys``."""
        ...

    def release(self, keys: Iterable[DedupKey], token: str) -> None:
        """Drop the id claims ``token`` holds on ``keys`` (not run here)."""
        ...

    def hand_over(self, partitions: Iterable[TP], token: str) -> None:
        """Drop the leases ``token`` holds on ``partitions`` (nothing of them runs here any more)."""
        ...

    def watch(self) -> bool:
        """True once after the store restarted and lost its data."""
        ...


# Leases first (KEYS[1..nl]); then per id-keyed record its buckets' shards, the current bucket
# first: done in any bucket wins, then a live claim by another token; else it is claimed in the
# current bucket (when asked: ARGV flag 1) as "<token>:<deadline ms>". Then GETRANGE of each bitmap
# range the position-keyed records span; then legacy (format 1) GETs.
_CLAIM = """
local token, lease = ARGV[1], tonumber(ARGV[2])
local nl, nh, nk = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local nr, ng, take = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine, claim = token .. ':', token .. ':' .. (now + lease)
local function state(v)  -- 1 done, 2 live claim of another token, 0 free (absent, ours, expired)
  if not v then return 0 end
  if v == '' then return 1 end
  if string.sub(v, 1, #mine) == mine then return 0 end
  local deadline = tonumber(string.match(v, ':(%d+)$'))
  if deadline and deadline > now then return 2 end
  return 0
end
local out = {}
for i = 1, nl do
  local k = KEYS[i]
  if redis.call('SET', k, token, 'NX', 'PX', lease) then
    out[i] = 1
  elseif redis.call('GET', k) == token then
    redis.call('PEXPIRE', k, lease)
    out[i] = 1
  else
    out[i] = 0
  end
end
for j = 1, nh do
  local field, base = ARGV[8 + j], nl + (j - 1) * nk
  local current, done, live = KEYS[base + 1], false, false
  for q = 2, nk do
    local s = state(redis.call('HGET', KEYS[base + q], field))
    if s == 1 then done = true elseif s == 2 then live = true end
  end
  local st = 1
  if not done then
    if take and not live and redis.call('HSETNX', current, field, claim) == 1 then
      st = 0
    else
      st = state(redis.call('HGET', current, field))
      if st == 0 and live then
        st = 2
      elseif st == 0 and take then
        redis.call('HSET', current, field, claim)
      end
    end
  end
  out[nl + j] = st
end
local k, a = nl + nh * nk, 8 + nh
for j = 1, nr do
  out[#out + 1] = redis.call('GETRANGE', KEYS[k + j], ARGV[a + 2 * j - 1], ARGV[a + 2 * j])
end
k = k + nr
for j = 1, ng do
  out[#out + 1] = redis.call('GET', KEYS[k + j]) == '1' and 1 or 0
end
return out
"""

# The id marks of one pipelined send: HSET each key's field to "".
_MARK = """
for i = 1, #KEYS do redis.call('HSET', KEYS[i], ARGV[i], '') end
return #KEYS
"""
_MARK_SHA = script_sha(_MARK)
_CLAIM_SHA = script_sha(_CLAIM)

# Partition leases (KEYS[1..nl]) renewed, then the id claims (key, field pairs) that are ours.
_RENEW = """
local token, lease, nl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local claim = token .. ':' .. (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + lease)
for i = 1, nl do
  if redis.call('GET', KEYS[i]) == token then redis.call('PEXPIRE', KEYS[i], lease) end
end
for i = nl + 1, #KEYS do
  local field = ARGV[i - nl + 3]
  local v = redis.call('HGET', KEYS[i], field)
  if v and string.sub(v, 1, #token + 1) == token .. ':' then redis.call('HSET', KEYS[i], field, claim) end
end
return 1
"""

# Partition leases (KEYS[1..nl]) and id claims (key, field pairs) dropped where they are ours.
_RELEASE = """
local token, nl = ARGV[1], tonumber(ARGV[2])
for i = 1, nl do
  if redis.call('GET', KEYS[i]) == token then redis.call('DEL', KEYS[i]) end
end
for i = nl + 1, #KEYS do
  local field = ARGV[i - nl + 2]
  local v = redis.call('HGET', KEYS[i], field)
  if v and string.sub(v, 1, #token + 1) == token .. ':' then redis.call('HDEL', KEYS[i], field) end
end
return 1
"""


class _ShardNames(dict[int, bytes]):
    """Shard number -> Redis key of one bucket's shard, built on first use."""

    def __init__(self, prefix: bytes) -> None:
        super().__init__()
        self.prefix = prefix

    def __missing__(self, shard: int) -> bytes:
        name = self[shard] = b"%s%d" % (self.prefix, shard)
        return name


class KeyLayout:
    """Where a group's leases and marks live in Redis (format 2)."""

    def __init__(self, namespace: str, group: str, shard_bits: int) -> None:
        self.namespace, self.group = namespace, group
        self.prefix = f"{namespace}:2:{{{group}}}:".encode()
        self.legacy_prefix = f"{namespace}:{{{group}}}:".encode()
        self.meta = self.prefix + b"meta"
        self.shard_bits = shard_bits
        self.shard_mask = (1 << shard_bits) - 1
        self._names: dict[int, _ShardNames] = {}

    def lease(self, tp: TP) -> bytes:
        """The lease key of a partition."""
        return b"%sL:%s:%d" % (self.prefix, tp[0].encode(), tp[1])

    def shard(self, bucket: int, digest: bytes) -> bytes:
        """The hash holding an id-keyed mark in ``bucket``."""
        return self.names(bucket)[int.from_bytes(digest[:4], "big") & self.shard_mask]

    def names(self, bucket: int) -> _ShardNames:
        """The names of ``bucket``'s shards (built once, kept for the buckets in use)."""
        names = self._names.get(bucket)
        if names is None:
            if len(self._names) > 4:
                self._names.clear()
            names = self._names[bucket] = _ShardNames(b"%sh:%d:" % (self.prefix, bucket))
        return names

    def chunk(self, topic: str, partition: int, offset: int) -> bytes:
        """The bitmap holding a position-keyed mark."""
        return b"%so:%s:%d:%d" % (self.prefix, topic.encode(), partition, offset >> CHUNK_BITS)

    def legacy(self, key: DedupKey) -> bytes:
        """The record's key in format 1 (value ``1`` when done)."""
        raw = key.raw
        if len(raw) > _MAX_RAW_KEY:
            raw = hashlib.blake2b(raw, digest_size=16).digest()
        return self.legacy_prefix + raw


def shard_bits_for(expected_keys: int) -> int:
    """Shards per bucket (as a power of two) for about ``_PER_SHARD`` marks each."""
    return max(0, math.ceil(math.log2(max(expected_keys, 1) / _PER_SHARD)))


def buckets(now_ms: int, window_ms: int) -> list[int]:
    """The buckets a lookup asks: the current one, the one before, and the next one near its start."""
    bucket = now_ms // window_ms
    found = [bucket, bucket - 1]
    if (bucket + 1) * window_ms - now_ms < _SKEW_MS:
        found.append(bucket + 1)
    return found


def has_bit(data: bytes, bit: int) -> bool:
    """Whether bit ``bit`` (Redis' order: bit 0 is the high bit of byte 0) is set in ``data``."""
    index = bit >> 3
    return index < len(data) and bool(data[index] & (0x80 >> (bit & 7)))


def _status(found: int, lease_elsewhere: bool) -> ClaimStatus:
    if found == 1:
        return ClaimStatus.DONE
    if found == 2 or lease_elsewhere:
        return ClaimStatus.CONTESTED
    return ClaimStatus.CLAIMED


class RedisDedupStore:
    """The dedup store on Redis: a claim script per batch, marks pipelined on their own connection."""

    def __init__(
        self,
        client: redis.Redis,
        layout: KeyLayout,
        *,
        window_ms: int = 7 * 86_400_000,
        legacy: bool = False,
        partition_local_ids: bool = False,
        refuse_unsafe: bool = True,
    ) -> None:
        self._client = client
        self._local_ids = partition_local_ids
        self._window_ms = window_ms
        self.layout = layout
        self._legacy = legacy
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pool: Any = None
        #: Marks sent (or to be re-sent) whose replies have not all been read yet.
        self._pending: list[Sequence[DedupKey]] = []
        self._unread = 0  # replies owed on self._conn
        self._broken = False  # self._pending must be re-sent on a new connection
        self._expiring: dict[bytes, int] = {}  # keys whose expiry this process has set, and to when
        self.marks_sent = 0
        self._claim_conn: Any = None  # claims sent ahead (claim_send), and replies owed on it
        self._claim_pool: Any = None
        self._claim_unread = 0
        self._started = False  # the start-up checks and the shard count: on the first claim
        self._refuse_unsafe = refuse_unsafe
        self._run_id = ""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "streamer",
        group: str = "g",
        timeout: float = 2.0,
        shard_bits: int = 14,
        window_ms: int = 7 * 86_400_000,
    ) -> RedisDedupStore:
        """Connect to ``redis://`` or ``rediss://`` (TLS) URLs, with ACL user and password if given."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            retry_on_timeout=False,
        )
        return cls(client, KeyLayout(namespace, group, shard_bits), window_ms=window_ms)

    @property
    def client(self) -> redis.Redis:
        """The Redis client (for start-up checks and the effect helper)."""
        return self._client

    def start(self) -> None:
        """Check that Redis keeps marks (refuse or warn, see redis_safety), agree on the shards."""
        found = self._call(lambda: facts(self._client))
        check(found, refuse=self._refuse_unsafe)
        self._run_id = found.run_id
        self.agree_on_shards()
        self._started = True

    def watch(self) -> bool:
        """True once after Redis restarted without its data (run id changed, the group's marker
        gone): the marks written before are lost, records re-read now run again."""
        if not self._started:
            return False
        run_id = self._call(lambda: str(self._client.info("server").get("run_id", "")))
        if run_id == self._run_id:
            return False
        self._run_id = run_id
        lost = not self._call(lambda: self._client.exists(self.layout.meta))
        with self._lock:
            self._expiring.clear()  # the keys this process gave a TTL may be gone: set them again
        self.agree_on_shards()
        if lost:
            log.error(
                "dedup Redis restarted without its data",
                consequence="marks written before are lost; records re-read now run again",
                run_id=run_id,
            )
        else:
            log.warning("dedup Redis restarted with its data", run_id=run_id)
        return lost

    def agree_on_shards(self) -> int:
        """Use the group's shard count (the first worker's choice wins); warn on a mismatch."""
        layout = self.layout
        wanted = layout.shard_bits
        self._call(lambda: self._client.hsetnx(layout.meta, "shard_bits", wanted))
        value = self._call(lambda: self._client.hget(layout.meta, "shard_bits"))
        bits = int(value) if value is not None else wanted
        if bits != wanted:
            log.warning(
                "the group's dedup marks use another shard count; keeping it (a new expected_keys "
                "takes effect in a new namespace)",
                stored_shard_bits=bits,
                wanted_shard_bits=wanted,
            )
            self.layout = KeyLayout(layout.namespace, layout.group, bits)
        return bits

    # --- claims -----------------------------------------------------------------------------

    def claim(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> list[ClaimStatus]:
        """Claim each key not done (an id claim, or its partition's lease); one round trip."""
        if not keys:
            return []
        redis_keys, args, parse = self._claim_plan(keys, token, lease_ms)
        return parse(self._call(lambda: self._claim(keys=redis_keys, args=args)))

    def claim_send(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> ClaimAnswer:
        """Send the claim of ``keys`` without waiting; the function returned reads its answer.

        One claim at a time is in flight, on a connection of its own (the claim script loaded
        first): the processor claims the rest of a poll batch while it runs the first records."""
        redis_keys, args, parse = self._claim_plan(keys, token, lease_ms)
        command = [b"EVALSHA", _CLAIM_SHA, b"%d" % len(redis_keys), *redis_keys]
        command += [a if isinstance(a, bytes) else str(a).encode() for a in args]
        try:
            if self._claim_conn is None:
                self._claim_pool, self._claim_conn = dedicated_connection(self._client, self.layout.meta)
                self._claim_conn.send_packed_command([load(_CLAIM)], check_health=False)
                self._claim_unread = 1
            conn = self._claim_conn
            conn.send_packed_command([packed(command)], check_health=False)
            self._claim_unread += 1
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            self._drop_claim_connection()
            raise DedupUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc

        def answer() -> list[ClaimStatus]:
            try:
                while self._claim_unread > 1:
                    self._claim_unread -= 1
                    conn.read_response(disable_decoding=True)  # the script load's reply
                self._claim_unread -= 1
                return parse(conn.read_response(disable_decoding=True))
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                self._drop_claim_connection()
                raise DedupUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc

        return answer

    def _drop_claim_connection(self) -> None:
        conn, self._claim_conn, self._claim_unread = self._claim_conn, None, 0
        if conn is not None:
            conn.disconnect()
            self._claim_pool.release(conn)

    def _claim_plan(
        self, keys: Sequence[DedupKey], token: str, lease_ms: int
    ) -> tuple[list[bytes], list[Any], Callable[[list[Any]], list[ClaimStatus]]]:
        """The claim script's KEYS and ARGV for ``keys``, and the reader of its reply."""
        if not self._started:
            self.start()
        layout, local = self.layout, self._local_ids
        lease_index: dict[TP, int] = {}
        for key in keys:
            if key.digest is None or local:
                lease_index.setdefault(key.tp, len(lease_index))
        redis_keys: list[bytes] = [layout.lease(tp) for tp in lease_index]
        looked = [layout.names(b) for b in buckets(int(time.time() * 1000), self._window_ms)]
        mask = layout.shard_mask
        by_id: list[int] = []
        fields: list[bytes] = []
        ranges: dict[bytes, list[int]] = {}  # bitmap -> [low bit, high bit]
        for i, key in enumerate(keys):
            digest = key.digest
            if digest is not None:
                by_id.append(i)
                shard = int.from_bytes(digest[:4], "big") & mask
                names = [bucket[shard] for bucket in looked]
                redis_keys += names
                if not local:
                    key.claimed = names[0]
                fields.append(digest[4 : 4 + FIELD_BYTES])
            else:
                bit = key.offset & _CHUNK_MASK
                span = ranges.setdefault(layout.chunk(key.topic, key.partition, key.offset), [bit, bit])
                span[0], span[1] = min(span[0], bit), max(span[1], bit)
        range_args: list[object] = []
        for name, (low, high) in ranges.items():
            redis_keys.append(name)
            range_args += [low >> 3, high >> 3]
        if self._legacy:
            redis_keys += [layout.legacy(key) for key in keys]
        n_legacy = len(keys) if self._legacy else 0
        head = [token, lease_ms, len(lease_index), len(by_id), len(looked), len(ranges), n_legacy]
        args: list[Any] = [*head, b"0" if local else b"1", *fields, *range_args]

        def parse(result: list[Any]) -> list[ClaimStatus]:
            n_leases = len(lease_index)
            found = self._found(keys, by_id, ranges, result[n_leases:])
            lost = {tp for tp, index in lease_index.items() if not result[index]}
            return [_status(st, key.tp in lost) for st, key in zip(found, keys, strict=True)]

        return redis_keys, args, parse

    def _found(
        self, keys: Sequence[DedupKey], by_id: list[int], ranges: dict[bytes, list[int]], result: list[Any]
    ) -> list[int]:
        """Per key: 0 free, 1 done, 2 claimed by another token (from the claim script's reply)."""
        n_ids = len(by_id)
        found = [0] * len(keys)
        for i, st in zip(by_id, result[:n_ids], strict=True):
            found[i] = int(st)
        maps = dict(zip(ranges, result[n_ids:], strict=False))
        legacy = result[n_ids + len(ranges) :]
        for i, key in enumerate(keys):
            if key.digest is None:
                name = self.layout.chunk(key.topic, key.partition, key.offset)
                if has_bit(maps[name] or b"", (key.offset & _CHUNK_MASK) - (ranges[name][0] & ~7)):
                    found[i] = 1
            if legacy and legacy[i]:
                found[i] = 1
        return found

    def renew(self, keys: Iterable[DedupKey], token: str, lease_ms: int) -> None:
        """Extend the id claims and partition leases ``token`` holds for ``keys``."""
        leases: set[bytes] = set()
        pairs: list[tuple[bytes, bytes]] = []
        for key in keys:
            if key.digest is None or self._local_ids:
                leases.add(self.layout.lease(key.tp))
            elif key.claimed is not None:
                pairs.append((key.claimed, key.digest[4 : 4 + FIELD_BYTES]))
        if leases or pairs:
            names = [*leases, *(k for k, _ in pairs)]
            args: list[Any] = [token, lease_ms, len(leases), *(f for _, f in pairs)]
            self._call(lambda: self._renew(keys=names, args=args))

    def release(self, keys: Iterable[DedupKey], token: str) -> None:
        """Drop the id claims ``token`` holds on ``keys`` (not run here: another worker may)."""
        pairs = [
            (key.claimed, key.digest[4 : 4 + FIELD_BYTES])
            for key in keys
            if key.digest is not None and key.claimed is not None
        ]
        if pairs:
            names = [k for k, _ in pairs]
            args: list[Any] = [token, 0, *(f for _, f in pairs)]
            self._call(lambda: self._release(keys=names, args=args))

    def hand_over(self, partitions: Iterable[TP], token: str) -> None:
        """Drop the leases ``token`` holds on ``partitions``."""
        names = [self.layout.lease(tp) for tp in partitions]
        if names:
            self._call(lambda: self._release(keys=names, args=[token, len(names)]))

    # --- marks ------------------------------------------------------------------------------

    def _mark_targets(
        self, keys: Sequence[DedupKey]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        """Where ``keys``' marks go: (hash, field) of ids, (bitmap, bit) of positions, and the
        (key, expiry) of the keys this process has not given their expiry yet."""
        layout, expiring, window_ms = self.layout, self._expiring, self._window_ms
        now_ms = int(time.time() * 1000)
        bucket = now_ms // window_ms
        names, mask = layout.names(bucket), layout.shard_mask
        ids: list[tuple[bytes, bytes]] = []
        bits: list[tuple[bytes, bytes]] = []
        expiries: list[tuple[bytes, bytes]] = []
        for key in keys:
            digest = key.digest
            if digest is not None:
                name = names[int.from_bytes(digest[:4], "big") & mask]
                ids.append((name, digest[4 : 4 + FIELD_BYTES]))
                if name not in expiring:
                    # A bucket lives one window after it ends: a mark outlives the window.
                    expiring[name] = at = (bucket + 2) * window_ms
                    expiries.append((name, b"%d" % at))
            else:
                name = layout.chunk(key.topic, key.partition, key.offset)
                bits.append((name, b"%d" % (key.offset & _CHUNK_MASK)))
                # A bitmap lives one window after its last mark, renewed once an hour at most.
                hour = 3_600_000
                at = (now_ms + window_ms + hour - 1) // hour * hour
                if expiring.get(name) != at:
                    expiring[name] = at
                    expiries.append((name, b"%d" % at))
        if len(expiring) > 200_000:
            expiring.clear()  # a bounded memory of what was set; setting one again is harmless
        return ids, bits, expiries

    def mark_commands(self, keys: Sequence[DedupKey]) -> list[tuple[bytes, ...]]:
        """The plain Redis commands that mark ``keys`` done (for a MULTI: ``redis_effect``)."""
        ids, bits, expiries = self._mark_targets(keys)
        return [
            *((b"HSET", name, field, b"") for name, field in ids),
            *((b"SETBIT", name, bit, b"1") for name, bit in bits),
            *((b"PEXPIREAT", name, at) for name, at in expiries),
        ]

    def _mark_call(self, keys: Sequence[DedupKey]) -> tuple[bytes, int]:
        """The commands that mark ``keys`` done, in Redis' protocol, and how many replies they get:
        the id marks in one EVALSHA (a Lua HSET costs less than a command of its own), the
        position marks as one BITFIELD per bitmap, then the expiries."""
        ids, bits, expiries = self._mark_targets(keys)
        calls: list[bytes] = []
        if ids:
            names = [name for name, _ in ids]
            calls.append(packed([b"EVALSHA", _MARK_SHA, b"%d" % len(names), *names, *(f for _, f in ids)]))
        by_map: dict[bytes, list[bytes]] = {}
        for name, bit in bits:
            by_map.setdefault(name, []).extend((b"SET", b"u1", bit, b"1"))
        calls += [packed([b"BITFIELD", name, *ops]) for name, ops in by_map.items()]
        calls += [packed([b"PEXPIREAT", name, at]) for name, at in expiries]
        return b"".join(calls), len(calls)

    def send_marks(self, keys: Sequence[DedupKey]) -> None:
        """Write done marks without waiting for the reply; a failure leaves them pending."""
        if not keys:
            return
        with self._lock:
            self._pending.append(keys)
            self.marks_sent += len(keys)
            if self._broken:
                return
            data, replies = self._mark_call(keys)
            try:
                self._connection().send_packed_command([data], check_health=False)
                self._unread += replies
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                log.debug("dedup marks not sent; re-sent before the next commit", error=str(exc))
                self._drop_connection()

    def wait_marks(self) -> None:
        """Read the replies of every mark sent (re-sending all pending after a failure)."""
        with self._lock:
            if not self._pending:
                return
            try:
                conn = self._connection()
                if self._broken:
                    # Built again: after a restart the expiries must go out again with them.
                    calls = [self._mark_call(keys) for keys in self._pending]
                    conn.send_packed_command([b"".join(data for data, _ in calls)], check_health=False)
                    self._broken, self._unread = False, self._unread + sum(n for _, n in calls)
                error: redis.ResponseError | None = None
                while self._unread:
                    try:
                        conn.read_response(disable_decoding=True)
                    except redis.ResponseError as exc:  # OOM, READONLY, ...: the rest still replies
                        error = error or exc
                    self._unread -= 1
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                self._drop_connection()
                raise DedupUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc
            if error is not None:
                # Every pending mark goes out again (they are idempotent), on a new connection
                # that loads the script first (a NOSCRIPT after a SCRIPT FLUSH heals too).
                self._drop_connection()
                raise DedupUnavailableError(f"redis: {type(error).__name__}: {error}") from error
            self._pending.clear()

    def _connection(self) -> Any:
        if self._conn is None:
            self._pool, conn = dedicated_connection(self._client, self.layout.meta)
            # The mark script first: the EVALSHAs behind it on this connection find it loaded.
            self._conn, self._unread = conn, 1
            conn.send_packed_command([load(_MARK)], check_health=False)
        return self._conn

    def forget_expiries(self) -> None:
        """Set every key's expiry again with its next mark (a restart, a failed transaction)."""
        self._expiring.clear()

    def _drop_connection(self) -> None:
        # Redis may have restarted empty: keys this process gave a TTL get it again when marked.
        self._expiring.clear()
        conn, self._conn = self._conn, None
        self._broken, self._unread = True, 0
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)

    def ping(self) -> None:
        """Raise DedupUnavailableError unless Redis answers."""
        self._call(self._client.ping)

    def _call(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except (redis.RedisError, RedisClusterException) as exc:
            # Connection errors and timeouts, but also READONLY on a replica, OOM, ...: in every
            # case no lease or mark is known to have landed, so the caller fails closed. Redis
            # Cluster's own errors (no slot coverage, a cluster down) are not RedisErrors.
            raise DedupUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc


class MemoryDedupStore:
    """An in-memory twin of the dedup store for unit tests and plugin authors (no TTLs)."""

    def __init__(self, *, partition_local_ids: bool = False) -> None:
        self.leases: dict[TP, str] = {}
        self.claims: dict[object, str] = {}
        self.done: set[object] = set()
        self._local_ids = partition_local_ids

    def claim(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> list[ClaimStatus]:
        """Claim each key not done: its id, or its partition (position keys, partition-local ids)."""
        out = []
        for key in keys:
            if key.digest is None or self._local_ids:
                holder = self.leases.setdefault(key.tp, token)
            else:
                holder = self.claims.get(key.ident, token)
            if key.ident in self.done:
                out.append(ClaimStatus.DONE)
            elif holder == token:
                if key.digest is not None and not self._local_ids:
                    self.claims[key.ident] = token
                out.append(ClaimStatus.CLAIMED)
            else:
                out.append(ClaimStatus.CONTESTED)
        return out

    def claim_send(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> ClaimAnswer:
        """Claim at once; the function returned gives the answer."""
        result = self.claim(keys, token, lease_ms)
        return lambda: result

    def send_marks(self, keys: Sequence[DedupKey]) -> None:
        """Mark keys done (at once)."""
        for key in keys:
            self.done.add(key.ident)
            self.claims.pop(key.ident, None)

    def wait_marks(self) -> None:
        """Nothing to wait for."""

    def renew(self, keys: Iterable[DedupKey], token: str, lease_ms: int) -> None:
        """Claims do not expire here."""

    def release(self, keys: Iterable[DedupKey], token: str) -> None:
        """Drop the id claims ``token`` holds."""
        for key in keys:
            if self.claims.get(key.ident) == token:
                del self.claims[key.ident]

    def watch(self) -> bool:
        """Never restarts."""
        return False

    def hand_over(self, partitions: Iterable[TP], token: str) -> None:
        """Drop the partition leases ``token`` holds."""
        for tp in partitions:
            if self.leases.get(tp) == token:
                del self.leases[tp]


class KeyBuilder:
    """Builds a record's dedup key: its idempotency key, digested, and its partition."""

    def __init__(self, namespace: str, group: str, header: str, key_fn: KeyFunction | None) -> None:
        self.namespace, self.group = namespace, group
        self._header = header
        self._key_fn = key_fn

    def idempotency_key(self, msg: Message) -> bytes:
        """The record's idempotency key: its header, else the key function, else its position."""
        value = self._given(msg)
        if value is None:
            return f"{msg.topic}/{msg.partition}/{msg.offset}".encode()
        return value

    def key(self, msg: Message) -> DedupKey:
        """The record's dedup key; keyed by position (a bit per offset) when it has no id."""
        value = self._given(msg)
        if value is None:
            return DedupKey(f"{msg[0]}/{msg[1]}/{msg[2]}".encode(), None, msg[0], msg[1], msg[2])
        return DedupKey(value, hashlib.blake2b(value, digest_size=16).digest(), msg[0], msg[1], msg[2])

    def _given(self, msg: Message) -> bytes | None:
        value: str | bytes | None = msg.header(self._header) if self._header else None
        if value is None and self._key_fn is not None:
            value = self._key_fn(msg)
        if value is None:
            return None
        return value.encode() if isinstance(value, str) else value


class StopDuringOutageError(StreamerError):
    """A stop was requested while waiting for the dedup store; nothing more can be finished."""


#: Keeps the worker in its group for the given seconds, partitions paused; False if asked to stop.
WaitFunction = Callable[[float], bool]
OutageHook = Callable[[bool], None]

#: The worker's key builder and dedup stage, for ``idempotency_key`` and ``redis_effect``.
_active: list[tuple[KeyBuilder, DedupStage | None]] = []


def activate(keys: KeyBuilder, stage: DedupStage | None) -> None:
    """Make ``keys`` (and ``stage``) what handlers of this process see; the worker calls it."""
    _active[:] = [(keys, stage)]


def _record(msg: Message | None) -> tuple[Message, KeyBuilder, DedupStage | None]:
    if not _active:
        raise RuntimeError("no streamer worker runs in this process")
    msg = msg if msg is not None else current_record.msg
    if msg is None:
        raise RuntimeError("no record is being handled here: pass the message")
    keys, stage = _active[0]
    return msg, keys, stage


def idempotency_key(msg: Message | None = None) -> bytes:
    """The idempotency key of the record being handled (or of ``msg``): its ``[dedup] key_header``,
    else the app's key function, else ``topic/partition/offset`` — for a handler's own upserts."""
    msg, keys, _ = _record(msg)
    return keys.idempotency_key(msg)


@contextmanager
def redis_effect(msg: Message | None = None) -> Iterator[redis.client.Pipeline]:
    """A MULTI/EXEC transaction on the dedup Redis that also marks the record done.

    Queue the effect on the pipeline it yields; at the end of the block the effect and the
    record's done mark are applied in one transaction, so a crash at any point either leaves
    both (a re-read skips the record) or neither (the re-read runs it): no duplicate window.
    On Redis Cluster the effect's keys must carry the group's hash tag ``{<group_id>}``. An
    exception inside the block applies nothing."""
    msg, _, stage = _record(msg)
    if stage is None or not isinstance(stage.store, RedisDedupStore):
        raise RuntimeError("redis_effect needs [dedup] enabled = true (its Redis holds the marks)")
    store = stage.store
    pipe = store.client.pipeline(transaction=True)
    yield pipe
    for command in store.mark_commands([stage.key(msg)]):
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
    try:
        pipe.execute()
    except (redis.RedisError, RedisClusterException) as exc:
        store.forget_expiries()  # the expiries queued with the mark did not land either
        raise DedupUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc


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
        self._proceed = settings.on_unavailable == "proceed"
        self.per_record = settings.mark_mode == "per_record"
        #: Finished records per pipelined send (0: marks go out once per poll batch).
        self.mark_every = settings.mark_every if settings.mark_mode == "pipelined" else 0
        self.lease_seconds = settings.lease_seconds
        self._in_outage = False

    @property
    def store(self) -> DedupStore:
        """The store behind this stage."""
        return self._store

    def key(self, msg: Message) -> DedupKey:
        """The dedup key of a record."""
        return self._keys.key(msg)

    def claim(self, keys: Sequence[DedupKey]) -> list[ClaimStatus]:
        """Claim ``keys`` in one round trip, retrying while the store is down (fail closed)."""
        result = self._retrying("claim", lambda: self._store.claim(keys, self._token, self._lease_ms))
        if result is None:  # store down, proceeding without dedup
            self._stats.processed_without_dedup += len(keys)
            return [ClaimStatus.CLAIMED] * len(keys)
        return result

    def claim_soon(self, keys: Sequence[DedupKey]) -> ClaimAnswer:
        """Send the claim of ``keys`` now, read it when called (then, or failing that, claim them
        as ``claim`` does: retrying while the store is down)."""
        try:
            answer = self._store.claim_send(keys, self._token, self._lease_ms)
        except DedupUnavailableError:
            self._stats.dedup_errors += 1
            return lambda: self.claim(keys)

        def result() -> list[ClaimStatus]:
            try:
                statuses = answer()
            except DedupUnavailableError:
                self._stats.dedup_errors += 1
                return self.claim(keys)
            return statuses

        return result

    def resolve_contested(self, key: DedupKey) -> ClaimStatus:
        """Wait until the worker holding ``key``'s partition is done with it or its lease expired."""
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

    def send_marks(self, keys: Sequence[DedupKey]) -> None:
        """Send done marks without waiting; ``mark_done`` (before a commit) waits for them."""
        self._store.send_marks(keys)

    def mark_done(self, keys: Sequence[DedupKey], *, block: bool = True) -> bool:
        """Mark ``keys`` done and wait for every mark sent; False if the store is down and
        ``block`` is off."""
        store = self._store
        if keys:
            store.send_marks(keys)
        if not block:
            try:
                store.wait_marks()
            except DedupUnavailableError:
                self._stats.dedup_errors += 1
                if self._proceed:
                    self._stats.processed_without_dedup += len(keys)
                return self._proceed
            return True

        def wait() -> bool:
            store.wait_marks()
            return True

        if self._retrying("mark", wait) is None:
            # Proceeding without dedup: these records ran, but a re-read would run them again.
            self._stats.processed_without_dedup += len(keys)
        return True

    def renew(self, keys: Iterable[DedupKey]) -> None:
        """Extend the claims of ``keys`` (a chain running longer than the lease); best effort."""
        try:
            self._store.renew(list(keys), self._token, self._lease_ms)
        except DedupUnavailableError:
            self._stats.dedup_errors += 1

    def release(self, keys: Sequence[DedupKey]) -> None:
        """Drop our claims on ``keys`` (not run here), best effort: an unreleased one expires."""
        if not keys:
            return
        try:
            self._store.release(keys, self._token)
        except DedupUnavailableError:
            self._stats.dedup_errors += 1

    def hand_over(self, partitions: Iterable[TP]) -> None:
        """Drop our leases on ``partitions`` (handed over), best effort: an unreleased one expires."""
        try:
            self._store.hand_over(list(partitions), self._token)
        except DedupUnavailableError:
            self._stats.dedup_errors += 1

    def watch(self) -> None:
        """Count a restart of the store that lost its marks (checked every few seconds)."""
        try:
            if self._store.watch():
                self._stats.dedup_store_resets += 1
        except DedupUnavailableError:
            self._stats.dedup_errors += 1

    @property
    def in_outage(self) -> bool:
        """Whether the store was found down and has not answered since."""
        return self._in_outage

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

"""Redis commands written to a connection without waiting for their replies (pipelined by hand).

redis-py's clients wait for every reply; the dedup marks and the high-water marks do not need to
(the marks' replies are read before a commit, the high-water marks' at the next save), and its
per-argument packing shows on the hot path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis


def packed(args: Sequence[bytes]) -> bytes:
    """One command in Redis' protocol (RESP), built without redis-py's per-argument work."""
    return b"*%d\r\n%s" % (len(args), b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args]))


def script_sha(script: str) -> bytes:
    """The name Redis gives a script (EVALSHA): its SHA-1."""
    return hashlib.sha1(script.encode()).hexdigest().encode()  # noqa: S324 - Redis names scripts by SHA-1


def load(script: str) -> bytes:
    """SCRIPT LOAD of ``script``: sent first on a new connection, so its EVALSHAs find it."""
    return packed([b"SCRIPT", b"LOAD", script.encode()])


def dedicated_connection(client: redis.Redis, key: bytes | str) -> tuple[Any, Any]:
    """A connection of its own from ``client``'s pool (on Redis Cluster: from the pool of the
    node holding ``key``), and that pool, to give it back with ``pool.release``."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        node = client.get_node_from_key(key)  # type: ignore[attr-defined]  # a RedisCluster
        pool = node.redis_connection.connection_pool
    return pool, pool.get_connection()

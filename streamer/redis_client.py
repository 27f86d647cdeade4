"""One way to connect to Redis for every Redis-backed part (dedup store, high-water marks).

- a single server or a replica set behind a proxy: ``redis://[user:password@]host:port/db``,
  or ``rediss://`` for TLS (ACL users and passwords are part of the URL);
- Redis Cluster: ``[dedup] cluster = true`` with the URL of any node; every key streamer writes
  for a group carries the group as a hash tag, so each batch script touches one slot;
- Sentinel: ``[dedup] sentinels = ["host:26379", ...]`` and ``sentinel_master = "name"``; the URL
  then only carries the credentials, the database and the TLS choice.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from streamer.settings import DedupSettings


def redis_client(cfg: DedupSettings) -> redis.Redis:
    """A client for the dedup Redis described by ``cfg``."""
    url = cfg.redis_url.get_secret_value()
    timeouts: dict[str, Any] = {
        "socket_timeout": cfg.timeout,
        "socket_connect_timeout": cfg.timeout,
    }
    if cfg.sentinels:
        parts = urlsplit(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel untyped
            [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in cfg.sentinels],
            sentinel_kwargs={**timeouts, "password": parts.password, "username": parts.username},
            username=parts.username,
            password=parts.password,
            ssl=parts.scheme == "rediss",
            db=int(parts.path.lstrip("/") or 0),
            **timeouts,
        )
        return cast(redis.Redis, sentinel.master_for(cfg.sentinel_master))  # type: ignore[no-untyped-call]
    if cfg.cluster:
        return cast(redis.Redis, RedisCluster.from_url(url, **timeouts))
    return redis.Redis.from_url(url, health_check_interval=30, **timeouts)

"""Redis helpers for tests."""

from __future__ import annotations

import redis


def redis_unavailable_reason(url: str, timeout: float = 5.0) -> str | None:
    """Return None when Redis at ``url`` answers PING, else why it does not."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        if not client.ping():
            return "PING did not return PONG"
    except redis.RedisError as exc:
        return f"PING failed: {exc}"
    finally:
        client.close()
    return None

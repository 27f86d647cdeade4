"""A worker app whose side effect is a Redis counter per record id, for the dedup tests.

Configured by environment variables, read at import time:

``DEDUP_APP_TOPIC``
    the topic to consume (required).
``DEDUP_APP_REDIS_URL``
    the Redis holding the side-effect counters (required). Tests point it at the shared dev
    Redis even when the worker's dedup store is another Redis, so the counts survive an outage.
``DEDUP_APP_PREFIX``
    the prefix of every counter key (required; unique per test, so the test can delete them).
``DEDUP_APP_WORK_US``
    busy-wait this many microseconds per record, before the effect (default 0).
``DEDUP_APP_GUARD``
    ``1``: wrap the handler in a "running" guard that detects the chain of one id running in two
    workers at once (default off).
``DEDUP_APP_WORKER``
    a name for this worker: also count the records it handled (default: not counted).
``DEDUP_APP_EFFECT``
    ``transaction``: apply the effect with ``streamer.dedup.redis_effect`` — in one MULTI/EXEC
    with the record's done mark (the effects Redis must then be the dedup Redis). Default: a
    plain INCR.

Keys written, per handled record with id N (the ``message-id`` header of
``tests.support.kafka.produce_records``):

- ``effect:<prefix>:<N>``: INCR — the side effect; its value is how many times the chain ran;
- ``running:<prefix>:<N>``: with the guard, INCR on entry and DECR on exit; an INCR that returns
  more than 1 means another worker is inside the chain for the same id, counted in
  ``violations:<prefix>``;
- ``handled:<prefix>:<worker>``: INCR, with ``DEDUP_APP_WORKER``.
"""

from __future__ import annotations

import os
import time

import redis

from streamer import App, Message
from streamer.dedup import idempotency_key, redis_effect

TOPIC = os.environ["DEDUP_APP_TOPIC"]
PREFIX = os.environ["DEDUP_APP_PREFIX"]
_WORK_S = int(os.environ.get("DEDUP_APP_WORK_US") or 0) / 1e6
_GUARD = os.environ.get("DEDUP_APP_GUARD", "") == "1"
_WORKER = os.environ.get("DEDUP_APP_WORKER") or None
_TRANSACTION = os.environ.get("DEDUP_APP_EFFECT", "") == "transaction"

_redis = redis.Redis.from_url(os.environ["DEDUP_APP_REDIS_URL"], socket_timeout=10)

app = App(name="dedup")


def effect_key(prefix: str, record: int) -> str:
    """The counter of how many times the chain ran for ``record``."""
    return f"effect:{prefix}:{record}"


def running_key(prefix: str, record: int) -> str:
    """The guard counter: how many workers are inside the chain for ``record`` now."""
    return f"running:{prefix}:{record}"


def violations_key(prefix: str) -> str:
    """How many times the guard found a second worker inside the chain for the same id."""
    return f"violations:{prefix}"


def handled_key(prefix: str, worker: str) -> str:
    """How many records the worker called ``worker`` handled."""
    return f"handled:{prefix}:{worker}"


def _busy_wait() -> None:
    deadline = time.perf_counter() + _WORK_S
    while time.perf_counter() < deadline:
        pass


@app.handler(TOPIC)
def handle(msg: Message) -> None:
    """Do the configured work, then count the effect (inside the guard if asked)."""
    header = msg.header("message-id")
    record = int(header) if header is not None else -1
    if _GUARD:
        running = running_key(PREFIX, record)
        if int(_redis.incr(running)) > 1:
            _redis.incr(violations_key(PREFIX))
        try:
            _busy_wait()
            _redis.incr(effect_key(PREFIX, record))
        finally:
            _redis.decr(running)
    elif _TRANSACTION:
        assert idempotency_key() == header  # the key a handler upserts with
        if _WORK_S:
            _busy_wait()
        with redis_effect() as effect:
            effect.incr(effect_key(PREFIX, record))
    else:
        if _WORK_S:
            _busy_wait()
        _redis.incr(effect_key(PREFIX, record))
    if _WORKER is not None:
        _redis.incr(handled_key(PREFIX, _WORKER))

"""Dedup cost: the Worker with dedup on (batch and per-record marks) vs off vs a raw confluent-kafka
loop over the same pre-filled topic, measured in the same run; and Redis memory per dedup key.

    .venv/bin/python -m bench.dedup                         # 300,000 records, 1,000,000 keys
    .venv/bin/python -m bench.dedup --records 50000 --keys 100000 --repeat 1

Needs the dev services (Kafka and Redis). The memory part writes to Redis database 15 of
--redis-url and empties it before and after.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import redis

from bench._common import (
    Resources,
    Run,
    base_parser,
    best,
    fmt_rate,
    median,
    prepare_topic,
    print_context,
    print_table,
    progress,
    raw_run,
    worker_run,
)
from streamer.dedup import KeyBuilder, RedisDedupStore
from streamer.logs import configure_logging
from streamer.message import Message

RATIO_GOAL, RATE_GOAL, BYTES_GOAL = 0.4, 100_000, 100


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables, return 0."""
    configure_logging("WARNING")
    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "), records=300_000, repeat=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keys", type=int, default=1_000_000, help="dedup keys for the memory measurement")
    args = parser.parse_args(argv)
    print_context(args.bootstrap)
    resources = Resources(args.bootstrap, keep=args.keep)
    try:
        topic = prepare_topic(args, resources, args.records)
        kinds = ("raw", "dedup off", "dedup on (batch)", "dedup on (per_record)")
        runs: dict[str, list[Run]] = {k: [] for k in kinds}
        for i in range(1, args.repeat + 1):
            for kind in kinds if i % 2 else reversed(kinds):
                group = resources.group("bench-dedup")
                if kind == "raw":
                    run = raw_run(args.bootstrap, topic, group)
                else:
                    namespace = f"bench-{uuid.uuid4().hex[:6]}"
                    dedup = {
                        "enabled": kind != "dedup off",
                        "redis_url": args.redis_url,
                        "namespace": namespace,
                        "mark_mode": "per_record" if "per_record" in kind else "batch",
                    }
                    run = worker_run(
                        args.bootstrap,
                        topic,
                        group,
                        label=kind,
                        extra={
                            "dedup": dedup,
                            "dead_letter": {"enabled": False},
                            "metrics": {"enabled": False},
                        },
                    )
                    _forget(args.redis_url, namespace)
                runs[kind].append(run)
                progress(run, i)
        raw = runs["raw"]
        rows = [
            (k, fmt_rate(best(v)), fmt_rate(median(v)), f"{median(v) / median(raw):.2f}")
            for k, v in runs.items()
        ]
        print_table(
            ("", "best rec/s", "median rec/s", "median / raw"),
            rows,
            title=f"{topic.records:,} records of 100 B, one poll batch = 500 records",
        )
        on = median(runs["dedup on (batch)"])
        print(
            f"goal dedup on >= {RATIO_GOAL} x raw and >= {RATE_GOAL:,} rec/s: "
            f"{'met' if on >= RATIO_GOAL * median(raw) and on >= RATE_GOAL else 'NOT met'} "
            f"({on / median(raw):.2f} x raw, {on:,.0f} rec/s)"
        )
    finally:
        resources.cleanup()
    memory(args.redis_url, args.keys)
    return 0


def _forget(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{namespace}:*", count=10_000):
        client.unlink(key)


def memory(url: str, keys: int) -> None:
    """Redis memory per done key, for short numeric ids and for UUIDs (stored as a digest)."""
    client = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/15")
    store = RedisDedupStore(client)
    builder = KeyBuilder("streamer", "orders", "message-id", None)
    rows = []
    for label, make in (
        ("8-digit ids", lambda i: str(10_000_000 + i)),
        ("UUID ids", lambda i: str(uuid.uuid4())),
    ):
        client.flushdb()
        before = int(client.info("memory")["used_memory"])
        for start in range(0, keys, 1000):
            batch = [
                builder.redis_key(Message("t", 0, i, None, None, (("message-id", make(i).encode()),)))
                for i in range(start, min(start + 1000, keys))
            ]
            store.mark_done(batch, 7 * 86_400_000)
        per_key = (int(client.info("memory")["used_memory"]) - before) / keys
        rows.append((label, f"{keys:,}", f"{per_key:.0f}", "met" if per_key <= BYTES_GOAL else "NOT met"))
    client.flushdb()
    print_table(
        ("", "keys", "bytes per key", f"goal <= {BYTES_GOAL} B"),
        rows,
        title="Redis memory per dedup key (group 'orders', 7-day TTL, used_memory delta)",
    )


if __name__ == "__main__":
    sys.exit(main())

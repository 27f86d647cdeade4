"""The worker's per-record Python cost without a broker: a fake source feeds pre-built batches
of real confluent-kafka Message objects, so that only streamer's own work is timed.

    .venv/bin/python -m bench.hotpath [--records 1000000] [--batch 500]

Prints wall and CPU µs per record (CPU of every thread of the process: the loop and the
processing thread) for a bare loop touching each record's value (the floor) and for the Worker
with a no-op handler (dead-letter and metrics off). Dedup needs Redis: see
bench/throughput.py. Free of broker noise, so it is the one to compare code changes with.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message as KafkaMessage

from streamer.logs import configure_logging
from streamer.message import Message
from streamer.settings import load_settings
from streamer.source import TP
from streamer.worker import Worker


class FakeSource:
    """Assigns one partition and serves pre-built batches, then stops the worker."""

    def __init__(self, batches: list[list[Any]]) -> None:
        self._batches = batches
        self._total = sum(map(len, batches))
        self._acks = 0
        self.worker: Worker | None = None
        self._on_assign: Any = None

    def describe_topics(self, topics: list[str], timeout: float = 10.0) -> dict[str, Any]:
        from streamer.source import TopicInfo

        return {t: TopicInfo(1, -1) for t in topics}

    def bind(self, on_commit: Any) -> None:
        self._on_commit = on_commit
        self._acks = 0

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any, on_lost: Any) -> None:
        self._on_assign = on_assign

    def poll(self, max_records: int, timeout: float) -> list[Any]:
        while self._acks:
            self._acks -= 1
            self._on_commit(None, [])
        if self._on_assign is not None:
            self._on_assign([("t", 0)])
            self._on_assign = None
        if not self._batches:
            assert self.worker is not None
            if self.worker.stats.processed >= self._total:  # every record ran: stop
                self.worker.request_stop("bench done")
            return []
        return self._batches.pop(0)

    def committed(self, partitions: list[TP], timeout: float = 10) -> dict[TP, Any]:
        return {}

    def commit(self, offsets: dict[TP, int], metadata: str, *, asynchronous: bool) -> None:
        self._acks += asynchronous  # acknowledged at the next poll, as librdkafka does

    def pause(self, partitions: list[TP]) -> None:
        return None

    def resume(self, partitions: list[TP]) -> None:
        return None

    def close(self) -> None:
        return None


def batches(
    records: int, size: int, headers: Callable[[int], list[tuple[str, bytes]]] | None = None
) -> list[list[Any]]:
    """Pre-built batches of real confluent-kafka Message objects on partition t[0] (``headers(i)``:
    record i's headers)."""
    value = b"x" * 100
    raws = [
        KafkaMessage(
            topic="t",
            partition=0,
            offset=i,
            key=None,
            value=value,
            headers=headers(i) if headers is not None else None,
            timestamp=(1, 1_700_000_000_000),
        )
        for i in range(records)
    ]
    out = [raws[i : i + size] for i in range(0, records, size)]
    # The pre-built records would make every GC pass scan a heap a real worker never has.
    gc.collect()
    gc.freeze()
    return out


def bare(records: int, size: int) -> tuple[float, float]:
    """The floor: touch each record's value. Returns wall and CPU seconds."""
    data = batches(records, size)
    started, cpu = time.perf_counter(), time.process_time()
    for batch in data:
        for raw in batch:
            raw.value()
    return time.perf_counter() - started, time.process_time() - cpu


def worker(records: int, size: int, every_records: int) -> tuple[float, float]:
    """The Worker with a no-op handler over the same batches."""
    settings = load_settings(
        kafka={"bootstrap_servers": "fake", "group_id": "bench"},
        commit={"every_records": every_records, "every_seconds": 5},
        dead_letter={"enabled": False},
        metrics={"enabled": False},
    )
    source = FakeSource(batches(records, size))

    def noop(msg: Message) -> None:
        return None

    w = Worker(settings, {"t": noop}, source=source)  # type: ignore[arg-type]  # FakeSource quacks like Source without subclassing it
    source.worker = w
    started, cpu = time.perf_counter(), time.process_time()
    w.run()
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    """Print µs per record for each loop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    configure_logging("WARNING")
    rows = [
        ("bare loop (floor)", bare(args.records, args.batch)),
        ("worker, commit every 1,000", worker(args.records, args.batch, 1000)),
    ]
    print(f"{'loop':30} {'wall µs/rec':>12} {'CPU µs/rec':>11} {'records/s':>12}")
    for name, (seconds, cpu) in rows:
        per, cpu_per = seconds / args.records * 1e6, cpu / args.records * 1e6
        print(f"{name:30} {per:12.2f} {cpu_per:11.2f} {args.records / seconds:12,.0f}")


if __name__ == "__main__":
    main()

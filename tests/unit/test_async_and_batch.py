"""Async chains, concurrent dispatch and batch handlers on the in-memory twins (pure logic).

What depends on Kafka (key order across a crash, the offset map read back by a new owner,
rebalances with records in flight) is tested against the real broker in
tests/integration/test_concurrency.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streamer import App, BatchFailed, ConfigError, DropRecord, Message, RetryableError
from streamer.chain import compose, is_async
from streamer.dedup import DedupStage, KeyBuilder, MemoryDedupStore
from streamer.engine.checkpoint import offset_map
from streamer.engine.offsetmap import decode
from streamer.engine.partition import OutOfOrder, PartitionState
from streamer.exitcodes import EXIT_OK
from streamer.middleware import decode as decode_step
from streamer.middleware import json_decoder, retry, timeout
from streamer.middleware.retry import RetryPolicy
from streamer.settings import Settings, load_settings
from streamer.stats import WorkerStats
from streamer.testing import ChainRunner, MemoryDeadLetterSink, MemorySource, message
from streamer.worker import Worker


def settings(**sections: dict[str, object]) -> Settings:
    sections["metrics"] = {"enabled": False, **sections.get("metrics", {})}
    return load_settings(
        kafka={"bootstrap_servers": "memory", "group_id": "g", "poll_batch_size": 7},
        commit={"every_records": 10, "every_seconds": 0},
        **sections,
    )


def values(n: int) -> list[bytes]:
    return [b"%d" % i for i in range(n)]


# -- composing async chains ------------------------------------------------------------------------


def test_the_builtin_middlewares_wrap_an_async_handler_in_async_wrappers() -> None:
    seen: list[object] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.decoded)

    chain = compose(handler, [decode_step(json_decoder), retry(RetryPolicy()), timeout(1.0)])
    assert is_async(chain)
    asyncio.run(chain(message(b'{"a": 1}')))  # type: ignore[arg-type]
    assert seen == [{"a": 1}]


def sync_only(next_handler):  # type: ignore[no-untyped-def]
    def wrapper(msg: Message) -> None:
        next_handler(msg)

    return wrapper


def test_a_sync_middleware_around_an_async_handler_is_refused_at_start_up_naming_it() -> None:
    async def handler(msg: Message) -> None: ...

    with pytest.raises(ConfigError, match=r"topic 'orders': middleware sync_only returns a sync handler"):
        compose(handler, [sync_only], topic="orders")


def test_an_async_middleware_around_a_sync_handler_is_refused_at_start_up() -> None:
    def async_only(next_handler):  # type: ignore[no-untyped-def]
        async def wrapper(msg: Message) -> None:
            next_handler(msg)

        return wrapper

    with pytest.raises(ConfigError, match="returns a async handler around the sync handler"):
        compose(lambda msg: None, [async_only], topic="t")


def test_the_async_timeout_cancels_the_attempt_and_the_retry_middleware_retries_it() -> None:
    app = App()
    attempts: list[int] = []

    @app.handler("t")
    async def handler(msg: Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            await asyncio.sleep(10)

    cfg = settings(topics={"t": {"timeout_seconds": 0.05}}, retry={"max_attempts": 3})
    outcome = ChainRunner(app, "t", cfg).run(message(b"x"))
    assert outcome.handled
    assert attempts == [1, 2]


def test_an_async_handlers_own_timeout_error_is_not_taken_for_the_deadline() -> None:
    app = App()

    @app.handler("t")
    async def handler(msg: Message) -> None:
        raise TimeoutError("the client's own")

    cfg = settings(topics={"t": {"timeout_seconds": 5}}, retry={"max_attempts": 1})
    outcome = ChainRunner(app, "t", cfg).run(message(b"x"))
    assert outcome.dead_lettered
    assert "the client's own" in str(outcome.error)


# -- concurrent dispatch on the in-memory source ---------------------------------------------------


def test_concurrent_async_records_overlap_and_every_offset_is_committed() -> None:
    running, peak = 0, 0

    async def handler(msg: Message) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1

    source = MemorySource({"t": [values(40), values(30)]})
    worker = Worker(
        settings(processing={"concurrency": 16, "ordering": "none"}),
        {"t": handler},
        source=source,
        until_end=True,
    )
    assert worker.run() == EXIT_OK
    assert source.commits[-1][0] == {("t", 0): 40, ("t", 1): 30}
    assert worker.stats.processed == 70
    assert peak > 1, "records ran at the same time"


def test_ordering_partition_never_runs_two_records_of_a_partition_at_once() -> None:
    running: dict[int, int] = {}
    overlapped: list[int] = []
    order: dict[int, list[int]] = {0: [], 1: []}

    async def handler(msg: Message) -> None:
        running[msg.partition] = running.get(msg.partition, 0) + 1
        if running[msg.partition] > 1:
            overlapped.append(msg.offset)
        order[msg.partition].append(msg.offset)
        await asyncio.sleep(0.001)
        running[msg.partition] -= 1

    source = MemorySource({"t": [values(25), values(25)]})
    cfg = settings(processing={"concurrency": 8, "ordering": "partition"})
    assert Worker(cfg, {"t": handler}, source=source, until_end=True).run() == EXIT_OK
    assert overlapped == []
    assert order == {0: list(range(25)), 1: list(range(25))}


def test_sync_handlers_with_concurrency_run_on_a_pool_of_that_many_threads() -> None:
    lock = threading.Lock()
    running, peak = 0, 0
    threads: set[tuple[int, str]] = set()
    release = threading.Event()

    def handler(msg: Message) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add((threading.get_ident(), threading.current_thread().name))
            if running == 4:
                release.set()
        release.wait(5)
        with lock:
            running -= 1

    source = MemorySource({"t": [values(20)]})
    cfg = settings(processing={"concurrency": 4, "ordering": "none"})
    assert Worker(cfg, {"t": handler}, source=source, until_end=True).run() == EXIT_OK
    assert peak == 4
    assert len(threads) == 4
    assert {name for _, name in threads} == {"streamer-handler"}


def test_a_parked_record_under_concurrency_is_finished_and_the_rest_go_on() -> None:
    app = App()

    @app.handler("t")
    async def handler(msg: Message) -> None:
        if msg.offset == 5:
            raise ValueError("bad record")

    source = MemorySource({"t": [values(12)]})
    sink = MemoryDeadLetterSink()
    cfg = settings(processing={"concurrency": 4, "ordering": "none"}, retry={"max_attempts": 1})
    worker = Worker(cfg, app.chains(cfg), source=source, until_end=True, dead_letter=sink)
    assert worker.run() == EXIT_OK
    assert [m.offset for _, m, _ in sink.parked] == [5]
    assert source.commits[-1][0] == {("t", 0): 12}


# -- the offset map in the commit ------------------------------------------------------------------


def test_the_commit_carries_the_offsets_finished_above_the_prefix() -> None:
    state = PartitionState(("t", 0), committed=100)
    tracker = state.tracker = OutOfOrder()
    for offset in range(100, 110):
        tracker.start(offset)
    for offset in (101, 102, 105, 109):
        tracker.finish(offset)
    text = offset_map(state, 100)
    assert decode(100, text) == {101, 102, 105, 109}
    tracker.finish(100)  # the prefix moves to 103: only what is above it stays in the map
    assert decode(103, offset_map(state, 103)) == {105, 109}


def test_an_earlier_owners_map_is_carried_on_until_the_prefix_passes_it() -> None:
    state = PartitionState(("t", 0), committed=10)
    state.skip = frozenset({12, 15})
    assert decode(10, offset_map(state, 10)) == {12, 15}
    assert decode(13, offset_map(state, 13)) == {15}
    assert offset_map(state, 16) == ""


def test_a_worker_skips_the_offsets_the_committed_map_says_finished() -> None:
    seen: list[int] = []
    source = MemorySource({"t": [values(10)]})
    source._committed[("t", 0)] = 2
    source._metadata[("t", 0)] = "streamer/1 state=running run_start=1 at=2 map=" + _map(2, {3, 4, 7})
    worker = Worker(settings(), {"t": lambda m: seen.append(m.offset)}, source=source, until_end=True)
    assert worker.run() == EXIT_OK
    assert seen == [2, 5, 6, 8, 9]
    assert worker.stats.skipped == 3
    assert source.commits[-1][0] == {("t", 0): 10}


def _map(base: int, offsets: set[int]) -> str:
    from streamer.engine.offsetmap import encode

    return encode(base, offsets)


# -- batch handlers --------------------------------------------------------------------------------


def test_a_batch_handler_gets_lists_of_at_most_max_records_in_fetch_order() -> None:
    app = App()
    batches: list[list[int]] = []

    @app.batch_handler("t", max_records=5, max_wait=0.01)
    def handle(msgs: list[Message]) -> None:
        batches.append([m.offset for m in msgs])

    source = MemorySource({"t": [values(23)]})
    cfg = settings()
    assert Worker(cfg, app.chains(cfg), source=source, until_end=True).run() == EXIT_OK
    assert all(len(b) <= 5 for b in batches)
    assert [o for b in batches for o in b] == list(range(23))
    assert source.commits[-1][0] == {("t", 0): 23}


def test_batch_failed_retries_only_the_named_records_then_parks_them() -> None:
    app = App()
    calls: list[list[int]] = []

    @app.batch_handler("t", max_records=10, max_wait=0.01)
    def handle(msgs: list[Message]) -> None:
        calls.append([m.offset for m in msgs])
        bad = [i for i, m in enumerate(msgs) if m.offset in (3, 6)]
        if bad:
            raise BatchFailed(bad, RetryableError("downstream 503"))

    source = MemorySource({"t": [values(10)]})
    sink = MemoryDeadLetterSink()
    cfg = settings(retry={"max_attempts": 3, "initial_backoff": 0.001})
    worker = Worker(cfg, app.chains(cfg), source=source, until_end=True, dead_letter=sink)
    assert worker.run() == EXIT_OK
    assert calls[0] == list(range(10))
    assert calls[1:] == [[3, 6], [3, 6]]
    assert sorted(m.offset for _, m, _ in sink.parked) == [3, 6]
    assert source.commits[-1][0] == {("t", 0): 10}
    assert worker.stats.processed == 8
    assert worker.stats.dead_lettered == 2


def test_the_testing_runner_runs_async_batch_handlers_and_decodes_each_record() -> None:
    app = App()

    @app.batch_handler("t")
    async def handle(msgs: list[Message]) -> None:
        if any(m.decoded == {"fail": True} for m in msgs):
            raise BatchFailed([i for i, m in enumerate(msgs) if m.decoded == {"fail": True}])

    cfg = settings(topics={"t": {"decoder": "json"}}, retry={"max_attempts": 2})
    outcomes = ChainRunner(app, "t", cfg).run_batch(
        [message(b'{"ok": 1}'), message(b"not json"), message(b'{"fail": true}')]
    )
    assert [o.kind for o in outcomes] == ["handled", "dead_lettered", "dead_lettered"]
    assert outcomes[2].attempts == 2


def test_a_dropped_batch_counts_as_finished() -> None:
    app = App()

    @app.batch_handler("t", max_records=4)
    def handle(msgs: list[Message]) -> None:
        raise DropRecord("not ours")

    source = MemorySource({"t": [values(8)]})
    cfg = settings()
    worker = Worker(cfg, app.chains(cfg), source=source, until_end=True)
    assert worker.run() == EXIT_OK
    assert worker.stats.dropped == 8
    assert worker.stats.processed == 0
    assert source.commits[-1][0] == {("t", 0): 8}


def test_batch_handlers_refuse_concurrency_with_a_clear_error() -> None:
    app = App()

    @app.batch_handler("t")
    def handle(msgs: list[Message]) -> None: ...

    with pytest.raises(ConfigError, match="batch handlers run one batch at a time"):
        app.chains(settings(processing={"concurrency": 4}))


def test_the_same_idempotency_key_twice_in_flight_runs_once() -> None:
    """A producer's retry puts a record twice in one batch: under concurrency ("none", so the
    copies would run in parallel) the second copy waits for the first and is a dedup hit."""
    ran: list[bytes | None] = []

    async def handler(msg: Message) -> None:
        ran.append(msg.value)
        await asyncio.sleep(0.01)

    source = MemorySource({"t": [[b"a", b"b", b"a", b"c", b"a", b"b"]]})
    cfg = settings(processing={"concurrency": 8, "ordering": "none"}, metrics={"track_reprocessed": "off"})
    stats = WorkerStats()
    keys = KeyBuilder("streamer", "g", "message-id", lambda m: m.value)
    dedup = DedupStage(MemoryDedupStore(), cfg.dedup, keys, stats, "w", lambda s: True, lambda started: None)
    worker = Worker(cfg, {"t": handler}, source=source, until_end=True, dedup=dedup)
    assert worker.run() == EXIT_OK
    assert sorted(v or b"" for v in ran) == [b"a", b"b", b"c"]
    assert worker.stats.dedup_hits == 3
    assert source.commits[-1][0] == {("t", 0): 6}


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_attempt_blocked_past_its_timeout_is_counted_and_reported(concurrency: int) -> None:
    """time.sleep is a C call: the timeout cannot interrupt it; the overrun is counted (and the
    attempt still fails with HandlerTimeoutError when it returns: parked here, one attempt)."""

    app = App()

    @app.handler("t")
    def handler(msg: Message) -> None:
        if msg.offset == 1:
            time.sleep(0.8)

    source = MemorySource({"t": [values(3)]})
    sink = MemoryDeadLetterSink()
    cfg = settings(
        topics={"t": {"timeout_seconds": 0.1}},
        retry={"max_attempts": 1},
        processing={"concurrency": concurrency, "ordering": "none"},
    )
    worker = Worker(cfg, app.chains(cfg), source=source, until_end=True, dead_letter=sink)
    assert worker.run() == EXIT_OK
    assert worker.stats.topics["t"].overruns == 1
    assert [m.offset for _, m, _ in sink.parked] == [1]

"""The dedup stage without Redis: KeyBuilder, DedupStage on MemoryDedupStore, outages, contested claims."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from streamer.dedup import (
    ClaimStatus,
    DedupStage,
    DedupUnavailableError,
    KeyBuilder,
    MemoryDedupStore,
    StopDuringOutageError,
)
from streamer.message import Message
from streamer.settings import DedupSettings
from streamer.stats import WorkerStats

GROUP = "orders-group"
PREFIX = b"ns:{orders-group}:"


def message(
    headers: tuple[tuple[str, bytes | None], ...] = (),
    *,
    topic: str = "orders",
    partition: int = 2,
    offset: int = 41,
) -> Message:
    return Message(topic, partition, offset, b"key", b"value", headers)


def builder(header: str = "message-id", key_fn: object = None) -> KeyBuilder:
    return KeyBuilder("ns", GROUP, header, key_fn)  # type: ignore[arg-type]


# --- KeyBuilder ---------------------------------------------------------------------------------


def test_key_comes_from_the_header() -> None:
    keys = builder()
    msg = message((("other", b"x"), ("message-id", b"abc-123")))
    assert keys.idempotency_key(msg) == b"abc-123"
    assert keys.redis_key(msg) == PREFIX + b"abc-123"


def test_key_uses_the_last_header_of_that_name() -> None:
    msg = message((("message-id", b"first"), ("message-id", b"second")))
    assert builder().idempotency_key(msg) == b"second"


def test_header_wins_over_the_key_function() -> None:
    keys = builder(key_fn=lambda m: "from-fn")
    assert keys.idempotency_key(message((("message-id", b"from-header"),))) == b"from-header"


def test_key_function_is_used_when_the_header_is_missing() -> None:
    seen: list[Message] = []

    def key_fn(msg: Message) -> str:
        seen.append(msg)
        return f"order-{msg.offset}"

    msg = message((("unrelated", b"1"),))
    keys = builder(key_fn=key_fn)
    assert keys.idempotency_key(msg) == b"order-41"
    assert keys.redis_key(msg) == PREFIX + b"order-41"
    assert seen == [msg, msg]


def test_key_function_may_return_bytes() -> None:
    assert builder(key_fn=lambda m: b"\x00raw").idempotency_key(message()) == b"\x00raw"


def test_key_function_returning_none_falls_back_to_the_position() -> None:
    assert builder(key_fn=lambda m: None).idempotency_key(message()) == b"orders/2/41"


def test_without_header_and_key_function_the_key_is_topic_partition_offset() -> None:
    keys = builder()
    msg = message(topic="payments", partition=0, offset=7)
    assert keys.idempotency_key(msg) == b"payments/0/7"
    assert keys.redis_key(msg) == PREFIX + b"payments/0/7"


def test_an_empty_key_header_setting_never_reads_headers() -> None:
    keys = builder(header="")
    msg = message((("", b"empty-name"), ("message-id", b"abc")))
    assert keys.idempotency_key(msg) == b"orders/2/41"


def test_header_with_a_none_value_counts_as_missing() -> None:
    assert builder().idempotency_key(message((("message-id", None),))) == b"orders/2/41"


def test_keys_are_namespaced_by_group_as_a_cluster_hash_tag() -> None:
    msg = message((("message-id", b"42"),))
    one = KeyBuilder("streamer", "group-a", "message-id", None).redis_key(msg)
    other = KeyBuilder("streamer", "group-b", "message-id", None).redis_key(msg)
    assert one == b"streamer:{group-a}:42"
    assert other == b"streamer:{group-b}:42"
    # Redis Cluster hashes only what is between the first { and the next }: the group.
    assert one[one.index(b"{") + 1 : one.index(b"}")] == b"group-a"


def test_a_key_of_32_bytes_is_kept_as_is() -> None:
    raw = b"k" * 32
    assert builder().redis_key(message((("message-id", raw),))) == PREFIX + raw


def test_a_longer_key_is_stored_as_a_16_byte_digest() -> None:
    raw = b"k" * 33
    key = builder().redis_key(message((("message-id", raw),)))
    assert key == PREFIX + hashlib.blake2b(raw, digest_size=16).digest()
    assert len(key) == len(PREFIX) + 16


def test_long_keys_hash_deterministically_and_distinctly() -> None:
    keys = builder()
    a = keys.redis_key(message((("message-id", b"x" * 100),)))
    again = keys.redis_key(message((("message-id", b"x" * 100),)))
    b = keys.redis_key(message((("message-id", b"x" * 99 + b"y"),)))
    assert a == again
    assert a != b


def test_a_long_position_key_is_hashed_too() -> None:
    msg = message(topic="t" * 40, partition=1, offset=5)
    raw = f"{'t' * 40}/1/5".encode()
    assert builder().redis_key(msg) == PREFIX + hashlib.blake2b(raw, digest_size=16).digest()


# --- DedupStage on the in-memory store --------------------------------------------------------------


class FakeWait:
    """The worker's wait function: records the delays asked for; may act or ask to stop."""

    def __init__(self, *, stop_after: int | None = None) -> None:
        self.delays: list[float] = []
        self.stop_after = stop_after
        self.on_call: list[object] = []

    def __call__(self, seconds: float) -> bool:
        self.delays.append(seconds)
        for action in self.on_call:
            action(len(self.delays))  # type: ignore[operator]
        return self.stop_after is None or len(self.delays) < self.stop_after


class Outages:
    """Records on_outage calls."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, started: bool) -> None:
        self.calls.append(started)


class FlakyStore(MemoryDedupStore):
    """A MemoryDedupStore whose next ``failures`` calls raise DedupUnavailableError."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.calls: list[str] = []

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if self.failures > 0:
            self.failures -= 1
            raise DedupUnavailableError("redis: ConnectionError: connection refused")

    def claim(self, keys: Sequence[bytes], token: str, lease_ms: int) -> list[ClaimStatus]:
        self._maybe_fail("claim")
        return super().claim(keys, token, lease_ms)

    def mark_done(self, keys: Sequence[bytes], window_ms: int) -> None:
        self._maybe_fail("mark")
        super().mark_done(keys, window_ms)

    def release(self, keys: Sequence[bytes], token: str) -> None:
        self._maybe_fail("release")
        super().release(keys, token)


def stage(
    store: MemoryDedupStore,
    owner: str = "worker-a",
    *,
    wait: FakeWait | None = None,
    outages: Outages | None = None,
    stats: WorkerStats | None = None,
    **settings: object,
) -> DedupStage:
    return DedupStage(
        store,
        DedupSettings(enabled=True, **settings),  # type: ignore[arg-type]
        builder(),
        stats if stats is not None else WorkerStats(),
        owner,
        wait if wait is not None else FakeWait(),
        outages if outages is not None else Outages(),
    )


K1, K2, K3 = PREFIX + b"1", PREFIX + b"2", PREFIX + b"3"


def test_stage_builds_keys_with_its_key_builder() -> None:
    assert stage(MemoryDedupStore()).key(message((("message-id", b"9"),))) == PREFIX + b"9"


def test_claim_of_fresh_keys_claims_them_under_the_workers_token() -> None:
    store = MemoryDedupStore()
    assert stage(store).claim([K1, K2]) == [ClaimStatus.CLAIMED, ClaimStatus.CLAIMED]
    assert store.state == {K1: "c:worker-a", K2: "c:worker-a"}


def test_claim_again_by_the_same_token_is_still_claimed() -> None:
    store = MemoryDedupStore()
    a = stage(store)
    a.claim([K1])
    assert a.claim([K1]) == [ClaimStatus.CLAIMED]
    # A restarted worker with the same token (static membership) takes its claims back.
    assert stage(store, "worker-a").claim([K1]) == [ClaimStatus.CLAIMED]


def test_claim_held_by_another_token_is_contested() -> None:
    store = MemoryDedupStore()
    stage(store, "worker-a").claim([K1])
    assert stage(store, "worker-b").claim([K1, K2]) == [ClaimStatus.CONTESTED, ClaimStatus.CLAIMED]
    assert store.state[K1] == "c:worker-a"


def test_marked_keys_are_done_for_every_worker() -> None:
    store = MemoryDedupStore()
    a, b = stage(store, "worker-a"), stage(store, "worker-b")
    a.claim([K1, K2])
    assert a.mark_done([K1])
    assert a.claim([K1]) == [ClaimStatus.DONE]
    assert b.claim([K1, K2, K3]) == [ClaimStatus.DONE, ClaimStatus.CONTESTED, ClaimStatus.CLAIMED]


def test_mark_of_nothing_does_not_call_the_store() -> None:
    store = FlakyStore()
    assert stage(store).mark_done([])
    stage(store).release([])
    assert store.calls == []


def test_release_drops_only_our_own_claims() -> None:
    store = MemoryDedupStore()
    a, b = stage(store, "worker-a"), stage(store, "worker-b")
    a.claim([K1])
    b.claim([K2])
    a.mark_done([K3])
    a.release([K1, K2, K3])
    assert store.state == {K2: "c:worker-b", K3: "1"}
    assert b.claim([K1]) == [ClaimStatus.CLAIMED]


def test_release_by_a_non_owner_does_nothing() -> None:
    store = MemoryDedupStore()
    stage(store, "worker-a").claim([K1])
    stage(store, "worker-b").release([K1])
    assert store.state == {K1: "c:worker-a"}


# --- outages: fail closed -------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "call"), [("claim", "claim"), ("mark", "mark_done")])
def test_outage_pauses_once_waits_with_growing_delays_and_resumes_once(op: str, call: str) -> None:
    store, wait, outages, stats = FlakyStore(failures=4), FakeWait(), Outages(), WorkerStats()
    dedup = stage(store, wait=wait, outages=outages, stats=stats)
    result = getattr(dedup, call)([K1, K2])
    assert result in ([ClaimStatus.CLAIMED, ClaimStatus.CLAIMED], True)
    assert outages.calls == [True, False]
    assert wait.delays == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert store.calls == [op] * 5
    assert stats.dedup_errors == 4
    assert stats.processed_without_dedup == 0
    assert store.state[K1] == ("c:worker-a" if op == "claim" else "1")


def test_outage_backoff_is_capped_at_five_seconds() -> None:
    wait = FakeWait()
    stage(FlakyStore(failures=9), wait=wait).claim([K1])
    assert wait.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


def test_on_outage_is_not_called_when_the_store_answers() -> None:
    outages, wait = Outages(), FakeWait()
    dedup = stage(FlakyStore(), wait=wait, outages=outages)
    dedup.claim([K1])
    dedup.mark_done([K1])
    assert outages.calls == []
    assert wait.delays == []


def test_a_second_outage_pauses_and_resumes_again_with_a_fresh_backoff() -> None:
    store, wait, outages = FlakyStore(failures=2), FakeWait(), Outages()
    dedup = stage(store, wait=wait, outages=outages)
    dedup.claim([K1])
    store.failures = 3
    dedup.mark_done([K1])
    assert outages.calls == [True, False, True, False]
    assert wait.delays == pytest.approx([0.1, 0.2, 0.1, 0.2, 0.4])


def test_a_stop_requested_during_an_outage_raises_and_stays_paused() -> None:
    outages = Outages()
    dedup = stage(FlakyStore(failures=100), wait=FakeWait(stop_after=3), outages=outages)
    with pytest.raises(StopDuringOutageError):
        dedup.claim([K1])
    assert outages.calls == [True]


def test_mark_without_blocking_reports_an_outage_instead_of_waiting() -> None:
    store, wait, outages, stats = FlakyStore(failures=1), FakeWait(), Outages(), WorkerStats()
    dedup = stage(store, wait=wait, outages=outages, stats=stats)
    assert dedup.mark_done([K1], block=False) is False
    assert K1 not in store.state
    assert wait.delays == []
    assert outages.calls == []
    assert stats.dedup_errors == 1
    assert dedup.mark_done([K1], block=False) is True
    assert store.state[K1] == "1"


def test_release_during_an_outage_is_best_effort() -> None:
    store, stats = FlakyStore(), WorkerStats()
    dedup = stage(store, stats=stats)
    dedup.claim([K1])
    store.failures = 1
    dedup.release([K1])  # does not raise: the claim expires with its lease
    assert stats.dedup_errors == 1
    assert store.state == {K1: "c:worker-a"}


def test_proceed_mode_lets_records_through_and_counts_them() -> None:
    store, wait, outages, stats = FlakyStore(failures=2), FakeWait(), Outages(), WorkerStats()
    dedup = stage(store, wait=wait, outages=outages, stats=stats, on_unavailable="proceed")
    assert dedup.claim([K1, K2, K3]) == [ClaimStatus.CLAIMED] * 3
    assert stats.processed_without_dedup == 3
    assert dedup.mark_done([K1]) is True  # the mark is given up, not retried
    assert store.calls == ["claim", "mark"]
    assert store.state == {}
    assert wait.delays == []
    assert outages.calls == []
    assert stats.dedup_errors == 2


def test_proceed_mode_mark_without_blocking_lets_offsets_be_committed() -> None:
    stats = WorkerStats()
    dedup = stage(FlakyStore(failures=1), stats=stats, on_unavailable="proceed")
    assert dedup.mark_done([K1], block=False) is True
    assert stats.dedup_errors == 1


def test_proceed_mode_uses_the_store_while_it_answers() -> None:
    store, stats = FlakyStore(), WorkerStats()
    dedup = stage(store, stats=stats, on_unavailable="proceed")
    dedup.claim([K1])
    dedup.mark_done([K1])
    assert dedup.claim([K1]) == [ClaimStatus.DONE]
    assert stats.processed_without_dedup == 0


def test_settings_reach_the_stage() -> None:
    dedup = stage(MemoryDedupStore(), lease_seconds=3.0, window_seconds=60.0, mark_mode="per_record")
    assert dedup.per_record
    assert dedup.lease_seconds == 3.0
    assert not stage(MemoryDedupStore()).per_record


def test_lease_and_window_are_passed_to_the_store_in_milliseconds() -> None:
    seen: dict[str, int] = {}

    class Spy(MemoryDedupStore):
        def claim(self, keys: Sequence[bytes], token: str, lease_ms: int) -> list[ClaimStatus]:
            seen["lease_ms"] = lease_ms
            return super().claim(keys, token, lease_ms)

        def mark_done(self, keys: Sequence[bytes], window_ms: int) -> None:
            seen["window_ms"] = window_ms
            super().mark_done(keys, window_ms)

    dedup = stage(Spy(), lease_seconds=1.5, window_seconds=3600.0)
    dedup.claim([K1])
    dedup.mark_done([K1])
    assert seen == {"lease_ms": 1500, "window_ms": 3_600_000}


# --- contested claims -----------------------------------------------------------------------------


def test_resolve_contested_returns_claimed_once_the_other_claim_is_released() -> None:
    store, wait, stats = MemoryDedupStore(), FakeWait(), WorkerStats()
    other = stage(store, "worker-b")
    other.claim([K1])
    wait.on_call.append(lambda n: other.release([K1]) if n == 4 else None)
    dedup = stage(store, "worker-a", wait=wait, stats=stats)
    assert dedup.claim([K1]) == [ClaimStatus.CONTESTED]
    assert dedup.resolve_contested(K1) is ClaimStatus.CLAIMED
    assert store.state[K1] == "c:worker-a"
    assert wait.delays == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert stats.dedup_contested == 1


def test_resolve_contested_returns_done_when_the_other_worker_finishes() -> None:
    store, wait = MemoryDedupStore(), FakeWait()
    other = stage(store, "worker-b")
    other.claim([K1])
    wait.on_call.append(lambda n: other.mark_done([K1]) if n == 2 else None)
    assert stage(store, "worker-a", wait=wait).resolve_contested(K1) is ClaimStatus.DONE
    assert store.state[K1] == "1"


def test_resolve_contested_delay_is_capped_at_one_second() -> None:
    store, wait = MemoryDedupStore(), FakeWait()
    other = stage(store, "worker-b")
    other.claim([K1])
    wait.on_call.append(lambda n: other.release([K1]) if n == 8 else None)
    stage(store, "worker-a", wait=wait).resolve_contested(K1)
    assert wait.delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_resolve_contested_raises_when_a_stop_is_requested() -> None:
    store = MemoryDedupStore()
    stage(store, "worker-b").claim([K1])
    dedup = stage(store, "worker-a", wait=FakeWait(stop_after=2))
    with pytest.raises(StopDuringOutageError):
        dedup.resolve_contested(K1)
    assert store.state[K1] == "c:worker-b"


def test_resolve_contested_that_meets_an_outage_fails_closed_then_claims() -> None:
    store, wait, outages = FlakyStore(), FakeWait(), Outages()
    other = stage(store, "worker-b")
    other.claim([K1])

    def on_wait(n: int) -> None:
        if n == 1:
            other.release([K1])  # the other worker's claim goes away,
            store.failures = 2  # and the store goes down for the next two calls

    wait.on_call.append(on_wait)
    dedup = stage(store, "worker-a", wait=wait, outages=outages)
    assert dedup.resolve_contested(K1) is ClaimStatus.CLAIMED
    assert outages.calls == [True, False]

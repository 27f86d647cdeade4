"""The dedup stage without Redis (format 2): KeyBuilder and DedupKey, the key layout, buckets and
bitmaps, the mark commands and the scripts' arguments, MemoryDedupStore's id claims and partition
leases (and partition_local_ids), DedupStage on it (release, hand-over, renew), outages and
contested claims."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import streamer.dedup as dedup_module
from streamer import resp
from streamer.dedup import (
    _MARK,
    _MARK_SHA,
    _SKEW_MS,
    CHUNK_BITS,
    FIELD_BYTES,
    TP,
    ClaimAnswer,
    ClaimStatus,
    DedupKey,
    DedupStage,
    DedupUnavailableError,
    KeyBuilder,
    KeyLayout,
    MemoryDedupStore,
    RedisDedupStore,
    StopDuringOutageError,
    _ShardNames,
    buckets,
    has_bit,
    shard_bits_for,
)
from streamer.message import Message
from streamer.settings import DedupSettings
from streamer.stats import WorkerStats

GROUP = "orders-group"
LEGACY_PREFIX = b"ns:{orders-group}:"
PREFIX = b"ns:2:{orders-group}:"


def message(
    headers: tuple[tuple[str, bytes | None], ...] = (),
    *,
    topic: str = "orders",
    partition: int = 2,
    offset: int = 41,
) -> Message:
    return Message(topic, partition, offset, b"key", b"value", headers)


def with_id(ident: bytes, *, topic: str = "orders", partition: int = 2, offset: int = 41) -> Message:
    return message((("message-id", ident),), topic=topic, partition=partition, offset=offset)


def builder(header: str = "message-id", key_fn: object = None) -> KeyBuilder:
    return KeyBuilder("ns", GROUP, header, key_fn)  # type: ignore[arg-type]


def digest_of(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


# --- KeyBuilder ---------------------------------------------------------------------------------


def test_key_comes_from_the_header() -> None:
    keys = builder()
    msg = message((("other", b"x"), ("message-id", b"abc-123")))
    assert keys.idempotency_key(msg) == b"abc-123"
    key = keys.key(msg)
    assert key.raw == b"abc-123"
    assert key.digest == digest_of(b"abc-123")
    assert (key.topic, key.partition, key.offset) == ("orders", 2, 41)
    assert key.tp == ("orders", 2)


def test_key_uses_the_last_header_of_that_name() -> None:
    msg = message((("message-id", b"first"), ("message-id", b"second")))
    assert builder().idempotency_key(msg) == b"second"
    assert builder().key(msg) == builder().key(with_id(b"second"))


def test_header_wins_over_the_key_function() -> None:
    keys = builder(key_fn=lambda m: "from-fn")
    msg = message((("message-id", b"from-header"),))
    assert keys.idempotency_key(msg) == b"from-header"
    assert keys.key(msg).raw == b"from-header"


def test_key_function_is_used_when_the_header_is_missing() -> None:
    seen: list[Message] = []

    def key_fn(msg: Message) -> str:
        seen.append(msg)
        return f"order-{msg.offset}"

    msg = message((("unrelated", b"1"),))
    keys = builder(key_fn=key_fn)
    assert keys.idempotency_key(msg) == b"order-41"
    key = keys.key(msg)
    assert key.raw == b"order-41"
    assert key.digest == digest_of(b"order-41")
    assert seen == [msg, msg]


def test_key_function_may_return_bytes() -> None:
    keys = builder(key_fn=lambda m: b"\x00raw")
    assert keys.idempotency_key(message()) == b"\x00raw"
    assert keys.key(message()).digest == digest_of(b"\x00raw")


def test_a_key_function_returning_str_and_one_returning_bytes_give_equal_keys() -> None:
    as_str = builder(key_fn=lambda m: "order-7").key(message(offset=1))
    as_bytes = builder(key_fn=lambda m: b"order-7").key(message(offset=2))
    from_header = builder().key(with_id(b"order-7", offset=3))
    assert as_str == as_bytes == from_header


def test_key_function_returning_none_falls_back_to_the_position() -> None:
    keys = builder(key_fn=lambda m: None)
    assert keys.idempotency_key(message()) == b"orders/2/41"
    key = keys.key(message())
    assert key.digest is None
    assert key.raw == b"orders/2/41"


def test_without_header_and_key_function_the_key_is_topic_partition_offset() -> None:
    keys = builder()
    msg = message(topic="payments", partition=0, offset=7)
    assert keys.idempotency_key(msg) == b"payments/0/7"
    key = keys.key(msg)
    assert key.digest is None
    assert key.raw == b"payments/0/7"
    assert (key.topic, key.partition, key.offset) == ("payments", 0, 7)


def test_an_empty_key_header_setting_never_reads_headers() -> None:
    keys = builder(header="")
    msg = message((("", b"empty-name"), ("message-id", b"abc")))
    assert keys.idempotency_key(msg) == b"orders/2/41"
    assert keys.key(msg).digest is None


def test_an_empty_key_header_setting_still_uses_the_key_function() -> None:
    keys = builder(header="", key_fn=lambda m: "fn")
    assert keys.key(message((("message-id", b"abc"),))).raw == b"fn"


def test_header_with_a_none_value_counts_as_missing() -> None:
    msg = message((("message-id", None),))
    assert builder().idempotency_key(msg) == b"orders/2/41"
    assert builder().key(msg).digest is None


def test_header_with_a_none_value_falls_through_to_the_key_function() -> None:
    msg = message((("message-id", None),))
    assert builder(key_fn=lambda m: "fn").key(msg).raw == b"fn"


# --- DedupKey -------------------------------------------------------------------------------------


def test_the_same_id_at_other_offsets_partitions_and_topics_is_the_same_key() -> None:
    keys = builder()
    here = keys.key(with_id(b"order-1", offset=41))
    later = keys.key(with_id(b"order-1", offset=900))
    elsewhere = keys.key(with_id(b"order-1", partition=5, offset=3))
    other_topic = keys.key(with_id(b"order-1", topic="payments", partition=0, offset=0))
    assert here == later == elsewhere == other_topic
    assert len({hash(here), hash(later), hash(elsewhere), hash(other_topic)}) == 1
    assert len({here, later, elsewhere, other_topic}) == 1
    # Each keeps its own position: its partition's lease covers it.
    assert elsewhere.tp == ("orders", 5)
    assert later.offset == 900


def test_different_ids_are_different_keys() -> None:
    keys = builder()
    assert keys.key(with_id(b"order-1")) != keys.key(with_id(b"order-2"))
    assert len({keys.key(with_id(b"order-1")), keys.key(with_id(b"order-2"))}) == 2


def test_position_keys_are_equal_only_at_the_same_position() -> None:
    keys = builder()
    key = keys.key(message(offset=41))
    assert key == keys.key(message(offset=41))
    assert hash(key) == hash(keys.key(message(offset=41)))
    assert key != keys.key(message(offset=42))
    assert key != keys.key(message(partition=3))
    assert key != keys.key(message(topic="payments"))
    assert len({key, keys.key(message(offset=41)), keys.key(message(offset=42))}) == 2


def test_an_id_key_never_equals_a_position_key() -> None:
    # Even when the id spells the record's own position.
    by_id = builder().key(with_id(b"orders/2/41"))
    by_position = builder().key(message())
    assert by_id.raw == by_position.raw
    assert by_id != by_position
    assert by_position != by_id
    assert len({by_id, by_position}) == 2


def test_a_dedup_key_equals_nothing_but_a_dedup_key() -> None:
    key = builder().key(with_id(b"abc"))
    assert key != b"abc"
    assert key != digest_of(b"abc")
    assert builder().key(message()) != ("orders", 2, 41)


def test_a_dedup_key_repr_shows_its_raw_key() -> None:
    assert repr(builder().key(with_id(b"abc"))) == "DedupKey(b'abc')"


# --- KeyLayout ------------------------------------------------------------------------------------


def layout(shard_bits: int = 4) -> KeyLayout:
    return KeyLayout("ns", GROUP, shard_bits)


def id_key(prefix: bytes, *, partition: int = 2, offset: int = 1, raw: bytes = b"id") -> DedupKey:
    """An id key with a chosen digest: ``prefix`` (4 bytes, they pick the shard), then 0x01..."""
    return DedupKey(raw, prefix + bytes(range(1, 13)), "orders", partition, offset)


def position_key(offset: int, *, partition: int = 2) -> DedupKey:
    return DedupKey(f"orders/{partition}/{offset}".encode(), None, "orders", partition, offset)


def keyed(prefix: bytes, tail: bytes, *, partition: int = 2, raw: bytes = b"id") -> DedupKey:
    """An id key whose digest is ``prefix`` (4 bytes: its shard) then ``tail`` (12 bytes: its field)."""
    assert len(prefix) == 4
    assert len(tail) == 12
    return DedupKey(raw, prefix + tail, "orders", partition, 1)


def test_legacy_key_of_up_to_32_bytes_is_kept_as_is() -> None:
    raw = b"k" * 32
    assert layout().legacy(builder().key(with_id(raw))) == LEGACY_PREFIX + raw
    assert layout().legacy(builder().key(with_id(b"abc-123"))) == LEGACY_PREFIX + b"abc-123"


def test_a_longer_legacy_key_is_a_16_byte_blake2b_digest() -> None:
    raw = b"k" * 33
    legacy = layout().legacy(builder().key(with_id(raw)))
    assert legacy == LEGACY_PREFIX + hashlib.blake2b(raw, digest_size=16).digest()
    assert len(legacy) == len(LEGACY_PREFIX) + 16


def test_long_legacy_keys_hash_deterministically_and_distinctly() -> None:
    keys, lay = builder(), layout()
    a = lay.legacy(keys.key(with_id(b"x" * 100)))
    again = lay.legacy(keys.key(with_id(b"x" * 100, offset=7)))
    b = lay.legacy(keys.key(with_id(b"x" * 99 + b"y")))
    assert a == again
    assert a != b


def test_legacy_key_of_a_position_keyed_record() -> None:
    assert layout().legacy(builder().key(message(topic="payments", partition=0, offset=7))) == (
        LEGACY_PREFIX + b"payments/0/7"
    )
    msg = message(topic="t" * 40, partition=1, offset=5)
    raw = f"{'t' * 40}/1/5".encode()
    assert (
        layout().legacy(builder().key(msg)) == LEGACY_PREFIX + hashlib.blake2b(raw, digest_size=16).digest()
    )


def test_legacy_keys_are_namespaced_by_group_as_a_cluster_hash_tag() -> None:
    key = builder().key(with_id(b"42"))
    one = KeyLayout("streamer", "group-a", 4).legacy(key)
    other = KeyLayout("streamer", "group-b", 4).legacy(key)
    assert one == b"streamer:{group-a}:42"
    assert other == b"streamer:{group-b}:42"
    assert one[one.index(b"{") + 1 : one.index(b"}")] == b"group-a"


def test_format_2_keys_of_a_group_share_its_hash_tag() -> None:
    lay = layout()
    names = [
        lay.meta,
        lay.lease(("orders", 2)),
        lay.shard(7, bytes(16)),
        lay.chunk("orders", 2, 41),
        lay.legacy(builder().key(with_id(b"abc"))),
    ]
    # Redis Cluster hashes only what is between the first { and the next }: the group.
    assert {name[name.index(b"{") + 1 : name.index(b"}")] for name in names} == {b"orders-group"}
    assert lay.meta == PREFIX + b"meta"
    assert lay.lease(("orders", 2)) == PREFIX + b"L:orders:2"


def test_a_shard_is_picked_by_the_low_bits_of_the_digests_first_4_bytes() -> None:
    lay = layout(4)
    assert lay.shard(7, b"\x00\x00\x00\x01" + bytes(12)) == PREFIX + b"h:7:1"
    assert lay.shard(7, b"\xff\xff\xff\xf1" + bytes(12)) == PREFIX + b"h:7:1"
    assert lay.shard(7, b"\x00\x00\x00\x1f" + bytes(12)) == PREFIX + b"h:7:15"
    assert lay.shard(8, b"\x00\x00\x00\x02" + b"\xff" * 12) == PREFIX + b"h:8:2"
    assert layout(0).shard(7, b"\xff" * 16) == PREFIX + b"h:7:0"
    assert layout(14).shard(1, b"\x12\x34\x56\x78" + bytes(12)) == PREFIX + b"h:1:%d" % (0x12345678 & 0x3FFF)


def test_a_chunk_holds_65536_offsets() -> None:
    lay = layout()
    assert lay.chunk("orders", 2, 0) == PREFIX + b"o:orders:2:0"
    assert lay.chunk("orders", 2, 65_535) == PREFIX + b"o:orders:2:0"
    assert lay.chunk("orders", 2, 65_536) == PREFIX + b"o:orders:2:1"
    assert lay.chunk("orders", 3, 3 * 65_536 + 9) == PREFIX + b"o:orders:3:3"
    assert 1 << CHUNK_BITS == 65_536


def test_shard_names_build_a_buckets_shard_names_on_first_use() -> None:
    names = _ShardNames(b"p:h:7:")
    assert names == {}
    assert names[3] == b"p:h:7:3"
    assert names[12] == b"p:h:7:12"
    assert names == {3: b"p:h:7:3", 12: b"p:h:7:12"}  # kept: built once
    assert names[3] is names[3]
    assert names.prefix == b"p:h:7:"


def test_layout_names_are_the_names_shard_gives() -> None:
    lay = layout(4)
    assert lay.shard_mask == 0b1111
    names = lay.names(7)
    assert isinstance(names, _ShardNames)
    digests = [
        bytes(16),
        b"\0\0\0\1" + bytes(12),
        b"\xff\xff\xff\xf1" + bytes(12),
        b"\x12\x34\x56\x78" + bytes(12),
    ]
    for digest in digests:
        shard = int.from_bytes(digest[:4], "big") & lay.shard_mask
        assert names[shard] == lay.shard(7, digest) == PREFIX + b"h:7:%d" % shard
    assert names == {0: PREFIX + b"h:7:0", 1: PREFIX + b"h:7:1", 8: PREFIX + b"h:7:8"}
    assert lay.names(7) is names
    assert lay.names(8) is not names
    assert lay.names(8)[1] == PREFIX + b"h:8:1"
    # Each layout has its own: another group's names carry its own prefix.
    assert KeyLayout("ns", "other", 4).names(7)[1] == b"ns:2:{other}:h:7:1"
    assert layout(0).names(7) == {}
    assert layout(0).shard(7, b"\xff" * 16) == PREFIX + b"h:7:0"


def test_layout_names_are_kept_for_a_few_buckets_only() -> None:
    lay = layout(4)
    first = lay.names(0)
    assert first[1] == PREFIX + b"h:0:1"
    for bucket in range(1, 100):
        assert lay.names(bucket)[1] == PREFIX + b"h:%d:1" % bucket
        assert len(lay._names) <= 5
        assert lay.names(bucket) is lay.names(bucket)  # the bucket in use stays
    again = lay.names(0)  # dropped long ago: built anew, with the same names
    assert again is not first
    assert again == {}
    assert again[1] == first[1]
    assert lay.shard(0, b"\0\0\0\1" + bytes(12)) == first[1]
    # The buckets a claim and a mark use at once (the current, the previous, the next) stay cached.
    in_use = {bucket: lay.names(bucket) for bucket in (200, 199, 201)}
    for _ in range(3):
        assert all(lay.names(bucket) is names for bucket, names in in_use.items())
    assert set(in_use) <= set(lay._names)


# --- shard_bits_for, buckets, has_bit --------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected_keys", "bits"),
    [
        (0, 0),
        (1, 0),
        (63, 0),
        (64, 0),
        (65, 1),
        (128, 1),
        (129, 2),
        (1024, 4),
        (1_000_000, 14),
        (64 << 14, 14),
    ],
)
def test_shard_bits_for_aims_at_64_marks_per_shard(expected_keys: int, bits: int) -> None:
    assert shard_bits_for(expected_keys) == bits
    assert expected_keys <= 64 << bits


DAY = 86_400_000


def test_buckets_are_the_current_and_the_previous_one() -> None:
    assert buckets(100 * DAY, DAY) == [100, 99]
    assert buckets(100 * DAY + 12_345, DAY) == [100, 99]
    assert buckets(101 * DAY - _SKEW_MS, DAY) == [100, 99]  # not closer than the skew yet


def test_buckets_include_the_next_one_within_the_skew_of_its_start() -> None:
    assert buckets(101 * DAY - _SKEW_MS + 1, DAY) == [100, 99, 101]
    assert buckets(101 * DAY - 1, DAY) == [100, 99, 101]
    assert buckets(101 * DAY, DAY) == [101, 100]


def test_a_window_shorter_than_the_skew_always_looks_at_the_next_bucket() -> None:
    window = _SKEW_MS // 2
    assert buckets(10 * window, window) == [10, 9, 11]


def test_has_bit_reads_redis_bit_order() -> None:
    assert has_bit(b"\x80", 0)
    assert not any(has_bit(b"\x80", bit) for bit in range(1, 8))
    assert has_bit(b"\x01", 7)
    assert has_bit(b"\x00\x40", 9)
    assert not has_bit(b"\x00\x40", 8)
    assert not has_bit(b"\x00\x40", 1)


def test_has_bit_finds_exactly_the_bit_set() -> None:
    for bit in range(24):
        data = (1 << (23 - bit)).to_bytes(3, "big")  # SETBIT key <bit> 1 on an empty key
        assert [b for b in range(24) if has_bit(data, b)] == [bit]


def test_has_bit_beyond_the_data_is_unset() -> None:
    assert not has_bit(b"", 0)
    assert not has_bit(b"\xff", 8)
    assert not has_bit(b"\xff\xff", 100)
    assert has_bit(b"\xff\xff", 15)


# --- MemoryDedupStore: id claims and partition leases ------------------------------------------------


def test_memory_store_claims_an_id_per_token_whatever_its_partition() -> None:
    store = MemoryDedupStore()
    one = id_key(b"\0\0\0\1")
    one_elsewhere = id_key(b"\0\0\0\1", partition=3, offset=900)  # the same id in another partition
    two = id_key(b"\0\0\0\2")  # another id of the same partition
    assert one == one_elsewhere
    assert store.claim([one], "a", 1000) == [ClaimStatus.CLAIMED]
    assert store.claims == {one.ident: "a"}
    assert store.leases == {}  # an id-keyed record takes no partition lease
    assert store.claim([one_elsewhere, two], "b", 1000) == [ClaimStatus.CONTESTED, ClaimStatus.CLAIMED]
    assert store.claims == {one.ident: "a", two.ident: "b"}
    assert store.leases == {}
    # The holder claims its id again, from any partition; the other's id stays the other's.
    assert store.claim([one_elsewhere, one, two], "a", 1000) == [
        ClaimStatus.CLAIMED,
        ClaimStatus.CLAIMED,
        ClaimStatus.CONTESTED,
    ]
    assert store.claims == {one.ident: "a", two.ident: "b"}


def test_memory_store_leases_a_partition_for_position_keyed_records() -> None:
    store = MemoryDedupStore()
    assert store.claim([position_key(1)], "a", 1000) == [ClaimStatus.CLAIMED]
    # Another record of the same partition is contested for another token; another partition is not.
    assert store.claim([position_key(2), position_key(1, partition=3)], "b", 1000) == [
        ClaimStatus.CONTESTED,
        ClaimStatus.CLAIMED,
    ]
    assert store.leases == {("orders", 2): "a", ("orders", 3): "b"}
    assert store.claims == {}
    # The holder claims every record of its partition.
    assert store.claim([position_key(2), position_key(1)], "a", 1000) == [ClaimStatus.CLAIMED] * 2


def test_memory_store_an_id_keyed_record_ignores_its_partitions_lease() -> None:
    store = MemoryDedupStore()
    store.claim([position_key(1)], "a", 1000)
    assert store.claim([id_key(b"\0\0\0\1")], "b", 1000) == [ClaimStatus.CLAIMED]
    assert store.leases == {("orders", 2): "a"}
    assert store.claims == {id_key(b"\0\0\0\1").ident: "b"}


def test_memory_store_release_drops_only_our_id_claims() -> None:
    store = MemoryDedupStore()
    mine, theirs, by_position = id_key(b"\0\0\0\1"), id_key(b"\0\0\0\2"), position_key(5)
    store.claim([mine, by_position], "a", 1000)
    store.claim([theirs], "b", 1000)
    store.release([mine, theirs, by_position, id_key(b"\0\0\0\3")], "a")  # never claimed: ignored
    assert store.claims == {theirs.ident: "b"}
    assert store.leases == {("orders", 2): "a"}  # a release keeps the partition's lease
    assert store.claim([mine], "b", 1000) == [ClaimStatus.CLAIMED]
    assert store.claim([theirs, position_key(6)], "c", 1000) == [ClaimStatus.CONTESTED] * 2


def test_memory_store_hand_over_drops_only_our_partition_leases() -> None:
    store = MemoryDedupStore()
    by_id = id_key(b"\0\0\0\1")
    store.claim([position_key(1), by_id], "a", 1000)
    store.claim([position_key(1, partition=3)], "b", 1000)
    store.hand_over([("orders", 2), ("orders", 3), ("orders", 9)], "a")  # 9 was never leased
    assert store.leases == {("orders", 3): "b"}
    assert store.claims == {by_id.ident: "a"}  # a hand-over keeps the id claims
    assert store.claim([position_key(2)], "b", 1000) == [ClaimStatus.CLAIMED]
    assert store.claim([id_key(b"\0\0\0\1", partition=3)], "b", 1000) == [ClaimStatus.CONTESTED]
    assert store.leases == {("orders", 2): "b", ("orders", 3): "b"}


def test_memory_store_with_partition_local_ids_leases_the_partition_of_id_keyed_records() -> None:
    store = MemoryDedupStore(partition_local_ids=True)
    one, two = id_key(b"\0\0\0\1"), id_key(b"\0\0\0\2")
    assert store.claim([one], "a", 1000) == [ClaimStatus.CLAIMED]
    assert store.leases == {("orders", 2): "a"}
    assert store.claims == {}  # no id claim of its own
    # Another id of the same partition is contested: the partition is a's.
    assert store.claim([two], "b", 1000) == [ClaimStatus.CONTESTED]
    # The same id in another partition is not: ids are taken to be partition-local.
    assert store.claim([id_key(b"\0\0\0\1", partition=3)], "b", 1000) == [ClaimStatus.CLAIMED]
    assert store.leases == {("orders", 2): "a", ("orders", 3): "b"}
    assert store.claims == {}
    store.release([one], "a")  # no id claim to drop: the lease stays
    assert store.claim([two], "b", 1000) == [ClaimStatus.CONTESTED]
    store.hand_over([("orders", 2)], "a")
    assert store.claim([two], "b", 1000) == [ClaimStatus.CLAIMED]
    assert store.leases == {("orders", 2): "b", ("orders", 3): "b"}


def test_memory_store_marking_an_id_clears_its_claim() -> None:
    store = MemoryDedupStore()
    one, two = id_key(b"\0\0\0\1"), id_key(b"\0\0\0\2")
    store.claim([one, two], "a", 1000)
    store.send_marks([one])
    store.wait_marks()
    assert store.claims == {two.ident: "a"}
    assert store.done == {one.ident}
    # Done for every token and every partition; a done id takes no claim.
    assert store.claim([one, id_key(b"\0\0\0\1", partition=3), two], "b", 1000) == [
        ClaimStatus.DONE,
        ClaimStatus.DONE,
        ClaimStatus.CONTESTED,
    ]
    assert store.claims == {two.ident: "a"}


def test_memory_store_done_wins_over_contested() -> None:
    store = MemoryDedupStore()
    one, two = id_key(b"\0\0\0\1"), id_key(b"\0\0\0\2")
    store.claim([one, two, position_key(1), position_key(2)], "a", 1000)
    store.send_marks([one, position_key(1)])
    store.wait_marks()
    assert store.claim([one, two, position_key(1), position_key(2)], "b", 1000) == [
        ClaimStatus.DONE,
        ClaimStatus.CONTESTED,
        ClaimStatus.DONE,  # its partition's lease is a's, but it is done
        ClaimStatus.CONTESTED,
    ]
    assert store.claim([one, two], "a", 1000) == [ClaimStatus.DONE, ClaimStatus.CLAIMED]


def test_memory_store_marks_by_identity() -> None:
    store = MemoryDedupStore()
    keys = builder()
    store.send_marks([keys.key(with_id(b"order-1")), keys.key(message(offset=10))])
    assert store.claim(
        [
            keys.key(with_id(b"order-1", partition=4, offset=99)),  # the same id elsewhere
            keys.key(message(offset=10)),  # the same position
            keys.key(message(offset=11)),  # the next position
            keys.key(message(partition=4, offset=10)),  # the same offset of another partition
        ],
        "a",
        1000,
    ) == [ClaimStatus.DONE, ClaimStatus.DONE, ClaimStatus.CLAIMED, ClaimStatus.CLAIMED]


def test_memory_store_claim_takes_the_lease_even_when_every_key_is_done() -> None:
    store = MemoryDedupStore()
    by_position, by_id = position_key(1), id_key(b"\0\0\0\1", partition=3)
    store.send_marks([by_position, by_id])
    assert store.claim([by_position, by_id], "a", 1000) == [ClaimStatus.DONE, ClaimStatus.DONE]
    # Like the claim script, which takes the leases before it looks at a mark.
    assert store.leases == {("orders", 2): "a"}
    assert store.claims == {}  # a done id takes no claim


def test_memory_store_renew_changes_nothing() -> None:
    store = MemoryDedupStore()
    by_id = id_key(b"\0\0\0\1")
    store.claim([by_id, position_key(1)], "a", 1000)
    store.renew([by_id, position_key(1), id_key(b"\0\0\0\2")], "b", 1000)
    assert store.claims == {by_id.ident: "a"}
    assert store.leases == {("orders", 2): "a"}


# --- RedisDedupStore without a server -----------------------------------------------------------------

HOUR = 3_600_000
NOW_MS = 100 * DAY + 5_000_000  # bucket 100; a whole number of seconds


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def time(self) -> float:
        return self.ms / 1000


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(NOW_MS)
    monkeypatch.setattr(dedup_module, "time", SimpleNamespace(time=clock.time))
    return clock


def redis_store(
    shard_bits: int = 4, *, window_ms: int = DAY, partition_local_ids: bool = False
) -> RedisDedupStore:
    # Nothing connects until a command is sent.
    return RedisDedupStore(
        redis.Redis(host="127.0.0.1", port=1),
        layout(shard_bits),
        window_ms=window_ms,
        partition_local_ids=partition_local_ids,
    )


def unreachable_store() -> RedisDedupStore:
    """A store whose Redis refuses connections at once (no retries, no backoff)."""
    client = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    return RedisDedupStore(client, layout(4), window_ms=DAY)


def field(key: DedupKey) -> bytes:
    assert key.digest is not None
    return key.digest[4 : 4 + FIELD_BYTES]


def test_mark_commands_hset_a_field_of_the_digest_into_the_current_buckets_shard(clock: Clock) -> None:
    store = redis_store()
    key = id_key(b"\0\0\0\1")
    assert field(key) == bytes(range(1, 11))
    assert store.mark_commands([key]) == [
        (b"HSET", PREFIX + b"h:100:1", bytes(range(1, 11)), b""),
        # The bucket lives one window after it ends.
        (b"PEXPIREAT", PREFIX + b"h:100:1", b"%d" % (102 * DAY)),
    ]
    assert store.marks_sent == 0  # nothing was sent


def test_mark_commands_set_a_shards_expiry_only_the_first_time_it_is_seen(clock: Clock) -> None:
    store = redis_store()
    one, same_shard, other_shard = id_key(b"\0\0\0\1"), id_key(b"\xff\xff\xff\xf1"), id_key(b"\0\0\0\2")
    assert store.mark_commands([one, same_shard, other_shard]) == [
        (b"HSET", PREFIX + b"h:100:1", field(one), b""),
        (b"HSET", PREFIX + b"h:100:1", field(same_shard), b""),
        (b"HSET", PREFIX + b"h:100:2", field(other_shard), b""),
        # One expiry per shard, after the marks that create it.
        (b"PEXPIREAT", PREFIX + b"h:100:1", b"%d" % (102 * DAY)),
        (b"PEXPIREAT", PREFIX + b"h:100:2", b"%d" % (102 * DAY)),
    ]
    clock.ms += HOUR
    assert store.mark_commands([one, other_shard]) == [
        (b"HSET", PREFIX + b"h:100:1", field(one), b""),
        (b"HSET", PREFIX + b"h:100:2", field(other_shard), b""),
    ]


def test_mark_commands_move_to_the_next_bucket_with_its_own_expiry(clock: Clock) -> None:
    store = redis_store()
    key = id_key(b"\0\0\0\1")
    store.mark_commands([key])
    clock.ms = 101 * DAY
    assert store.mark_commands([key]) == [
        (b"HSET", PREFIX + b"h:101:1", field(key), b""),
        (b"PEXPIREAT", PREFIX + b"h:101:1", b"%d" % (103 * DAY)),
    ]


def test_mark_commands_use_the_stores_window(clock: Clock) -> None:
    window = HOUR
    store = redis_store(window_ms=window)
    bucket = NOW_MS // window
    assert store.mark_commands([id_key(b"\0\0\0\1")])[1] == (
        b"PEXPIREAT",
        PREFIX + b"h:%d:1" % bucket,
        b"%d" % ((bucket + 2) * window),
    )


def test_mark_commands_set_one_bit_per_offset_and_one_expiry_per_bitmap(clock: Clock) -> None:
    store = redis_store()
    # A bitmap lives one window after its last mark, rounded up to the hour.
    at = b"%d" % (101 * DAY + 2 * HOUR)
    keys = [position_key(5), position_key(7), position_key(65_536 + 3), position_key(5, partition=3)]
    assert store.mark_commands(keys) == [
        (b"SETBIT", PREFIX + b"o:orders:2:0", b"5", b"1"),
        (b"SETBIT", PREFIX + b"o:orders:2:0", b"7", b"1"),
        (b"SETBIT", PREFIX + b"o:orders:2:1", b"3", b"1"),
        (b"SETBIT", PREFIX + b"o:orders:3:0", b"5", b"1"),
        (b"PEXPIREAT", PREFIX + b"o:orders:2:0", at),
        (b"PEXPIREAT", PREFIX + b"o:orders:2:1", at),
        (b"PEXPIREAT", PREFIX + b"o:orders:3:0", at),
    ]


def test_mark_commands_renew_a_bitmaps_expiry_once_an_hour_at_most(clock: Clock) -> None:
    store = redis_store()
    store.mark_commands([position_key(5)])
    clock.ms += 60_000  # the same hour rounded up: no new expiry
    assert store.mark_commands([position_key(6), position_key(8)]) == [
        (b"SETBIT", PREFIX + b"o:orders:2:0", b"6", b"1"),
        (b"SETBIT", PREFIX + b"o:orders:2:0", b"8", b"1"),
    ]
    clock.ms += HOUR
    assert store.mark_commands([position_key(7), position_key(9)]) == [
        (b"SETBIT", PREFIX + b"o:orders:2:0", b"7", b"1"),
        (b"SETBIT", PREFIX + b"o:orders:2:0", b"9", b"1"),
        (b"PEXPIREAT", PREFIX + b"o:orders:2:0", b"%d" % (101 * DAY + 3 * HOUR)),
    ]


def test_mark_commands_of_a_mixed_batch_write_id_marks_then_bitmaps(clock: Clock) -> None:
    store = redis_store(0)
    keys = builder()
    by_id, by_position = keys.key(with_id(b"order-1")), keys.key(message(offset=65_536 * 2 + 10))
    commands = store.mark_commands([by_position, by_id])
    assert commands == [
        (b"HSET", PREFIX + b"h:100:0", field(by_id), b""),
        (b"SETBIT", PREFIX + b"o:orders:2:2", b"10", b"1"),
        # The expiries in the order their keys were first met.
        (b"PEXPIREAT", PREFIX + b"o:orders:2:2", b"%d" % (101 * DAY + 2 * HOUR)),
        (b"PEXPIREAT", PREFIX + b"h:100:0", b"%d" % (102 * DAY)),
    ]
    assert store.mark_commands([]) == []


def resp_commands(data: bytes) -> list[list[bytes]]:
    """The commands in ``data``: RESP arrays of bulk strings (what a client sends), parsed back."""
    commands: list[list[bytes]] = []
    pos = 0

    def line() -> bytes:
        nonlocal pos
        end = data.index(b"\r\n", pos)
        text, pos = data[pos:end], end + 2
        return text

    while pos < len(data):
        head = line()
        assert head[:1] == b"*", head
        args: list[bytes] = []
        for _ in range(int(head[1:])):
            size = line()
            assert size[:1] == b"$", size
            n = int(size[1:])
            args.append(data[pos : pos + n])
            assert data[pos + n : pos + n + 2] == b"\r\n"
            pos += n + 2
        commands.append(args)
    return commands


def test_resp_commands_parses_what_redis_py_sends() -> None:
    assert resp_commands(b"") == []
    assert resp_commands(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$0\r\n\r\n") == [[b"GET", b"k"], [b""]]
    command = [b"HSET", b"h\r\n", b"*1\r\n$2\r\n\x00\xff", b""]
    connection = redis.connection.Connection()  # type: ignore[no-untyped-call]  # nothing connects
    packed = b"".join(connection.pack_command(*command))  # type: ignore[no-untyped-call]
    assert resp_commands(packed) == [command]
    assert resp.packed(command) == packed  # the store packs as redis-py does


# Ids whose fields hold RESP's own markers: the packing is by length, not by delimiter.
M1 = keyed(b"\0\0\0\1", b"\r\n$3\r\n*1\r\nab")
M2 = keyed(b"\0\0\0\2", b"field-two-..")
M3 = keyed(b"\xff\xff\xff\xf1", b"field-three.")  # M1's shard
H1, H2 = PREFIX + b"h:100:1", PREFIX + b"h:100:2"
O20, O21, O30 = PREFIX + b"o:orders:2:0", PREFIX + b"o:orders:2:1", PREFIX + b"o:orders:3:0"
BUCKET_AT, BITMAP_AT = b"%d" % (102 * DAY), b"%d" % (101 * DAY + 2 * HOUR)


def test_mark_call_packs_the_id_marks_in_one_evalsha_and_one_bitfield_per_bitmap(clock: Clock) -> None:
    store = redis_store()
    keys = [
        M1,
        position_key(5),
        M2,
        position_key(7),
        position_key(65_536 + 3),
        M3,
        position_key(5, partition=3),
    ]
    data, replies = store._mark_call(keys)
    commands = resp_commands(data)
    assert commands == [
        # Every id mark in one script call: its shards as KEYS, their fields as ARGV, in order.
        [b"EVALSHA", _MARK_SHA, b"3", H1, H2, H1, field(M1), field(M2), field(M3)],
        # One BITFIELD per bitmap, one SET per offset.
        [b"BITFIELD", O20, b"SET", b"u1", b"5", b"1", b"SET", b"u1", b"7", b"1"],
        [b"BITFIELD", O21, b"SET", b"u1", b"3", b"1"],
        [b"BITFIELD", O30, b"SET", b"u1", b"5", b"1"],
        # Then the expiries, once per key, after the marks that create the keys.
        [b"PEXPIREAT", H1, BUCKET_AT],
        [b"PEXPIREAT", O20, BITMAP_AT],
        [b"PEXPIREAT", H2, BUCKET_AT],
        [b"PEXPIREAT", O21, BITMAP_AT],
        [b"PEXPIREAT", O30, BITMAP_AT],
    ]
    assert field(M1) == b"\r\n$3\r\n*1\r\n"
    assert replies == len(commands) == 9  # one reply per command
    assert hashlib.sha1(_MARK.encode(), usedforsecurity=False).hexdigest().encode() == _MARK_SHA
    assert store.marks_sent == 0  # nothing was sent

    clock.ms += 60_000  # the same hour: no expiry is due again
    data, replies = store._mark_call([M3, position_key(6), position_key(8)])
    assert resp_commands(data) == [
        [b"EVALSHA", _MARK_SHA, b"1", H1, field(M3)],
        [b"BITFIELD", O20, b"SET", b"u1", b"6", b"1", b"SET", b"u1", b"8", b"1"],
    ]
    assert replies == 2


def test_mark_call_of_only_ids_or_only_positions_sends_only_their_commands(clock: Clock) -> None:
    store = redis_store()
    data, replies = store._mark_call([position_key(9)])
    assert resp_commands(data) == [
        [b"BITFIELD", O20, b"SET", b"u1", b"9", b"1"],
        [b"PEXPIREAT", O20, BITMAP_AT],
    ]
    assert replies == 2
    data, replies = store._mark_call([M2])
    assert resp_commands(data) == [
        [b"EVALSHA", _MARK_SHA, b"1", H2, field(M2)],
        [b"PEXPIREAT", H2, BUCKET_AT],
    ]
    assert replies == 2
    clock.ms = 101 * DAY  # the next bucket: its shard gets its own expiry
    data, replies = store._mark_call([M2])
    h101 = PREFIX + b"h:101:2"
    assert resp_commands(data) == [
        [b"EVALSHA", _MARK_SHA, b"1", h101, field(M2)],
        [b"PEXPIREAT", h101, b"%d" % (103 * DAY)],
    ]
    assert replies == 2
    assert store._mark_call([]) == (b"", 0)


def test_mark_call_writes_the_same_marks_and_expiries_as_mark_commands(clock: Clock) -> None:
    keys = [position_key(3), M1, M2, position_key(65_536), M3, position_key(3), position_key(4, partition=3)]
    plain = redis_store().mark_commands(keys)
    packed = resp_commands(redis_store()._mark_call(keys)[0])
    hsets = [(name, f) for op, name, f, *_ in plain if op == b"HSET"]
    (evalsha,) = [c for c in packed if c[0] == b"EVALSHA"]
    n = int(evalsha[2])
    assert list(zip(evalsha[3 : 3 + n], evalsha[3 + n :], strict=True)) == hsets
    setbits = [(name, bit) for op, name, bit, *_ in plain if op == b"SETBIT"]
    bitfields = [(c[1], c[i + 2]) for c in packed if c[0] == b"BITFIELD" for i in range(2, len(c) - 2, 4)]
    assert sorted(bitfields) == sorted(setbits)
    assert len(setbits) == 4  # one per key, the repeated offset too
    assert [tuple(c) for c in packed if c[0] == b"PEXPIREAT"] == [c for c in plain if c[0] == b"PEXPIREAT"]


class FakeConnection:
    """A Redis connection that answers what it is sent: a script's SHA to SCRIPT LOAD, NOSCRIPT to
    an EVALSHA of a script it has not loaded, 1 to the rest; ``down`` refuses every send."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.replies: list[object] = []
        self.scripts: set[bytes] = set()
        self.down = False
        self.disconnected = False

    def send_packed_command(self, command: list[bytes], check_health: bool = True) -> None:
        assert check_health is False
        if self.down:
            raise redis.ConnectionError("Error 32 while writing to socket. Broken pipe.")
        for args in resp_commands(b"".join(command)):
            self.sent.append(args)
            if args[:2] == [b"SCRIPT", b"LOAD"]:
                sha = hashlib.sha1(args[2], usedforsecurity=False).hexdigest().encode()
                self.scripts.add(sha)
                self.replies.append(sha)
            elif args[0] == b"EVALSHA" and args[1] not in self.scripts:
                self.replies.append(redis.exceptions.NoScriptError("No matching script."))
            else:
                self.replies.append(1)

    def read_response(self, disable_decoding: bool = False) -> object:
        assert disable_decoding
        assert self.replies, "a read with no reply owed would block"
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def disconnect(self) -> None:
        self.disconnected = True


class FakePool:
    def __init__(self) -> None:
        self.made: list[FakeConnection] = []
        self.released: list[FakeConnection] = []

    def get_connection(self) -> FakeConnection:
        self.made.append(FakeConnection())
        return self.made[-1]

    def release(self, conn: FakeConnection) -> None:
        self.released.append(conn)


LOAD = [b"SCRIPT", b"LOAD", _MARK.encode()]


def fake_pooled_store(monkeypatch: pytest.MonkeyPatch) -> tuple[RedisDedupStore, FakePool]:
    store, pool = redis_store(), FakePool()
    monkeypatch.setattr(store.client, "connection_pool", pool)
    return store, pool


def test_send_marks_load_the_mark_script_first_and_wait_marks_reads_every_reply(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, pool = fake_pooled_store(monkeypatch)
    store.send_marks([M1, position_key(5)])
    (conn,) = pool.made
    assert store._pending == [[M1, position_key(5)]]
    assert conn.sent[0] == LOAD
    assert [c[0] for c in conn.sent] == [b"SCRIPT", b"EVALSHA", b"BITFIELD", b"PEXPIREAT", b"PEXPIREAT"]
    store.send_marks([M3])  # M1's shard: no expiry again
    assert pool.made == [conn]  # the same connection, no second SCRIPT LOAD
    assert conn.sent[5:] == [[b"EVALSHA", _MARK_SHA, b"1", H1, field(M3)]]
    assert store._pending == [[M1, position_key(5)], [M3]]
    assert store.marks_sent == 3
    assert conn.replies  # not read yet
    store.wait_marks()
    assert conn.replies == []  # every reply read (the script load's too), and no more
    assert store._pending == []
    assert conn.scripts == {_MARK_SHA}
    assert not conn.disconnected
    assert pool.released == []


def test_marks_refused_by_a_script_flush_go_out_again_on_a_new_connection_that_loads_it(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, pool = fake_pooled_store(monkeypatch)
    store.send_marks([M1])
    store.wait_marks()
    (conn,) = pool.made
    conn.scripts.clear()  # SCRIPT FLUSH
    store.send_marks([M2, position_key(5)])
    pending = list(store._pending)
    with pytest.raises(DedupUnavailableError, match="NoScriptError"):
        store.wait_marks()
    assert conn.replies == []  # the replies after the error were read too
    assert conn.disconnected
    assert pool.released == [conn]
    assert store._pending == pending  # kept for a re-send
    store.wait_marks()
    new = pool.made[1]
    # Built again after the drop: the expiries go out again with the marks (a restart may have
    # emptied Redis).
    assert [c[0] for c in new.sent] == [b"SCRIPT", b"EVALSHA", b"BITFIELD", b"PEXPIREAT", b"PEXPIREAT"]
    assert new.replies == []
    assert store._pending == []
    # Redis may have restarted empty: a shard marked again gets its expiry again.
    store.send_marks([M1])
    assert new.sent[-2:] == [[b"EVALSHA", _MARK_SHA, b"1", H1, field(M1)], [b"PEXPIREAT", H1, BUCKET_AT]]
    store.wait_marks()
    assert new.replies == []


def test_marks_not_sent_are_all_sent_again_after_the_script_on_a_new_connection(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, pool = fake_pooled_store(monkeypatch)
    store.send_marks([M1])
    (conn,) = pool.made
    conn.down = True
    store.send_marks([M2])  # never raises
    assert conn.disconnected
    assert pool.released == [conn]
    store.send_marks([position_key(5)])  # not sent: waits for the re-send
    assert len(pool.made) == 1
    assert store._pending == [[M1], [M2], [position_key(5)]]
    store.wait_marks()
    new = pool.made[1]
    # All three built again, each with its expiry (the drop forgot which were set).
    assert [c[0] for c in new.sent] == [
        b"SCRIPT",
        b"EVALSHA",
        b"PEXPIREAT",
        b"EVALSHA",
        b"PEXPIREAT",
        b"BITFIELD",
        b"PEXPIREAT",
    ]
    assert new.replies == []
    assert store._pending == []
    assert store.marks_sent == 3


def test_redis_store_with_nothing_to_do_sends_nothing() -> None:
    store = unreachable_store()  # any command would fail
    assert store.claim([], "t", 1000) == []
    store.renew([], "t", 1000)
    store.renew([id_key(b"\0\0\0\1")], "t", 1000)  # an id never claimed has no claim to renew
    store.release([], "t")
    store.release([position_key(1), id_key(b"\0\0\0\1")], "t")  # no id claim among them
    store.hand_over([], "t")
    store.send_marks([])
    store.wait_marks()
    assert store.marks_sent == 0


def test_redis_store_marks_not_sent_stay_pending_and_waiting_fails_closed(clock: Clock) -> None:
    store = unreachable_store()
    store.send_marks([id_key(b"\0\0\0\1"), position_key(3)])  # never raises
    assert store.marks_sent == 2
    with pytest.raises(DedupUnavailableError, match="ConnectionError"):
        store.wait_marks()
    with pytest.raises(DedupUnavailableError):
        store.wait_marks()  # still pending: a wait does not drop them


def test_redis_store_calls_fail_closed_when_redis_is_unreachable() -> None:
    store = unreachable_store()
    with pytest.raises(DedupUnavailableError):
        store.ping()
    with pytest.raises(DedupUnavailableError):
        store.claim([id_key(b"\0\0\0\1")], "t", 1000)
    claimed = id_key(b"\0\0\0\1")
    claimed.claimed = PREFIX + b"h:100:1"
    with pytest.raises(DedupUnavailableError):
        store.renew([position_key(1)], "t", 1000)
    with pytest.raises(DedupUnavailableError):
        store.renew([claimed], "t", 1000)
    with pytest.raises(DedupUnavailableError):
        store.release([claimed], "t")
    with pytest.raises(DedupUnavailableError):
        store.hand_over([("orders", 2)], "t")


class ScriptSpy:
    """Stands in for a registered Lua script: records its KEYS and ARGV, returns a given reply."""

    def __init__(self, reply: object = 1) -> None:
        self.reply = reply
        self.calls: list[tuple[list[bytes], list[object]]] = []

    def __call__(self, keys: list[bytes], args: list[object]) -> object:
        self.calls.append((list(keys), list(args)))
        return self.reply


class Spied(SimpleNamespace):
    store: RedisDedupStore
    claim: ScriptSpy
    renew: ScriptSpy
    release: ScriptSpy


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Callable[..., Spied]:
    """A Redis store (shard_bits 0: one shard per bucket) whose scripts are spies, at NOW_MS."""

    def make(*, partition_local_ids: bool = False, reply: object = 1) -> Spied:
        store = redis_store(0, partition_local_ids=partition_local_ids)
        monkeypatch.setattr(store, "_started", True)  # no start-up checks before the first claim
        spies = Spied(store=store, claim=ScriptSpy(reply), renew=ScriptSpy(), release=ScriptSpy())
        monkeypatch.setattr(store, "_claim", spies.claim)
        monkeypatch.setattr(store, "_renew", spies.renew)
        monkeypatch.setattr(store, "_release", spies.release)
        return spies

    return make


H100, H99 = PREFIX + b"h:100:0", PREFIX + b"h:99:0"
L2, L3, L4 = (PREFIX + b"L:orders:%d" % n for n in (2, 3, 4))


def test_claim_script_takes_an_id_claim_and_leases_only_position_keyed_partitions(
    spied: Callable[..., Spied],
) -> None:
    s = spied(reply=[1, 1, 0, b"\x04", b"\x00"])
    by_id, pos, pos_other = id_key(b"\0\0\0\1"), position_key(5), position_key(9, partition=3)
    assert s.store.claim([by_id, pos, pos_other], "t", 1500) == [
        ClaimStatus.CLAIMED,
        ClaimStatus.DONE,  # bit 5 of the bitmap's first byte
        ClaimStatus.CLAIMED,  # bit 9: bit 1 of the range's only byte (byte 1)
    ]
    # No lease for the id-keyed record's partition 2 other than the position-keyed record's.
    keys = [L2, L3, H100, H99, PREFIX + b"o:orders:2:0", PREFIX + b"o:orders:3:0"]
    args = [
        *("t", 1500, 2, 1, 2, 2, 0),  # token, lease, leases, ids, buckets, bitmap ranges, legacy keys
        b"1",  # take the id claims
        field(by_id),  # its field; its shards are KEYS[3..4]: current bucket, previous
        *(0, 0, 1, 1),  # the byte range each bitmap's offsets span
    ]
    assert s.claim.calls == [(keys, args)]
    # The id claim lives in the current bucket's shard; a position key has none.
    assert by_id.claimed == H100
    assert pos.claimed is None
    assert pos_other.claimed is None


def test_claim_script_reply_an_id_claimed_by_another_token_is_contested(
    spied: Callable[..., Spied],
) -> None:
    # The position-keyed partition's lease is another's; the id is claimed by another token.
    s = spied(reply=[0, 2, b""])
    by_id, pos = id_key(b"\0\0\0\1", partition=3), position_key(5)
    assert s.store.claim([by_id, pos], "t", 1000) == [ClaimStatus.CONTESTED, ClaimStatus.CONTESTED]
    assert s.claim.calls[0][0] == [L2, H100, H99, PREFIX + b"o:orders:2:0"]
    assert by_id.claimed == H100


def test_claim_script_reply_done_wins_over_a_lost_lease(spied: Callable[..., Spied]) -> None:
    s = spied(reply=[0, 1, b"\x04"])
    assert s.store.claim([id_key(b"\0\0\0\1"), position_key(5)], "t", 1000) == [
        ClaimStatus.DONE,
        ClaimStatus.DONE,
    ]


def test_claim_script_with_partition_local_ids_leases_id_keyed_partitions_and_takes_no_claim(
    spied: Callable[..., Spied],
) -> None:
    s = spied(partition_local_ids=True, reply=[1, 0, 0, 0])
    one, two = id_key(b"\0\0\0\1"), id_key(b"\0\0\0\2", partition=4)
    assert s.store.claim([one, two], "t", 1000) == [ClaimStatus.CLAIMED, ClaimStatus.CONTESTED]
    # Both ids share the one shard of each bucket: each record lists its own, duplicates and all.
    keys = [L2, L4, H100, H99, H100, H99]
    args = [*("t", 1000, 2, 2, 2, 0, 0), b"0", field(one), field(two)]
    assert s.claim.calls == [(keys, args)]
    assert one.claimed is None
    assert two.claimed is None


def test_claim_script_near_a_buckets_end_gets_three_shards_per_id_the_current_first(
    spied: Callable[..., Spied], clock: Clock
) -> None:
    clock.ms = 101 * DAY - 1000  # a worker whose clock runs ahead may already write bucket 101
    s = spied(reply=[1, 0, 1, b""])
    one, two = keyed(b"\0\0\0\1", b"field-one..."), keyed(b"\0\0\0\2", b"field-two...", partition=3)
    pos = position_key(5)
    assert s.store.claim([one, pos, two], "t", 1000) == [
        ClaimStatus.CLAIMED,
        ClaimStatus.CLAIMED,
        ClaimStatus.DONE,
    ]
    h101 = PREFIX + b"h:101:0"
    keys = [L2, H100, H99, h101, H100, H99, h101, PREFIX + b"o:orders:2:0"]
    args = [*("t", 1000, 1, 2, 3, 1, 0), b"1", field(one), field(two), 0, 0]
    assert s.claim.calls == [(keys, args)]
    assert one.claimed == two.claimed == H100


def test_claim_script_with_legacy_marks_gets_every_records_format_1_key_last(
    spied: Callable[..., Spied], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spied(reply=[1, 0, b"", 1, 0])
    monkeypatch.setattr(s.store, "_legacy", True)
    by_id, pos = keyed(b"\0\0\0\1", b"field-one...", raw=b"order-1"), position_key(5)
    # The id is done in format 1; the position is not, in either format.
    assert s.store.claim([by_id, pos], "t", 1000) == [ClaimStatus.DONE, ClaimStatus.CLAIMED]
    keys = [
        L2,
        H100,
        H99,
        PREFIX + b"o:orders:2:0",
        LEGACY_PREFIX + b"order-1",
        LEGACY_PREFIX + b"orders/2/5",
    ]
    args = [*("t", 1000, 1, 1, 2, 1, 2), b"1", field(by_id), 0, 0]
    assert s.claim.calls == [(keys, args)]
    s.claim.reply = [1, 0, b"", 0, 1]
    assert s.store.claim([by_id, pos], "t", 1000) == [ClaimStatus.CLAIMED, ClaimStatus.DONE]


def test_renew_extends_our_id_claims_where_they_live_and_the_position_keys_leases(
    spied: Callable[..., Spied],
) -> None:
    s = spied(reply=[1, 0, b""])
    by_id, pos, unclaimed = id_key(b"\0\0\0\1"), position_key(5), id_key(b"\0\0\0\2")
    s.store.claim([by_id, pos], "t", 1000)
    s.store.renew([by_id, pos, unclaimed], "t", 1500)
    assert s.renew.calls == [([L2, H100], ["t", 1500, 1, field(by_id)])]


def test_renew_with_partition_local_ids_extends_the_partitions_lease(spied: Callable[..., Spied]) -> None:
    s = spied(partition_local_ids=True)
    s.store.renew([id_key(b"\0\0\0\1")], "t", 1500)
    assert s.renew.calls == [([L2], ["t", 1500, 1])]


def test_release_drops_only_id_claims_where_they_live(spied: Callable[..., Spied]) -> None:
    s = spied(reply=[1, 0, b""])
    by_id, pos = id_key(b"\0\0\0\1"), position_key(5)
    s.store.claim([by_id, pos], "t", 1000)
    s.store.release([by_id, pos, id_key(b"\0\0\0\2")], "t")
    # No partition lease among the keys: their count (ARGV[2]) is 0.
    assert s.release.calls == [([H100], ["t", 0, field(by_id)])]


def test_release_with_partition_local_ids_sends_nothing(spied: Callable[..., Spied]) -> None:
    s = spied(partition_local_ids=True, reply=[1, 0])
    by_id = id_key(b"\0\0\0\1")
    s.store.claim([by_id], "t", 1000)
    s.store.release([by_id], "t")
    assert s.release.calls == []


def test_hand_over_drops_the_partitions_leases(spied: Callable[..., Spied]) -> None:
    s = spied()
    s.store.hand_over(iter([("orders", 2), ("orders", 3)]), "t")
    assert s.release.calls == [([L2, L3], ["t", 2])]
    assert s.renew.calls == []


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
    """A MemoryDedupStore whose next ``failures`` calls raise DedupUnavailableError.

    Like the Redis store, ``send_marks`` never raises and only queues: marks land on a
    ``wait_marks`` that succeeds, and stay pending when it fails.
    """

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.calls: list[str] = []
        self.pending: list[DedupKey] = []
        self.renewed: list[tuple[list[DedupKey], str, int]] = []

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if self.failures > 0:
            self.failures -= 1
            raise DedupUnavailableError("redis: ConnectionError: connection refused")

    def claim(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> list[ClaimStatus]:
        self._maybe_fail("claim")
        return super().claim(keys, token, lease_ms)

    def send_marks(self, keys: Sequence[DedupKey]) -> None:
        self.calls.append("send_marks")
        self.pending += keys

    def wait_marks(self) -> None:
        self._maybe_fail("wait_marks")
        super().send_marks(self.pending)
        self.pending = []

    def renew(self, keys: Iterable[DedupKey], token: str, lease_ms: int) -> None:
        self._maybe_fail("renew")
        self.renewed.append((list(keys), token, lease_ms))

    def release(self, keys: Iterable[DedupKey], token: str) -> None:
        self._maybe_fail("release")
        super().release(keys, token)

    def hand_over(self, partitions: Iterable[TP], token: str) -> None:
        self._maybe_fail("hand_over")
        super().hand_over(partitions, token)


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


KEYS = builder()
K1, K2, K3 = (KEYS.key(with_id(b"%d" % n, offset=n)) for n in (1, 2, 3))
#: A record of another partition.
P3 = KEYS.key(with_id(b"4", partition=3, offset=1))
#: Records keyed by their position: two of partition 2, one of partition 3.
Q1, Q2 = (KEYS.key(message(offset=n)) for n in (1, 2))
Q3 = KEYS.key(message(partition=3, offset=1))
TP2, TP3 = ("orders", 2), ("orders", 3)


def done(store: MemoryDedupStore, *keys: DedupKey) -> bool:
    return all(key.ident in store.done for key in keys)


def test_stage_builds_keys_with_its_key_builder() -> None:
    key = stage(MemoryDedupStore()).key(with_id(b"9"))
    assert isinstance(key, DedupKey)
    assert key == builder().key(with_id(b"9", offset=1000))
    assert key.digest == digest_of(b"9")
    assert stage(MemoryDedupStore()).key(message()).digest is None


def test_claim_of_fresh_ids_claims_them_under_the_workers_token() -> None:
    store = MemoryDedupStore()
    assert stage(store).claim([K1, K2, P3]) == [ClaimStatus.CLAIMED] * 3
    assert store.claims == {K1.ident: "c:worker-a", K2.ident: "c:worker-a", P3.ident: "c:worker-a"}
    assert store.leases == {}


def test_claim_of_fresh_position_keys_leases_their_partitions_under_the_workers_token() -> None:
    store = MemoryDedupStore()
    assert stage(store).claim([Q1, Q2, Q3]) == [ClaimStatus.CLAIMED] * 3
    assert store.leases == {TP2: "c:worker-a", TP3: "c:worker-a"}
    assert store.claims == {}


def test_claim_again_by_the_same_token_is_still_claimed() -> None:
    store = MemoryDedupStore()
    a = stage(store)
    a.claim([K1])
    assert a.claim([K1, K2]) == [ClaimStatus.CLAIMED, ClaimStatus.CLAIMED]
    # A restarted worker with the same token (static membership) takes its leases back.
    assert stage(store, "worker-a").claim([K1]) == [ClaimStatus.CLAIMED]


def test_a_partition_leased_by_another_token_is_contested_for_position_keys() -> None:
    store = MemoryDedupStore()
    stage(store, "worker-a").claim([Q1])
    # Q2 was never claimed, but its partition is worker-a's.
    assert stage(store, "worker-b").claim([Q2, Q3]) == [ClaimStatus.CONTESTED, ClaimStatus.CLAIMED]
    assert store.leases == {TP2: "c:worker-a", TP3: "c:worker-b"}


def test_an_id_claimed_by_another_token_is_contested_even_in_another_partition() -> None:
    store = MemoryDedupStore()
    stage(store, "worker-a").claim([K1])
    k1_elsewhere = KEYS.key(with_id(b"1", partition=7, offset=500))
    # K2 shares K1's partition but not its id: no partition lease keeps worker-b off it.
    assert stage(store, "worker-b").claim([k1_elsewhere, K2]) == [ClaimStatus.CONTESTED, ClaimStatus.CLAIMED]
    assert store.claims == {K1.ident: "c:worker-a", K2.ident: "c:worker-b"}
    assert store.leases == {}


def test_with_partition_local_ids_an_id_keyed_record_uses_its_partitions_lease() -> None:
    assert DedupSettings().partition_local_ids is False
    store = MemoryDedupStore(partition_local_ids=True)
    a, b = stage(store, "worker-a", partition_local_ids=True), stage(store, "worker-b")
    assert a.claim([K1]) == [ClaimStatus.CLAIMED]
    assert store.leases == {TP2: "c:worker-a"}
    assert store.claims == {}
    # Another id of K1's partition is worker-a's; K1 in another partition is not.
    assert b.claim([K2, KEYS.key(with_id(b"1", partition=7))]) == [ClaimStatus.CONTESTED, ClaimStatus.CLAIMED]
    a.release([K1])  # no id claim to drop: the partition stays worker-a's
    assert b.claim([K2]) == [ClaimStatus.CONTESTED]
    a.hand_over([TP2])
    assert b.claim([K2]) == [ClaimStatus.CLAIMED]
    assert store.leases == {TP2: "c:worker-b", ("orders", 7): "c:worker-b"}


def test_marking_an_id_done_clears_its_claim() -> None:
    store = MemoryDedupStore()
    a, b = stage(store, "worker-a"), stage(store, "worker-b")
    a.claim([K1, K2])
    assert a.mark_done([K1])
    assert store.claims == {K2.ident: "c:worker-a"}
    assert b.claim([K1, K2]) == [ClaimStatus.DONE, ClaimStatus.CONTESTED]
    assert store.claims == {K2.ident: "c:worker-a"}


def test_marked_keys_are_done_for_every_worker() -> None:
    store = MemoryDedupStore()
    a, b = stage(store, "worker-a"), stage(store, "worker-b")
    a.claim([K1, K2])
    assert a.mark_done([K1])
    assert a.claim([K1]) == [ClaimStatus.DONE]
    other_k3 = KEYS.key(with_id(b"3", partition=5))
    assert b.claim([K1, K2, P3, other_k3]) == [
        ClaimStatus.DONE,
        ClaimStatus.CONTESTED,
        ClaimStatus.CLAIMED,
        ClaimStatus.CLAIMED,
    ]


def test_the_same_id_in_another_partition_is_done_once_marked() -> None:
    store = MemoryDedupStore()
    a, b = stage(store, "worker-a"), stage(store, "worker-b")
    a.claim([K1])
    a.mark_done([K1])
    assert b.claim([KEYS.key(with_id(b"1", partition=7, offset=500))]) == [ClaimStatus.DONE]


def test_mark_done_sends_then_waits() -> None:
    store = FlakyStore()
    dedup = stage(store)
    assert dedup.mark_done([K1, K2]) is True
    assert store.calls == ["send_marks", "wait_marks"]
    assert done(store, K1, K2)
    assert store.pending == []


def test_send_marks_only_sends_and_mark_done_waits_for_them() -> None:
    store = FlakyStore()
    dedup = stage(store)
    dedup.send_marks([K1])
    dedup.send_marks([K2])
    assert store.calls == ["send_marks", "send_marks"]
    assert store.pending == [K1, K2]
    assert not done(store, K1)
    assert dedup.mark_done([K3]) is True
    assert store.calls == ["send_marks", "send_marks", "send_marks", "wait_marks"]
    assert done(store, K1, K2, K3)


def test_mark_of_nothing_sends_nothing_but_waits_for_earlier_sends() -> None:
    store = FlakyStore()
    dedup = stage(store)
    assert dedup.mark_done([])
    assert store.calls == ["wait_marks"]
    dedup.send_marks([K1])
    assert dedup.mark_done([], block=False)
    assert store.calls == ["wait_marks", "send_marks", "wait_marks"]
    assert done(store, K1)


def test_release_drops_only_our_own_id_claims() -> None:
    store = MemoryDedupStore()
    a, b = stage(store, "worker-a"), stage(store, "worker-b")
    a.claim([K1, Q1])
    b.claim([K2])
    a.mark_done([K3])
    a.release([K1, K2, Q1])
    assert store.claims == {K2.ident: "c:worker-b"}
    assert store.leases == {TP2: "c:worker-a"}  # a release keeps the partition leases
    assert done(store, K3)  # and the marks
    assert b.claim([K1, K3, Q2]) == [ClaimStatus.CLAIMED, ClaimStatus.DONE, ClaimStatus.CONTESTED]


def test_release_by_a_non_owner_does_nothing() -> None:
    store = MemoryDedupStore()
    stage(store, "worker-a").claim([K1])
    stage(store, "worker-b").release([K1])
    assert store.claims == {K1.ident: "c:worker-a"}


def test_release_passes_the_keys_and_the_token() -> None:
    store = FlakyStore()
    a = stage(store)
    a.claim([K1, P3])
    a.release([K1, P3])
    assert store.calls == ["claim", "release"]
    assert store.claims == {}


def test_release_of_no_keys_calls_nothing() -> None:
    store = FlakyStore()
    stage(store).release([])
    assert store.calls == []


def test_hand_over_drops_only_our_own_partition_leases() -> None:
    store = MemoryDedupStore()
    a, b = stage(store, "worker-a"), stage(store, "worker-b")
    a.claim([Q1, K1])
    b.claim([Q3])
    a.hand_over([TP2, TP3])
    assert store.leases == {TP3: "c:worker-b"}
    assert store.claims == {K1.ident: "c:worker-a"}  # a hand-over keeps the id claims
    assert b.claim([Q2, K1]) == [ClaimStatus.CLAIMED, ClaimStatus.CONTESTED]


def test_hand_over_passes_the_partitions_and_the_token() -> None:
    store = FlakyStore()
    a = stage(store)
    a.claim([Q1, Q3])
    a.hand_over(p for p in (TP2, TP3))  # any iterable
    assert store.calls == ["claim", "hand_over"]
    assert store.leases == {}


def test_hand_over_during_an_outage_is_best_effort() -> None:
    store, stats, outages, wait = FlakyStore(), WorkerStats(), Outages(), FakeWait()
    dedup = stage(store, stats=stats, outages=outages, wait=wait)
    dedup.claim([Q1])
    store.failures = 1
    dedup.hand_over([TP2])  # does not raise: the lease expires
    assert stats.dedup_errors == 1
    assert store.leases == {TP2: "c:worker-a"}
    assert outages.calls == []
    assert wait.delays == []


def test_renew_passes_the_keys_and_the_lease() -> None:
    store = FlakyStore()
    dedup = stage(store, lease_seconds=1.5)
    dedup.renew(k for k in (K1, Q1, P3))  # any iterable
    assert store.renewed == [([K1, Q1, P3], "c:worker-a", 1500)]


def test_renew_during_an_outage_is_best_effort() -> None:
    store, stats, outages, wait = FlakyStore(failures=1), WorkerStats(), Outages(), FakeWait()
    stage(store, stats=stats, outages=outages, wait=wait).renew([K1])  # does not raise
    assert stats.dedup_errors == 1
    assert store.renewed == []
    assert outages.calls == []
    assert wait.delays == []


# --- outages: fail closed -------------------------------------------------------------------------


def test_claim_outage_pauses_once_waits_with_growing_delays_and_resumes_once() -> None:
    store, wait, outages, stats = FlakyStore(failures=4), FakeWait(), Outages(), WorkerStats()
    dedup = stage(store, wait=wait, outages=outages, stats=stats)
    assert dedup.claim([K1, K2]) == [ClaimStatus.CLAIMED, ClaimStatus.CLAIMED]
    assert outages.calls == [True, False]
    assert wait.delays == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert store.calls == ["claim"] * 5
    assert stats.dedup_errors == 4
    assert stats.processed_without_dedup == 0
    assert store.claims == {K1.ident: "c:worker-a", K2.ident: "c:worker-a"}
    assert store.leases == {}
    assert not dedup.in_outage


def test_mark_outage_pauses_once_waits_with_growing_delays_and_resumes_once() -> None:
    store, wait, outages, stats = FlakyStore(failures=4), FakeWait(), Outages(), WorkerStats()
    dedup = stage(store, wait=wait, outages=outages, stats=stats)
    assert dedup.mark_done([K1, K2]) is True
    assert outages.calls == [True, False]
    assert wait.delays == pytest.approx([0.1, 0.2, 0.4, 0.8])
    # The marks are sent once; it is the wait for them that is retried.
    assert store.calls == ["send_marks"] + ["wait_marks"] * 5
    assert stats.dedup_errors == 4
    assert stats.processed_without_dedup == 0
    assert done(store, K1, K2)
    assert not dedup.in_outage


def test_the_stage_is_in_outage_while_it_waits() -> None:
    store, wait = FlakyStore(failures=2), FakeWait()
    seen: list[bool] = []
    dedup = stage(store, wait=wait)
    wait.on_call.append(lambda n: seen.append(dedup.in_outage))
    assert not dedup.in_outage
    dedup.claim([K1])
    assert seen == [True, True]
    assert not dedup.in_outage


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


@pytest.mark.parametrize("op", ["claim", "mark_done"])
def test_a_stop_requested_during_an_outage_raises_and_stays_paused(op: str) -> None:
    store, outages, wait = FlakyStore(failures=100), Outages(), FakeWait(stop_after=3)
    dedup = stage(store, wait=wait, outages=outages)
    with pytest.raises(StopDuringOutageError):
        getattr(dedup, op)([K1])
    assert outages.calls == [True]
    assert wait.delays == pytest.approx([0.1, 0.2, 0.4])
    assert dedup.in_outage
    assert not done(store, K1)


def test_mark_without_blocking_reports_an_outage_instead_of_waiting() -> None:
    store, wait, outages, stats = FlakyStore(failures=1), FakeWait(), Outages(), WorkerStats()
    dedup = stage(store, wait=wait, outages=outages, stats=stats)
    assert dedup.mark_done([K1], block=False) is False
    assert not done(store, K1)
    assert store.pending == [K1]  # kept for the next wait
    assert wait.delays == []
    assert outages.calls == []
    assert stats.dedup_errors == 1
    assert stats.processed_without_dedup == 0
    assert dedup.mark_done([K2], block=False) is True
    assert done(store, K1, K2)


def test_release_during_an_outage_is_best_effort() -> None:
    store, stats = FlakyStore(), WorkerStats()
    dedup = stage(store, stats=stats)
    dedup.claim([K1])
    store.failures = 1
    dedup.release([K1])  # does not raise: the claim expires
    assert stats.dedup_errors == 1
    assert store.claims == {K1.ident: "c:worker-a"}


def test_proceed_mode_lets_records_through_and_counts_them() -> None:
    store, wait, outages, stats = FlakyStore(failures=2), FakeWait(), Outages(), WorkerStats()
    dedup = stage(store, wait=wait, outages=outages, stats=stats, on_unavailable="proceed")
    assert dedup.claim([K1, K2, K3]) == [ClaimStatus.CLAIMED] * 3
    assert stats.processed_without_dedup == 3
    assert dedup.mark_done([K1]) is True  # the wait is given up, not retried
    assert stats.processed_without_dedup == 4
    assert store.calls == ["claim", "send_marks", "wait_marks"]
    assert store.done == set()
    assert store.claims == {}
    assert store.leases == {}
    assert wait.delays == []
    assert outages.calls == []
    assert stats.dedup_errors == 2


def test_proceed_mode_mark_without_blocking_lets_offsets_be_committed() -> None:
    stats = WorkerStats()
    dedup = stage(FlakyStore(failures=1), stats=stats, on_unavailable="proceed")
    assert dedup.mark_done([K1, K2], block=False) is True
    assert stats.dedup_errors == 1
    assert stats.processed_without_dedup == 2


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
    store = MemoryDedupStore()
    assert stage(store).store is store


def test_mark_every_defaults_to_8_pipelined_records() -> None:
    dedup = stage(MemoryDedupStore())
    assert dedup.mark_every == 8
    assert not dedup.per_record


@pytest.mark.parametrize(
    ("mode", "every"),
    [("pipelined", 3), ("batch", 0), ("per_record", 0)],
)
def test_mark_every_counts_only_when_marks_are_pipelined(mode: str, every: int) -> None:
    dedup = stage(MemoryDedupStore(), mark_mode=mode, mark_every=3)
    assert dedup.mark_every == every
    assert dedup.per_record == (mode == "per_record")


def test_the_lease_is_passed_to_the_store_in_milliseconds() -> None:
    seen: list[tuple[str, int]] = []

    class Spy(MemoryDedupStore):
        def claim(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> list[ClaimStatus]:
            seen.append((token, lease_ms))
            return super().claim(keys, token, lease_ms)

        def renew(self, keys: Iterable[DedupKey], token: str, lease_ms: int) -> None:
            seen.append((token, lease_ms))

    dedup = stage(Spy(), lease_seconds=1.5, window_seconds=3600.0)
    dedup.claim([K1])
    dedup.renew([K1])
    assert seen == [("c:worker-a", 1500), ("c:worker-a", 1500)]


# --- contested claims ---------------------------------------------------------------------------------


def test_resolve_contested_returns_claimed_once_the_other_id_claim_is_released() -> None:
    store, wait, stats = MemoryDedupStore(), FakeWait(), WorkerStats()
    other = stage(store, "worker-b")
    other.claim([KEYS.key(with_id(b"1", partition=7))])  # the same id, in another partition
    wait.on_call.append(lambda n: other.release([K1]) if n == 4 else None)
    dedup = stage(store, "worker-a", wait=wait, stats=stats)
    assert dedup.claim([K1]) == [ClaimStatus.CONTESTED]
    assert dedup.resolve_contested(K1) is ClaimStatus.CLAIMED
    assert store.claims == {K1.ident: "c:worker-a"}
    assert wait.delays == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert stats.dedup_contested == 1


def test_resolve_contested_returns_claimed_once_the_other_worker_hands_the_partition_over() -> None:
    store, wait = MemoryDedupStore(), FakeWait()
    other = stage(store, "worker-b")
    other.claim([Q2])  # another record of the same partition
    wait.on_call.append(lambda n: other.hand_over([TP2]) if n == 3 else None)
    dedup = stage(store, "worker-a", wait=wait)
    assert dedup.claim([Q1]) == [ClaimStatus.CONTESTED]
    assert dedup.resolve_contested(Q1) is ClaimStatus.CLAIMED
    assert store.leases == {TP2: "c:worker-a"}
    assert wait.delays == pytest.approx([0.05, 0.1, 0.2])


def test_resolve_contested_returns_done_when_the_other_worker_finishes() -> None:
    store, wait = MemoryDedupStore(), FakeWait()
    other = stage(store, "worker-b")
    other.claim([K1])
    wait.on_call.append(lambda n: other.mark_done([K1]) if n == 2 else None)
    assert stage(store, "worker-a", wait=wait).resolve_contested(K1) is ClaimStatus.DONE
    assert done(store, K1)
    assert store.claims == {}  # the mark cleared the other's claim, and a done id takes none
    assert wait.delays == pytest.approx([0.05, 0.1])


def test_resolve_contested_delay_is_capped_at_one_second() -> None:
    store, wait = MemoryDedupStore(), FakeWait()
    other = stage(store, "worker-b")
    other.claim([K1])
    wait.on_call.append(lambda n: other.release([K1]) if n == 8 else None)
    assert stage(store, "worker-a", wait=wait).resolve_contested(K1) is ClaimStatus.CLAIMED
    assert wait.delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_resolve_contested_raises_when_a_stop_is_requested() -> None:
    store, wait = MemoryDedupStore(), FakeWait(stop_after=2)
    stage(store, "worker-b").claim([K1])
    dedup = stage(store, "worker-a", wait=wait)
    with pytest.raises(StopDuringOutageError):
        dedup.resolve_contested(K1)
    assert store.claims == {K1.ident: "c:worker-b"}
    assert wait.delays == pytest.approx([0.05, 0.1])


def test_resolve_contested_that_meets_an_outage_fails_closed_then_claims() -> None:
    store, wait, outages, stats = FlakyStore(), FakeWait(), Outages(), WorkerStats()
    other = stage(store, "worker-b")
    other.claim([K1])

    def on_wait(n: int) -> None:
        if n == 1:
            other.release([K1])  # the other worker's claim goes away,
            store.failures = 2  # and the store goes down for the next two calls

    wait.on_call.append(on_wait)
    dedup = stage(store, "worker-a", wait=wait, outages=outages, stats=stats)
    assert dedup.resolve_contested(K1) is ClaimStatus.CLAIMED
    assert outages.calls == [True, False]
    assert wait.delays == pytest.approx([0.05, 0.1, 0.2])  # the contested wait, then the outage's
    assert stats.dedup_errors == 2
    assert stats.dedup_contested == 1
    assert store.claims == {K1.ident: "c:worker-a"}


# --- claims sent ahead (the rest of a poll batch) ----------------------------------------------


class LateStore(FlakyStore):
    """A FlakyStore whose claims sent ahead fail when their answer is read (``late`` times)."""

    def __init__(self, late: int) -> None:
        super().__init__()
        self.late = late

    def claim_send(self, keys: Sequence[DedupKey], token: str, lease_ms: int) -> ClaimAnswer:
        self.calls.append("claim_send")

        def answer() -> list[ClaimStatus]:
            if self.late > 0:
                self.late -= 1
                raise DedupUnavailableError("redis: ConnectionError: reset by peer")
            return MemoryDedupStore.claim(self, keys, token, lease_ms)

        return answer


def test_a_claim_sent_ahead_is_answered_when_asked() -> None:
    store = LateStore(late=0)
    other = stage(store, "worker-b")
    assert other.claim([K2]) == [ClaimStatus.CLAIMED]
    answer = stage(store).claim_soon([K1, K2])
    assert store.calls == ["claim", "claim_send"]
    assert answer() == [ClaimStatus.CLAIMED, ClaimStatus.CONTESTED]


def test_a_claim_sent_ahead_that_fails_is_claimed_again_failing_closed() -> None:
    store, wait, outages, stats = LateStore(late=1), FakeWait(), Outages(), WorkerStats()
    answer = stage(store, wait=wait, outages=outages, stats=stats).claim_soon([K1])
    store.failures = 2  # and the claim made instead meets the store down twice more
    assert answer() == [ClaimStatus.CLAIMED]
    assert store.calls == ["claim_send", "claim", "claim", "claim"]
    assert stats.dedup_errors == 3
    assert outages.calls == [True, False]
    assert wait.delays == pytest.approx([0.1, 0.2])


def test_a_claim_that_cannot_be_sent_ahead_is_made_when_asked() -> None:
    store, stats = FlakyStore(failures=1), WorkerStats()
    answer = stage(store, stats=stats).claim_soon([K1])  # the in-memory send claims at once: it fails
    assert store.calls == ["claim"]
    assert answer() == [ClaimStatus.CLAIMED]
    assert store.calls == ["claim", "claim"]
    assert stats.dedup_errors == 1

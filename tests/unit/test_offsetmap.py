"""The offset map: finished offsets above the committed one, as a short metadata string."""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Callable

import pytest

from streamer.engine.offsetmap import SPAN_LIMIT, decode, encode, encoded_size_bound, max_span

#: What an encoding may hold: a prefix letter, then base64url without padding.
ENCODED = re.compile(r"[br][A-Za-z0-9_-]*")

SEEDS = range(20)


# --- a reference implementation, written differently: per bit and per run, no shortcuts -----------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def reference_bit_set(base: int, finished: set[int]) -> str:
    """The bit set, one character per bit: bit i is offset base + 1 + i, LSB first in each byte."""
    span = max(finished) - base
    bits = "".join("1" if base + 1 + i in finished else "0" for i in range(span))
    bits += "0" * (-len(bits) % 8)
    data = bytes(int(bits[i : i + 8][::-1], 2) for i in range(0, len(bits), 8))
    return "b" + b64(data)


def varint(value: int) -> bytes:
    out = []
    while True:
        low, value = value % 128, value // 128
        if value == 0:
            out.append(low)
            return bytes(out)
        out.append(low + 128)


def reference_runs(base: int, finished: set[int]) -> str:
    """The run lengths, walking offset by offset from base + 1 to the highest finished one."""
    runs = [0]
    state = False  # the first run counts unfinished offsets
    for offset in range(base + 1, max(finished) + 1):
        if (offset in finished) != state:
            state = not state
            runs.append(0)
        runs[-1] += 1
    return "r" + b64(b"".join(varint(run) for run in runs))


def random_finished(rng: random.Random, base: int) -> set[int]:
    """Finished offsets above ``base`` in one of several shapes, from scattered to long runs."""
    shape = rng.choice(["scattered", "dense", "runs", "stuck", "few"])
    span = rng.choice([1, 2, 7, 8, 9, 63, 64, 65, rng.randint(1, 3000), rng.randint(1, 30000)])
    if shape == "few":
        return {base + rng.randint(1, span) for _ in range(rng.randint(1, 4))}
    if shape == "stuck":  # base is one slow record, everything after it finished
        return set(range(base + 1, base + 1 + span))
    if shape == "runs":
        finished: set[int] = set()
        offset, done = base + 1, rng.random() < 0.5
        while offset <= base + span:
            length = rng.randint(1, rng.choice([3, 50, 1000]))
            if done:
                finished.update(range(offset, min(offset + length, base + span + 1)))
            offset += length
            done = not done
        return finished or {base + span}
    density = rng.uniform(0.001, 0.2) if shape == "scattered" else rng.uniform(0.5, 0.999)
    return {base + 1 + i for i in range(span) if rng.random() < density} or {base + span}


def alternating(base: int, span: int) -> set[int]:
    """Every other offset finished up to base + span: the worst case for run lengths."""
    return set(range(base + span, base, -2))


# --- examples --------------------------------------------------------------------------------------


def test_nothing_finished_above_base_encodes_as_the_empty_string() -> None:
    assert encode(41, []) == ""
    assert decode(41, "") == frozenset()


def test_offsets_at_or_below_base_are_dropped() -> None:
    assert encode(10, [3, 9, 10]) == ""
    assert encode(10, [3, 10, 11, 11]) == encode(10, [11])
    assert decode(10, encode(10, [0, 10, 12, 15])) == {12, 15}


def test_bit_set_holds_offset_base_plus_one_plus_i_least_significant_bit_first() -> None:
    assert encode(10, [11]) == "bAQ"  # bit 0 -> byte 0x01
    assert encode(10, [12, 13, 14]) == "bDg"  # bits 1, 2, 3 -> byte 0x0e
    assert encode(0, [1, 9]) == "bAQE"  # bits 0 and 8 -> bytes 0x01 0x01
    assert encode(0, [8]) == "bgA"  # bit 7 -> byte 0x80


def test_run_lengths_start_with_the_unfinished_run_after_base_and_omit_the_trailing_one() -> None:
    # Offset 1000 alone above base 0: 999 unfinished (varint e7 07), then 1 finished.
    assert encode(0, [1000]) == "r" + b64(bytes([0xE7, 0x07, 0x01]))
    # Everything after base finished: a first run of 0 unfinished, then 20,000 finished.
    assert encode(7, range(8, 20_008)) == "r" + b64(varint(0) + varint(20_000))


def test_contiguous_runs_choose_run_lengths() -> None:
    finished = set(range(101, 5101)) | set(range(6000, 9000))
    text = encode(100, finished)
    assert text == reference_runs(100, finished)
    assert len(text) < 20 < encoded_size_bound(8899)
    assert decode(100, text) == finished


def test_a_single_offset_far_above_base_chooses_run_lengths() -> None:
    text = encode(5, [5 + 24_000])
    assert text == reference_runs(5, {5 + 24_000})
    assert len(text) == 7  # 'r', then 3 + 1 varint bytes in 6 characters
    assert decode(5, text) == {5 + 24_000}


def test_a_dense_scattered_set_chooses_the_bit_set() -> None:
    finished = alternating(1000, 640)
    text = encode(1000, finished)
    assert text == reference_bit_set(1000, finished)
    assert len(text) == encoded_size_bound(640)


def test_duplicates_and_order_of_the_input_do_not_matter() -> None:
    finished = [50, 12, 12, 30, 11, 50, 31]
    assert encode(10, finished) == encode(10, sorted(set(finished)))
    assert encode(10, iter(finished)) == encode(10, finished)


# --- properties over seeded random sets ------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_decode_inverts_encode(seed: int) -> None:
    rng = random.Random(seed)
    for case in range(40):
        base = rng.choice([0, 1, rng.randint(0, 10**6), rng.randint(0, 2**62)])
        finished = random_finished(rng, base)
        text = encode(base, finished)
        context = f"seed={seed} case={case} base={base} text={text[:60]!r}"
        assert ENCODED.fullmatch(text), context
        assert decode(base, text) == finished, context


@pytest.mark.parametrize("seed", SEEDS)
def test_encode_chooses_the_shorter_encoding_and_the_bit_set_on_a_tie(seed: int) -> None:
    rng = random.Random(seed)
    for case in range(40):
        base = rng.randint(0, 10**9)
        finished = random_finished(rng, base)
        bits, runs = reference_bit_set(base, finished), reference_runs(base, finished)
        context = f"seed={seed} case={case} base={base} bits={len(bits)} runs={len(runs)}"
        assert encode(base, finished) == (runs if len(runs) < len(bits) else bits), context
        # Both forms decode, whichever encode chose.
        assert decode(base, bits) == finished, context
        assert decode(base, runs) == finished, context


@pytest.mark.parametrize("seed", SEEDS)
def test_no_encoding_is_longer_than_the_bit_set_bound_of_its_span(seed: int) -> None:
    rng = random.Random(seed)
    for case in range(40):
        base = rng.randint(0, 10**6)
        finished = random_finished(rng, base)
        span = max(finished) - base
        context = f"seed={seed} case={case} span={span}"
        assert len(encode(base, finished)) <= encoded_size_bound(span), context
        assert len(reference_bit_set(base, finished)) == encoded_size_bound(span), context


@pytest.mark.parametrize("seed", SEEDS)
def test_decode_raises_only_value_error_on_random_text(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "AQgw_-09azZ/+=. é\n"
    for case in range(200):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        text = rng.choice(["b", "r", "x", ""]) + body
        try:
            offsets = decode(3, text)
        except ValueError:
            continue
        # What decode accepts is a map encode reads back the same (it may pick the other form).
        assert decode(3, encode(3, offsets)) == offsets, f"seed={seed} case={case} text={text!r}"
        assert all(offset > 3 for offset in offsets), f"seed={seed} case={case} text={text!r}"


# --- malformed maps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x" + b64(b"\x01"), "unknown prefix"),
        ("B" + b64(b"\x01"), "unknown prefix"),
        ("=AQ", "unknown prefix"),
        ("b", "empty body"),
        ("r", "empty body"),
        ("bA!", "outside base64url"),
        ("bAQ==", "outside base64url"),  # padding is never written
        ("bA+", "outside base64url"),  # standard base64's alphabet, not base64url's
        ("bAQ ", "outside base64url"),
        ("bAQ\n", "outside base64url"),
        ("bAé", "outside base64url"),
        ("bAQEBA", "truncated base64"),  # 5 characters: not a whole number of bytes
        ("bAR", "non-canonical base64"),  # the unused low bits of 'R' are set
        ("b" + b64(b"\x01\x00"), "ends in a zero byte"),
        ("b" + b64(b"\x00"), "ends in a zero byte"),
        ("r" + b64(b"\x80"), "truncated varint"),
        ("r" + b64(varint(0) + b"\xe7"), "truncated varint"),
        ("r" + b64(b"\x80\x00" + b"\x01"), "non-minimal varint"),
        ("r" + b64(b"\xff" * 11), "longer than 10 bytes"),
        ("r" + b64(varint(5)), "odd number of runs"),
        ("r" + b64(varint(0) + varint(3) + varint(2)), "odd number of runs"),
        ("r" + b64(varint(0) + varint(0)), "empty run"),
        ("r" + b64(varint(1) + varint(2) + varint(0) + varint(1)), "empty run"),
        ("r" + b64(varint(SPAN_LIMIT) + varint(1)), "SPAN_LIMIT"),
        ("r" + b64(varint(0) + varint(2**60)), "SPAN_LIMIT"),
        ("b" + b64(b"\x01" * (SPAN_LIMIT // 8) + b"\x01"), "SPAN_LIMIT"),
    ],
    ids=lambda value: f"{value[:16]}...({len(value)})" if len(value) > 40 else None,
)
def test_malformed_maps_raise_value_error_saying_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        decode(0, text)


def test_long_malformed_maps_are_quoted_shortened_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"\.\.\. \(4001 chars\)") as raised:
        decode(0, "x" * 4001)
    assert len(str(raised.value)) < 200


# --- the span limit a dispatcher enforces ------------------------------------------------------------


@pytest.mark.parametrize("max_chars", [100, 3000])
def test_any_set_within_max_span_fits_in_max_chars(max_chars: int) -> None:
    span = max_span(max_chars)
    rng = random.Random(max_chars)
    worst = alternating(77, span)
    assert len(encode(77, worst)) <= max_chars
    for case in range(20):
        finished = {77 + span} | {77 + 1 + i for i in range(span) if rng.random() < rng.random()}
        assert len(encode(77, finished)) <= max_chars, f"seed={max_chars} case={case}"


@pytest.mark.parametrize("max_chars", [100, 3000])
def test_max_span_is_tight_for_the_worst_case(max_chars: int) -> None:
    span = max_span(max_chars) + 64
    assert len(encode(77, alternating(77, span))) > max_chars


def test_max_span_is_the_largest_span_whose_bit_set_fits() -> None:
    for max_chars in range(5000):
        span = max_span(max_chars)
        assert encoded_size_bound(span) <= max_chars, max_chars
        assert encoded_size_bound(span + 1) > max_chars, max_chars


def test_max_span_at_the_broker_default_metadata_limit() -> None:
    assert max_span(4096) == 24_568
    assert max_span(0) == max_span(1) == max_span(2) == 0
    assert max_span(3) == 8


def test_encoded_size_bound_counts_the_prefix_and_unpadded_base64() -> None:
    assert encoded_size_bound(0) == 0
    assert [encoded_size_bound(span) for span in (1, 8, 9, 16, 17, 24, 25)] == [3, 3, 4, 4, 5, 5, 7]


def test_span_limit_is_enforced_on_both_sides() -> None:
    assert encode(0, [SPAN_LIMIT]).startswith("r")
    assert decode(0, encode(0, [SPAN_LIMIT])) == {SPAN_LIMIT}
    assert decode(0, encode(0, alternating(0, SPAN_LIMIT))) == alternating(0, SPAN_LIMIT)
    with pytest.raises(ValueError, match="SPAN_LIMIT"):
        encode(0, [SPAN_LIMIT + 1])
    assert max_span(10**9) == SPAN_LIMIT


@pytest.mark.parametrize(("call", "argument"), [(max_span, -1), (encoded_size_bound, -1)])
def test_negative_sizes_are_refused(call: Callable[[int], int], argument: int) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        call(argument)

"""The offset map: offsets of one partition finished above its committed offset, as a short string.

Records of a partition may finish out of order. The committed offset is ``base``, the first
unfinished offset: everything below it finished. The offsets finished above it travel in the
commit's metadata string, so that a worker taking the partition over skips them instead of running
them again (like Confluent Parallel Consumer's offset map).

An encoding is one prefix letter and a base64url body without padding, so it only holds
``[A-Za-z0-9_-]`` and is safe inside a space-separated ``key=value`` metadata string:

- ``b`` — a bit set: bit ``i`` is offset ``base + 1 + i``, least significant bit first within each
  byte, up to the byte that holds the highest finished offset.
- ``r`` — run lengths: LEB128 varints of alternating runs, first of unfinished offsets starting at
  ``base + 1`` (that run alone may be 0 long), then finished, then unfinished, and so on; the
  trailing unfinished run is left out, so there is always an even number of runs.

``encode`` writes whichever is shorter (the bit set on a tie); ``decode`` reads both and refuses
anything ``encode`` cannot write with a ``ValueError``. The bit set's length depends on the span
alone (highest finished offset - base), so a dispatcher that never starts a record further than
``max_span(limit)`` above ``base`` keeps every map within ``limit`` characters.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

__all__ = ["SPAN_LIMIT", "decode", "encode", "encoded_size_bound", "max_span"]

#: The largest span encode writes and decode reads. It bounds what a corrupt or hostile run-length
#: map can make decode build (a few characters can claim billions of finished offsets); its bit
#: set needs about 175,000 characters, 42 times the broker's default metadata limit.
SPAN_LIMIT = 1 << 20

_BITS = "b"
_RUNS = "r"
_BODY = re.compile(r"[A-Za-z0-9_-]+")
#: A varint of more than 10 bytes (64 bits) cannot be a run within SPAN_LIMIT; refusing it early
#: keeps decode linear on a long corrupt string.
_VARINT_MAX_SHIFT = 63
#: Positions of the bits set in each byte value, least significant first.
_SET_BITS = tuple(tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256))


def encode(base: int, finished: Iterable[int]) -> str:
    """Encode the offsets of ``finished`` above ``base`` as a short ASCII string.

    Offsets ``<= base`` are dropped (``base`` is the first unfinished offset, so it is never
    finished itself), duplicates are ignored, and ``''`` is returned when none is left. Raises
    ``ValueError`` if the span (highest finished offset - base) exceeds ``SPAN_LIMIT``.
    """
    above = sorted({offset for offset in finished if offset > base})
    if not above:
        return ""
    span = above[-1] - base
    if span > SPAN_LIMIT:
        raise ValueError(f"offset map span {span} above base {base} exceeds SPAN_LIMIT ({SPAN_LIMIT})")
    runs = _run_lengths(base, above)
    # Characters of an unpadded base64 body of n bytes: ceil(4n / 3).
    if (4 * len(runs) + 2) // 3 + 1 < encoded_size_bound(span):
        return _RUNS + _b64encode(runs)
    return _BITS + _b64encode(_bit_set(base, span, above))


def decode(base: int, text: str) -> frozenset[int]:
    """The finished offsets above ``base`` that ``text`` (from ``encode``) holds; ``''`` holds none.

    Raises ``ValueError``, naming what is wrong, for anything ``encode`` cannot have written: an
    unknown prefix, characters outside base64url, a truncated or non-minimal varint, an empty run,
    a span above ``SPAN_LIMIT``.
    """
    if not text:
        return frozenset()
    kind, body = text[0], text[1:]
    if kind not in (_BITS, _RUNS):
        raise ValueError(f"offset map {_quote(text)}: unknown prefix {kind!r} (expected 'b' or 'r')")
    data = _b64decode(text, body)
    if kind == _BITS:
        return _read_bit_set(base, text, data)
    return _read_run_lengths(base, text, data)


def max_span(max_chars: int) -> int:
    """The largest span whose encoding is guaranteed to fit in ``max_chars`` characters.

    The span is the highest finished offset minus ``base``; the count includes the prefix letter.
    It is what the bit set of that span needs (``encode`` never writes more), capped at
    ``SPAN_LIMIT``. A dispatcher that refuses to start offset ``o`` while ``o - base`` exceeds it
    keeps the map within ``max_chars``.
    """
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    body_chars = max(max_chars - 1, 0)
    # The most bytes n with ceil(4n / 3) <= body_chars, each byte holding 8 offsets.
    return min(8 * (3 * body_chars // 4), SPAN_LIMIT)


def encoded_size_bound(span: int) -> int:
    """Characters, prefix included, of the bit set for ``span``: no encoding of that span is longer.

    ``0`` for a span of ``0`` (nothing finished above base encodes as ``''``).
    """
    if span < 0:
        raise ValueError(f"span must be >= 0, got {span}")
    if span == 0:
        return 0
    n_bytes = (span + 7) // 8
    return 1 + (4 * n_bytes + 2) // 3


# --- encoding ---------------------------------------------------------------------------------------


def _bit_set(base: int, span: int, above: list[int]) -> bytes:
    """Bit ``offset - base - 1`` set for each offset in ``above``, least significant bit first."""
    bits = bytearray((span + 7) // 8)
    for offset in above:
        index = offset - base - 1
        bits[index >> 3] |= 1 << (index & 7)
    return bytes(bits)


def _run_lengths(base: int, above: list[int]) -> bytes:
    """Varints of alternating unfinished and finished runs of the sorted, distinct ``above``."""
    out = bytearray()
    expected = base + 1  # the first offset after the last finished run
    start = previous = above[0]
    for offset in above[1:]:
        if offset != previous + 1:
            _put_varint(out, start - expected)
            _put_varint(out, previous - start + 1)
            expected = previous + 1
            start = offset
        previous = offset
    _put_varint(out, start - expected)
    _put_varint(out, previous - start + 1)
    return bytes(out)


def _put_varint(out: bytearray, value: int) -> None:
    """Append ``value`` as an unsigned LEB128 varint: 7 bits a byte, low first, high bit = more."""
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- decoding ---------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """``text`` for an error message, shortened: a corrupt map may be thousands of characters."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + f"... ({len(text)} chars)"


def _b64decode(text: str, body: str) -> bytes:
    """The bytes of an unpadded base64url ``body``, refusing any other spelling of them."""
    if not body:
        raise ValueError(f"offset map {_quote(text)}: empty body after the prefix")
    if not _BODY.fullmatch(body):
        raise ValueError(f"offset map {_quote(text)}: characters outside base64url [A-Za-z0-9_-]")
    if len(body) % 4 == 1:
        raise ValueError(f"offset map {_quote(text)}: truncated base64 ({len(body)} characters)")
    try:
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except binascii.Error as error:  # not expected after the checks above; kept for a clear message
        raise ValueError(f"offset map {_quote(text)}: invalid base64: {error}") from error
    # Unused low bits of the last character must be zero, or two strings would mean one map.
    if _b64encode(data) != body:
        raise ValueError(f"offset map {_quote(text)}: non-canonical base64 (unused bits set)")
    return data


def _read_bit_set(base: int, text: str, data: bytes) -> frozenset[int]:
    if data[-1] == 0:
        raise ValueError(f"offset map {_quote(text)}: bit set ends in a zero byte")
    if 8 * (len(data) - 1) + data[-1].bit_length() > SPAN_LIMIT:
        raise ValueError(f"offset map {_quote(text)}: bit set spans more than SPAN_LIMIT ({SPAN_LIMIT})")
    first = base + 1
    return frozenset(
        first + 8 * index + bit for index, byte in enumerate(data) if byte for bit in _SET_BITS[byte]
    )


def _read_run_lengths(base: int, text: str, data: bytes) -> frozenset[int]:
    runs = _read_varints(text, data)
    if len(runs) % 2:
        raise ValueError(f"offset map {_quote(text)}: odd number of runs (ends with an unfinished run)")
    finished: list[range] = []
    offset = base + 1
    for pair in range(0, len(runs), 2):
        gap, length = runs[pair], runs[pair + 1]
        if length == 0 or (gap == 0 and pair > 0):
            raise ValueError(f"offset map {_quote(text)}: empty run (only the first run may be 0 long)")
        offset += gap
        if offset + length - 1 - base > SPAN_LIMIT:
            raise ValueError(f"offset map {_quote(text)}: runs span more than SPAN_LIMIT ({SPAN_LIMIT})")
        finished.append(range(offset, offset + length))
        offset += length
    return frozenset(offset for run in finished for offset in run)


def _read_varints(text: str, data: bytes) -> list[int]:
    """The unsigned LEB128 varints of ``data``, refusing truncated and non-minimal ones."""
    values: list[int] = []
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            if shift > _VARINT_MAX_SHIFT:
                raise ValueError(f"offset map {_quote(text)}: varint longer than 10 bytes")
            continue
        if byte == 0 and shift:
            raise ValueError(f"offset map {_quote(text)}: non-minimal varint (trailing zero byte)")
        values.append(value)
        value = shift = 0
    if shift:
        raise ValueError(f"offset map {_quote(text)}: truncated varint at the end")
    return values

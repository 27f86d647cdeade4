"""What a handler emits: a record for another topic (consume-transform-produce)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec
import pydantic

from streamer.message import Headers, Message


class Record(NamedTuple):
    """An output record. A handler returns one, an iterable of them, or None.

    ``value`` is bytes (sent as is), ``str`` (UTF-8) or ``None`` (a tombstone); a pydantic model or
    a msgspec Struct goes out as its JSON, anything else as compact JSON. ``partition`` None lets
    the producer's partitioner pick from the key.
    The input's idempotency-key header (``[dedup] key_header``) is copied onto the output unless
    ``headers`` sets it, so a downstream streamer with dedup skips outputs replayed after a crash.
    """

    topic: str
    value: Any
    key: bytes | str | None = None
    headers: Headers = ()
    partition: int | None = None


def encode_value(value: Any) -> bytes | None:
    """The bytes an output's value goes out as."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json().encode()
    if isinstance(value, msgspec.Struct):
        return msgspec.json.encode(value)
    return json.dumps(value, separators=(",", ":")).encode()


#: Values a handler sends inside a Record, not as its output (a pydantic model is iterable).
_MODELS = (pydantic.BaseModel, msgspec.Struct)
_NOT_OUTPUTS = (str, bytes, dict, *_MODELS)


def outputs_of(result: Any, msg: Message) -> list[Record]:
    """The records a chain returned for ``msg``: None, a Record, or an iterable of Records.

    Raises TypeError (the record then fails like any handler error) for anything else.
    """
    if result is None:
        return []
    if isinstance(result, Record):
        return [result]
    if isinstance(result, _NOT_OUTPUTS) or not isinstance(result, Iterable):
        hint = " (send a model as a Record's value)" if isinstance(result, _MODELS) else ""
        raise TypeError(
            f"a handler returns None, a streamer.Record or an iterable of them; the handler of "
            f"{msg.topic}[{msg.partition}]@{msg.offset} returned {type(result).__name__}{hint}"
        )
    records = list(result)
    for item in records:
        if not isinstance(item, Record):
            raise TypeError(
                f"a handler's iterable holds streamer.Record items only; the handler of "
                f"{msg.topic}[{msg.partition}]@{msg.offset} yielded {type(item).__name__}"
            )
    return records

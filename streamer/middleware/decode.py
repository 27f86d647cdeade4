"""The decode step: parse the raw value once, before the handler; a failure parks the record."""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

from streamer.chain import Handler, Middleware, Output, is_async
from streamer.errors import ConfigError, PermanentError
from streamer.message import Message

Decoder = Callable[[bytes | None], Any]


def json_decoder(value: bytes | None) -> Any:
    """Decode a UTF-8 JSON value; a tombstone (None) decodes to None."""
    return None if value is None else json.loads(value)


def raw_decoder(value: bytes | None) -> Any:
    """Leave the value as bytes."""
    return value


DECODERS: dict[str, Decoder] = {"json": json_decoder, "raw": raw_decoder}


def resolve_decoder(spec: str) -> Decoder:
    """A decoder by name (``json``, ``raw``) or import path (``package.module:function``)."""
    if spec in DECODERS:
        return DECODERS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"decoder {spec!r}: expected one of {sorted(DECODERS)} or 'module:function'")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"decoder {spec!r} cannot be imported: {exc}") from None
    if not callable(func):
        raise ConfigError(f"decoder {spec!r} is not callable")
    return cast(Decoder, func)


def decode(decoder: Decoder) -> Middleware:
    """Set ``msg.decoded`` from the value; a value the decoder rejects is a permanent failure."""

    def decoded(msg: Message) -> Message:
        try:
            return msg._replace(decoded=decoder(msg.value))
        except Exception as exc:
            raise PermanentError(f"cannot decode value: {type(exc).__name__}: {exc}") from exc

    def middleware(next_handler: Handler) -> Handler:
        if is_async(next_handler):

            async def async_handler(msg: Message) -> Output:
                return await cast(Awaitable[Output], next_handler(decoded(msg)))

            return async_handler

        def handler(msg: Message) -> Output:
            return cast(Output, next_handler(decoded(msg)))

        return handler

    return middleware

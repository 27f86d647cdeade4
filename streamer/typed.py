"""Typed handlers: a handler whose first parameter is a pydantic model or a msgspec Struct gets the
validated object instead of the Message.

    @app.handler("orders")
    def handle(order: Order, msg: Message) -> None: ...    # `msg` is optional; `async def` too

``App.handler`` passes every handler through ``typed_handler`` once, at registration: it reads the
first parameter's type hint and, for a model, returns the plain ``(msg) -> output`` handler that
validates the raw value and calls the typed one. Per record the value is parsed and validated in
one pass, straight from the bytes (pydantic: ``Model.model_validate_json``; msgspec: one
``msgspec.json.Decoder(Struct)`` per Struct, built once), never decoded to a dict first. A value
that fails is a poison record: ``PermanentError`` with the validation errors as its message (the
pydantic or msgspec error is its cause, so ``streamer.error.type`` names it), which parks the
record in the dead-letter topic with its original bytes. A tombstone (no value) is passed as None
to a parameter annotated ``Order | None``, and parked for any other.

A typed handler needs no ``decoder`` on its topic; if the topic has one, the middlewares still see
``msg.decoded``, and the value is parsed twice.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import pydantic

from streamer.chain import Handler, Output, is_async
from streamer.errors import ConfigError, PermanentError
from streamer.message import Message

#: What a typed handler takes first: a pydantic model or a msgspec Struct.
MODEL_TYPES: tuple[type, ...] = (pydantic.BaseModel, msgspec.Struct)
#: What the plain handler takes from the typed one: its names, for errors and logs. Not its
#: annotations: it takes a Message.
_NAMES = ("__module__", "__name__", "__qualname__", "__doc__")
#: What evaluating a type hint raises: a name not defined, a string not an expression, ...
_UNRESOLVED = (NameError, SyntaxError, TypeError, AttributeError)


@dataclass(frozen=True, slots=True)
class Schema:
    """How the values of one model type are validated, and what a failure looks like."""

    model: type
    validate: Callable[[bytes], Any]
    errors: tuple[type[Exception], ...]
    #: The parameter is ``Model | None``: a tombstone is passed as None.
    optional: bool

    def invalid(self, exc: Exception) -> PermanentError:
        """The failure that parks a record whose value is not a valid ``model``."""
        if isinstance(exc, pydantic.ValidationError):
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} [{e['type']}]"
                for e in exc.errors(include_url=False)
            )
        else:
            problems = str(exc)
        return PermanentError(f"invalid {self.model.__qualname__}: {problems}")

    def tombstone(self) -> PermanentError:
        """The failure that parks a tombstone the handler cannot take."""
        name = self.model.__qualname__
        return PermanentError(
            f"a tombstone (no value) is not a {name}; annotate the parameter `{name} | None` to get "
            "tombstones as None"
        )


def schema_of(hint: Any) -> Schema | None:
    """The schema of a handler's first type hint, or None when it is not a model (or ``model | None``)."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) != 1 or len(typing.get_args(hint)) != 2:
            return None
        hint, optional = members[0], True
    if not isinstance(hint, type):
        return None
    if issubclass(hint, pydantic.BaseModel):
        return Schema(hint, hint.model_validate_json, (pydantic.ValidationError,), optional)
    if issubclass(hint, msgspec.Struct):
        # DecodeError: not JSON at all; its subclass ValidationError: JSON, but not this Struct.
        return Schema(hint, struct_decoder(hint).decode, (msgspec.DecodeError,), optional)
    return None


@functools.cache
def struct_decoder(struct: type[msgspec.Struct]) -> msgspec.json.Decoder[Any]:
    """One JSON decoder per Struct type, built on first use."""
    return msgspec.json.Decoder(struct)


def typed_handler(func: Callable[..., Any]) -> Handler | None:
    """The plain handler that validates each record's value for the typed ``func``.

    None when ``func`` is a plain handler (its first parameter is not annotated with a pydantic
    model or a msgspec Struct). Raises ConfigError when ``func`` takes a model and more than one
    other required argument, or when the type hint of its first parameter cannot be resolved.
    """
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # a builtin or a C callable: no signature to read
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional or positional[0].annotation is inspect.Parameter.empty:
        return None
    schema = schema_of(_first_hint(func, positional[0]))
    if schema is None:
        return None
    required = [p for p in positional[1:] if p.default is inspect.Parameter.empty]
    if len(required) > 1:
        raise ConfigError(
            f"handler {_name(func)}: a typed handler takes the {schema.model.__qualname__} and, "
            f"optionally, the Message; it also requires {', '.join(p.name for p in required)}"
        )
    takes_msg = len(positional) > 1 or any(p.kind is p.VAR_POSITIONAL for p in params)
    return _adapter(func, schema, takes_msg)


def _adapter(func: Callable[..., Any], schema: Schema, takes_msg: bool) -> Handler:
    validate, errors, optional = schema.validate, schema.errors, schema.optional

    def parse(msg: Message) -> Any:
        value = msg.value
        if value is None:
            if not optional:
                raise schema.tombstone()
            return None
        try:
            return validate(value)
        except errors as exc:
            raise schema.invalid(exc) from exc

    if is_async(func):

        async def async_handler(msg: Message) -> Output:
            obj = parse(msg)
            result: Output = await (func(obj, msg) if takes_msg else func(obj))
            return result

        return functools.update_wrapper(async_handler, func, assigned=_NAMES, updated=())

    def handler(msg: Message) -> Output:
        obj = parse(msg)
        result: Output = func(obj, msg) if takes_msg else func(obj)
        return result

    return functools.update_wrapper(handler, func, assigned=_NAMES, updated=())


def _first_hint(func: Callable[..., Any], param: inspect.Parameter) -> Any:
    """The resolved type hint of ``func``'s first parameter (strings evaluated in its module)."""
    target: Any = func if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__call__
    try:
        hints = typing.get_type_hints(target)
    except _UNRESOLVED:  # another annotation may not resolve: try this one alone
        hints = None
    if hints is not None:
        return hints.get(param.name, param.annotation)

    def probe() -> None: ...

    probe.__annotations__ = {param.name: param.annotation}
    globalns = getattr(inspect.unwrap(target), "__globals__", None)
    try:
        return typing.get_type_hints(probe, globalns=globalns)[param.name]
    except _UNRESOLVED as exc:
        if isinstance(param.annotation, str) and param.annotation.rpartition(".")[2] == "Message":
            return Message
        raise ConfigError(
            f"handler {_name(func)}: cannot resolve the type hint {param.annotation!r} of its first "
            f"parameter ({type(exc).__name__}: {exc}); define or import it at module level"
        ) from None


def _name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))

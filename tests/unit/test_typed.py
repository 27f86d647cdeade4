"""Typed handlers (pure logic): a handler annotated with a pydantic model or a msgspec Struct gets
the validated value; a value that does not validate is parked; models go out as JSON. Also the
msgspec JSON decoder behind ``decoder = "json"``.

The same against the real broker (the dead-letter record's bytes and headers):
tests/integration/test_typed.py.
"""

from __future__ import annotations

import asyncio
import json
import typing
from collections.abc import Callable
from typing import Any

import msgspec
import pydantic
import pytest

from streamer import App, ConfigError, Message, PermanentError, Record
from streamer.middleware.decode import decode, json_decoder
from streamer.plugins import app_from_settings
from streamer.record import encode_value, outputs_of
from streamer.settings import load_settings
from streamer.testing import ChainRunner, message
from streamer.typed import typed_handler


class Order(pydantic.BaseModel):
    id: int
    customer: str
    amount: int = 0


class OrderStruct(msgspec.Struct):
    id: int
    customer: str
    amount: int = 0


GOOD = b'{"id": 7, "customer": "ada", "amount": 3}'


def runner(handler: Callable[..., Any], topic: str = "orders", **sections: Any) -> ChainRunner:
    app = App()
    app.handler(topic)(handler)
    settings = load_settings(kafka={"bootstrap_servers": "memory", "group_id": "g"}, **sections)
    return ChainRunner(app, topic, settings)


# -- the handler gets the validated value ----------------------------------------------------------


@pytest.mark.parametrize("model", [Order, OrderStruct], ids=["pydantic", "msgspec"])
def test_a_typed_handler_gets_the_value_validated_as_its_model(model: type) -> None:
    seen: list[Any] = []

    def handle(order: model) -> None:  # type: ignore[valid-type]
        seen.append(order)

    handle.__annotations__["order"] = model  # a local name: no module-level string to resolve
    outcome = runner(handle).run(message(GOOD))
    assert outcome.handled
    assert seen == [model(id=7, customer="ada", amount=3)]
    assert type(seen[0]) is model


def pydantic_with_msg(order: Order, msg: Message) -> None:
    SEEN.append((order, msg))


def struct_with_msg(order: OrderStruct, msg: Message) -> None:
    SEEN.append((order, msg))


SEEN: list[tuple[Any, Message]] = []


@pytest.mark.parametrize("handler", [pydantic_with_msg, struct_with_msg], ids=["pydantic", "msgspec"])
def test_a_typed_handler_with_a_second_parameter_gets_the_message_too(handler: Callable[..., None]) -> None:
    SEEN.clear()
    outcome = runner(handler).run(message(GOOD, key=b"k", offset=12))
    assert outcome.handled
    [(order, msg)] = SEEN
    assert order.id == 7
    assert (msg.topic, msg.offset, msg.key, msg.value) == ("orders", 12, b"k", GOOD)


async def async_pydantic(order: Order) -> Record:
    await asyncio.sleep(0)
    return Record("out", order)


async def async_struct(order: OrderStruct, msg: Message) -> Record:
    await asyncio.sleep(0)
    return Record("out", order, key=msg.key)


@pytest.mark.parametrize("handler", [async_pydantic, async_struct], ids=["pydantic", "msgspec"])
def test_an_async_typed_handler_gets_the_model_and_its_output_goes_out_as_json(
    handler: Callable[..., Any],
) -> None:
    outcome = runner(handler).run(message(GOOD))
    assert outcome.handled
    [out] = outcome.outputs
    assert json.loads(encode_value(out.value) or b"") == {"id": 7, "customer": "ada", "amount": 3}


def test_the_typed_handler_is_read_once_at_registration_not_per_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []
    real = typing.get_type_hints

    def counting(obj: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(typing, "get_type_hints", counting)
    seen: list[int] = []

    def handle(order: Order) -> None:
        seen.append(order.id)

    run = runner(handle)
    for i in range(5):
        assert run.run(message(Order(id=i, customer="c"))).handled
    assert seen == [0, 1, 2, 3, 4]
    assert len(calls) == 1


def test_the_registered_function_is_returned_unchanged_and_can_be_called_with_a_model() -> None:
    app = App()

    @app.handler("orders")
    def handle(order: Order) -> int:
        return order.amount * 2

    assert handle(Order(id=1, customer="c", amount=4)) == 8


class CallableHandler:
    def __init__(self) -> None:
        self.seen: list[OrderStruct] = []

    def __call__(self, order: OrderStruct) -> None:
        self.seen.append(order)


def test_a_callable_object_with_a_typed_call_is_a_typed_handler() -> None:
    handler = CallableHandler()
    assert runner(handler).run(message(GOOD)).handled
    assert handler.seen == [OrderStruct(id=7, customer="ada", amount=3)]


def order_handler_factory(factor: int = 1) -> Callable[[Order], Record]:
    """A plugin's handler factory (used by import path below)."""

    def handle(order: Order) -> Record:
        return Record("totals", {"customer": order.customer, "total": order.amount * factor})

    return handle


def test_a_plugin_handler_from_the_settings_is_typed_too() -> None:
    settings = load_settings(
        kafka={"bootstrap_servers": "memory", "group_id": "g"},
        topics={
            "orders": {"chain": [{"use": f"{__name__}:order_handler_factory", "options": {"factor": 2}}]}
        },
    )
    app = app_from_settings(settings)
    outcome = ChainRunner(app, "orders", settings).run(message(GOOD))
    assert outcome.handled
    assert [r.value for r in outcome.outputs] == [{"customer": "ada", "total": 6}]


# -- plain handlers stay plain ---------------------------------------------------------------------


def plain_annotated(msg: Message) -> None:
    PLAIN.append(msg)


def plain_unannotated(msg):  # type: ignore[no-untyped-def]
    PLAIN.append(msg)


def plain_any(msg: Any) -> None:
    PLAIN.append(msg)


def plain_dict(msg: dict[str, Any]) -> None:
    PLAIN.append(msg)


PLAIN: list[Any] = []


@pytest.mark.parametrize("handler", [plain_annotated, plain_unannotated, plain_any, plain_dict])
def test_a_handler_whose_first_parameter_is_not_a_model_gets_the_message(
    handler: Callable[..., None],
) -> None:
    assert typed_handler(handler) is None
    PLAIN.clear()
    assert runner(handler).run(message(GOOD)).handled
    assert [type(m) for m in PLAIN] == [Message]


def test_a_plain_handler_annotated_with_a_message_name_that_does_not_resolve_stays_plain() -> None:
    def handle(msg: Message) -> None: ...

    handle.__annotations__ = {"msg": "streamer.Message", "return": "None"}
    assert typed_handler(handle) is None


# -- refused at registration -------------------------------------------------------------------------


def test_a_first_parameter_hint_that_does_not_resolve_is_refused_at_registration_naming_the_handler() -> None:
    def handle(order: Order) -> None: ...

    handle.__annotations__ = {"order": "NoSuchModel"}
    with pytest.raises(ConfigError, match=r"handler .*handle: cannot resolve the type hint 'NoSuchModel'"):
        App().handler("orders")(handle)


def test_only_the_first_hint_must_resolve() -> None:
    def handle(order: Order) -> None: ...

    handle.__annotations__ = {"order": "Order", "return": "NotImportedHere"}
    assert typed_handler(handle) is not None


def test_a_typed_handler_with_more_required_arguments_is_refused_at_registration() -> None:
    def handle(order: Order, msg: Message, extra: int) -> None: ...

    with pytest.raises(ConfigError, match=r"takes the Order and, optionally, the Message; it also requires"):
        App().handler("orders")(handle)


# -- poison records --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error_type"),
    [(Order, "pydantic_core._pydantic_core.ValidationError"), (OrderStruct, "msgspec.ValidationError")],
    ids=["pydantic", "msgspec"],
)
def test_a_value_that_does_not_validate_is_parked_at_once_with_the_validation_error(
    model: type, error_type: str
) -> None:
    called: list[object] = []

    def handle(order: Any) -> None:
        called.append(order)

    handle.__annotations__["order"] = model
    run = runner(handle, retry={"max_attempts": 5})
    outcome = run.run(message(b'{"id": "seven", "customer": "ada"}'))
    assert outcome.dead_lettered
    assert outcome.attempts == 1, "a record that does not validate is not retried"
    assert not called
    assert isinstance(outcome.error, PermanentError)
    assert outcome.header("streamer.error.type") == error_type
    reason = outcome.header("streamer.error.message") or ""
    assert reason.startswith(f"invalid {model.__qualname__}: ")
    assert "id" in reason
    assert "int" in reason


def test_the_pydantic_reason_lists_every_field_that_failed_on_one_line() -> None:
    def handle(order: Order) -> None: ...

    outcome = runner(handle).run(message(b'{"id": "x", "amount": "y"}'))
    assert outcome.header("streamer.error.message") == (
        "invalid Order: id: Input should be a valid integer, unable to parse string as an integer "
        "[int_parsing]; customer: Field required [missing]; amount: Input should be a valid integer, "
        "unable to parse string as an integer [int_parsing]"
    )


@pytest.mark.parametrize("handler", [pydantic_with_msg, struct_with_msg], ids=["pydantic", "msgspec"])
@pytest.mark.parametrize("value", [b"{not json", b"", b"[1, 2]", b'"a string"', b"\xff"])
def test_a_value_that_is_not_the_model_at_all_is_parked(handler: Callable[..., None], value: bytes) -> None:
    outcome = runner(handler).run(message(value))
    assert outcome.dead_lettered
    assert (outcome.header("streamer.error.message") or "").startswith("invalid Order")


def test_a_tombstone_is_parked_for_a_handler_of_a_model() -> None:
    def handle(order: Order) -> None: ...

    outcome = runner(handle).run(message(None))
    assert outcome.dead_lettered
    assert "tombstone" in (outcome.header("streamer.error.message") or "")
    assert "Order | None" in (outcome.header("streamer.error.message") or "")


def optional_pydantic(order: Order | None) -> None:
    SEEN_OPTIONAL.append(order)


def optional_struct(order: OrderStruct | None) -> None:
    SEEN_OPTIONAL.append(order)


SEEN_OPTIONAL: list[object] = []


@pytest.mark.parametrize("handler", [optional_pydantic, optional_struct], ids=["pydantic", "msgspec"])
def test_a_handler_of_model_or_none_gets_none_for_a_tombstone_and_the_model_otherwise(
    handler: Callable[..., None],
) -> None:
    SEEN_OPTIONAL.clear()
    run = runner(handler)
    assert run.run(message(None)).handled
    assert run.run(message(GOOD)).handled
    assert SEEN_OPTIONAL[0] is None
    assert getattr(SEEN_OPTIONAL[1], "id", None) == 7


# -- outputs -----------------------------------------------------------------------------------------


def test_models_in_output_records_are_encoded_as_json_bytes() -> None:
    assert encode_value(Order(id=1, customer="é")) == b'{"id":1,"customer":"\xc3\xa9","amount":0}'
    assert encode_value(OrderStruct(id=1, customer="é")) == b'{"id":1,"customer":"\xc3\xa9","amount":0}'
    assert encode_value({"a": 1}) == b'{"a":1}'  # unchanged for everything else
    assert encode_value(b"raw") == b"raw"


@pytest.mark.parametrize("model", [Order, OrderStruct], ids=["pydantic", "msgspec"])
def test_a_model_returned_without_a_record_fails_the_record_with_a_hint(model: type) -> None:
    with pytest.raises(TypeError, match=r"returned (Order|OrderStruct) \(send a model as a Record's value\)"):
        outputs_of(model(id=1, customer="c"), message(GOOD))


# -- streamer.testing.message ------------------------------------------------------------------------


def test_message_encodes_a_model_a_struct_or_a_dict_to_json_and_leaves_bytes_and_str_as_before() -> None:
    assert (
        message(Order(id=7, customer="ada"), topic="orders").value == b'{"id":7,"customer":"ada","amount":0}'
    )
    assert message(OrderStruct(id=7, customer="ada")).value == b'{"id":7,"customer":"ada","amount":0}'
    assert message({"id": 7}).value == b'{"id":7}'
    assert message("é").value == "é".encode()
    assert message(b"x").value == b"x"
    assert message(None).value is None


# -- the JSON decoder (msgspec) -----------------------------------------------------------------------


def decoded(value: bytes | None) -> Any:
    seen: list[Message] = []
    decode(json_decoder)(seen.append)(message(value))
    return seen[0].decoded


def test_the_json_decoder_keeps_integers_beyond_64_bits_exact() -> None:
    assert decoded(b'{"id": 123456789012345678901234567890}') == {"id": 123456789012345678901234567890}


def test_the_json_decoder_sets_decoded_and_keeps_every_other_field() -> None:
    msg = message(GOOD, key=b"k", headers={"h": "v"}, topic="t", partition=2, offset=9, timestamp=5)
    seen: list[Message] = []
    decode(json_decoder)(seen.append)(msg)
    assert seen == [msg._replace(decoded={"id": 7, "customer": "ada", "amount": 3})]
    assert type(seen[0]) is Message


@pytest.mark.parametrize("value", [b"NaN", b"[Infinity]", b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16")])
def test_the_json_decoder_rejects_what_strict_json_rejects_as_a_json_decode_error(value: bytes) -> None:
    with pytest.raises(PermanentError, match="cannot decode value: JSONDecodeError") as caught:
        decoded(value)
    assert type(caught.value.__cause__) is json.JSONDecodeError


def test_a_json_decode_error_says_where_the_value_went_wrong_in_characters() -> None:
    with pytest.raises(json.JSONDecodeError) as caught:
        json_decoder('{"é": x}'.encode())
    assert (caught.value.lineno, caught.value.colno, caught.value.pos) == (1, 7, 6)
    assert caught.value.msg == "JSON is malformed: invalid character"

"""The handler chain: compose() and the App that registers handlers and middlewares."""

from __future__ import annotations

from collections import Counter

import pytest

from streamer import App, Handler, Message, Middleware
from streamer.chain import compose

MSG = Message("orders", 0, 42, b"key", b"value")


def recording(name: str, calls: list[str]) -> Middleware:
    """A middleware that logs ``name>`` before and ``<name`` after the handler it wraps."""

    def middleware(next_handler: Handler) -> Handler:
        def handler(msg: Message) -> None:
            calls.append(f"{name}>")
            next_handler(msg)
            calls.append(f"<{name}")

        return handler

    return middleware


# --- compose --------------------------------------------------------------------------------------


def test_compose_makes_the_first_middleware_the_outermost() -> None:
    calls: list[str] = []
    chain = compose(lambda msg: calls.append("handler"), [recording("a", calls), recording("b", calls)])
    chain(MSG)
    assert calls == ["a>", "b>", "handler", "<b", "<a"]


def test_compose_without_middlewares_returns_the_handler_itself() -> None:
    def handler(msg: Message) -> None: ...

    assert compose(handler, []) is handler


def test_compose_accepts_any_iterable_of_middlewares() -> None:
    calls: list[str] = []
    chain = compose(lambda msg: calls.append("handler"), iter([recording("a", calls)]))
    chain(MSG)
    assert calls == ["a>", "handler", "<a"]


def test_compose_passes_the_message_through_to_the_handler() -> None:
    seen: list[Message] = []
    chain = compose(seen.append, [recording("a", [])])
    chain(MSG)
    assert seen == [MSG]


def test_handler_exception_propagates_through_middlewares() -> None:
    calls: list[str] = []

    def failing(msg: Message) -> None:
        raise RuntimeError("boom")

    chain = compose(failing, [recording("a", calls)])
    with pytest.raises(RuntimeError, match="boom"):
        chain(MSG)
    assert calls == ["a>"]  # the middleware did not swallow it


def test_middleware_exception_propagates_and_skips_the_inner_chain() -> None:
    calls: list[str] = []

    def refuse(next_handler: Handler) -> Handler:
        def handler(msg: Message) -> None:
            raise ValueError("refused")

        return handler

    chain = compose(lambda msg: calls.append("handler"), [refuse, recording("inner", calls)])
    with pytest.raises(ValueError, match="refused"):
        chain(MSG)
    assert calls == []


# --- App ------------------------------------------------------------------------------------------


def test_handler_decorator_registers_and_returns_the_function() -> None:
    app = App()

    def handle(msg: Message) -> None: ...

    assert app.handler("orders")(handle) is handle
    assert app.topics == ["orders"]
    assert app.chains() == {"orders": handle}


def test_second_handler_for_a_topic_is_rejected() -> None:
    app = App()
    app.handler("orders")(lambda msg: None)
    with pytest.raises(ValueError, match="'orders' already has a handler"):
        app.handler("orders")(lambda msg: None)


def test_handler_needs_a_topic_name() -> None:
    with pytest.raises(ValueError, match="needs a topic"):
        App().handler("")


def test_use_returns_the_middleware_so_it_works_as_a_decorator() -> None:
    app = App()

    @app.use
    def timing(next_handler: Handler) -> Handler:
        return next_handler

    assert callable(timing)
    assert timing.__name__ == "timing"


def test_topics_are_sorted() -> None:
    app = App()
    for topic in ("payments", "audit", "orders"):
        app.handler(topic)(lambda msg: None)
    assert app.topics == ["audit", "orders", "payments"]


def test_app_chains_wrap_each_handler_in_middlewares_in_the_order_added() -> None:
    calls: list[str] = []
    app = App()
    app.use(recording("first", calls))
    app.use(recording("second", calls))
    app.handler("orders")(lambda msg: calls.append(f"orders@{msg.offset}"))
    app.handler("audit")(lambda msg: calls.append("audit"))
    chains = app.chains()
    chains["orders"](MSG)
    assert calls == ["first>", "second>", "orders@42", "<second", "<first"]


def test_chains_call_each_middleware_factory_once_per_topic_not_per_message() -> None:
    factory_calls: Counter[str] = Counter()
    app = App()

    @app.use
    def counting(next_handler: Handler) -> Handler:
        factory_calls["counting"] += 1
        return next_handler

    handled: list[int] = []
    app.handler("orders")(lambda msg: handled.append(msg.offset))
    app.handler("audit")(lambda msg: handled.append(msg.offset))

    chains = app.chains()
    assert factory_calls["counting"] == 2  # once for each topic
    for offset in range(100):
        chains["orders"](MSG._replace(offset=offset))
        chains["audit"](MSG._replace(topic="audit", offset=offset))
    assert len(handled) == 200
    assert factory_calls["counting"] == 2  # still: the chain is not rebuilt per message

    app.chains()
    assert factory_calls["counting"] == 4  # each chains() call composes afresh, once per topic

"""Outputs in pure logic: what a handler may return, how values are encoded, the transaction
gate, the test runner's view of outputs, and the exactly-once start-up checks. What reaches the
broker, and when an input's offset may move, is tested against the real broker in
tests/integration/test_transform.py."""

from __future__ import annotations

import threading

import pytest

from streamer import App, ConfigError, Message, Record
from streamer.engine.outputs import TransactionGate
from streamer.record import encode_value, outputs_of
from streamer.settings import Settings, load_settings
from streamer.testing import ChainRunner, MemorySource, message
from streamer.worker import Worker

DEADLINE_S = 5.0


def settings(**sections: dict[str, object]) -> Settings:
    return load_settings(kafka={"bootstrap_servers": "in-memory", "group_id": "g"}, **sections)


def msg(offset: int = 7) -> Message:
    return message(b"v", topic="in", partition=2, offset=offset)


def test_a_handler_returns_none_a_record_or_an_iterable_of_records() -> None:
    one = Record("out", b"x")
    assert outputs_of(None, msg()) == []
    assert outputs_of(one, msg()) == [one]
    assert outputs_of([one, one], msg()) == [one, one]
    assert outputs_of((r for r in [one]), msg()) == [one]  # a generator is drained once


@pytest.mark.parametrize("wrong", [b"bytes", "text", {"a": 1}, 42])
def test_anything_else_returned_is_an_error_naming_the_record(wrong: object) -> None:
    with pytest.raises(TypeError, match=r"returns None, a streamer.Record .* in\[2\]@7 returned"):
        outputs_of(wrong, msg())


def test_an_iterable_holding_something_else_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"Record items only; .* yielded int"):
        outputs_of([Record("out", b"x"), 3], msg())


def test_values_go_out_as_bytes_text_as_utf8_and_objects_as_compact_json() -> None:
    assert encode_value(b"\x00raw") == b"\x00raw"
    assert encode_value(None) is None
    assert encode_value("née") == "née".encode()
    assert encode_value({"id": 1, "tags": ["a"]}) == b'{"id":1,"tags":["a"]}'


def test_the_test_runner_shows_what_sync_and_async_handlers_emit() -> None:
    app = App()

    @app.handler("a")
    def forward(m: Message) -> Record:
        return Record("out", m.value, key=m.key)

    @app.handler("b")
    async def fan_out(m: Message) -> list[Record]:
        return [Record("out", m.value), Record("audit", {"offset": m.offset})]

    sent = ChainRunner(app, "a").run(message(b"v", key=b"k"))
    assert sent.handled
    assert sent.outputs == [Record("out", b"v", key=b"k")]
    fanned = ChainRunner(app, "b").run(message(b"v", offset=3))
    assert [r.topic for r in fanned.outputs] == ["out", "audit"]
    assert fanned.outputs[1].value == {"offset": 3}


def test_a_wrong_return_value_fails_the_record_like_any_handler_error() -> None:
    app = App()

    @app.handler("a")
    def bad(m: Message) -> bytes:
        return b"not a record"

    outcome = ChainRunner(app, "a").run(message(b"v"))
    assert outcome.kind == "failed" or outcome.dead_lettered
    assert isinstance(outcome.error, TypeError)


def test_the_gate_keeps_a_commit_out_until_processing_leaves_and_processing_out_while_it_commits() -> None:
    gate = TransactionGate()
    gate.enter()  # processing emitted outputs whose inputs are not published yet
    committing = threading.Event()
    committed = threading.Event()

    def commit() -> None:
        with gate.closed(DEADLINE_S) as ok:
            assert ok
            committing.set()
            assert entered_again.wait(0.05) is False  # processing stays out while we commit
        committed.set()

    entered_again = threading.Event()
    loop = threading.Thread(target=commit)
    loop.start()
    # The commit waits for processing to leave: it has not started.
    assert not committing.wait(0.05)
    assert gate.wanted  # processing sees the request between records and lands early
    gate.leave()
    assert committing.wait(DEADLINE_S)

    def process() -> None:
        gate.enter()
        entered_again.set()

    proc = threading.Thread(target=process)
    proc.start()
    assert committed.wait(DEADLINE_S)
    assert entered_again.wait(DEADLINE_S)  # once the commit is over, processing goes on
    loop.join(DEADLINE_S)
    proc.join(DEADLINE_S)


def test_the_gate_gives_up_after_its_timeout_when_a_record_keeps_running() -> None:
    gate = TransactionGate()
    gate.enter()
    with gate.closed(0.05) as ok:
        assert not ok
    assert not gate.wanted


@pytest.mark.parametrize(
    ("processing", "async_handler"),
    [({"concurrency": 8}, False), ({}, True)],
    ids=["concurrency", "async"],
)
def test_exactly_once_refuses_what_it_cannot_keep_at_start_up(
    processing: dict[str, object], async_handler: bool
) -> None:
    app = App()
    if async_handler:

        @app.handler("t")
        async def handle_async(m: Message) -> None: ...

    else:

        @app.handler("t")
        def handle(m: Message) -> None: ...

    cfg = settings(processing={"guarantee": "exactly_once", **processing})
    with pytest.raises(ConfigError, match=r'guarantee = "exactly_once" runs sync handlers one at a time'):
        Worker(cfg, app.chains(cfg), source=MemorySource({"t": [[b"v"]]}))


def test_a_wrong_guarantee_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"guarantee.*at_least_once.*exactly_once"):
        settings(processing={"guarantee": "twice"})


@pytest.mark.parametrize("every_seconds", [0, 6])
def test_exactly_once_refuses_a_commit_interval_the_transaction_timeout_cuts(every_seconds: float) -> None:
    app = App()

    @app.handler("t")
    def handle(m: Message) -> None: ...

    cfg = settings(
        processing={"guarantee": "exactly_once", "transaction_timeout_seconds": 10},
        commit={"every_seconds": every_seconds},
    )
    with pytest.raises(ConfigError, match=rf"at most half of .* got every_seconds = {every_seconds}"):
        Worker(cfg, app.chains(cfg), source=MemorySource({"t": [[b"v"]]}))

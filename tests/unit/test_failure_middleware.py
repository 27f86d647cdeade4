"""The built-in failure middlewares: retry, decode, timeout, and how settings assemble them per topic."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from streamer import DropRecord, Message, PermanentError, RetryableError
from streamer.chain import Handler, Middleware, compose
from streamer.errors import ConfigError, HandlerTimeoutError, RetryRecord
from streamer.middleware import (
    DEFAULT_ORDER,
    RetryPolicy,
    decode,
    json_decoder,
    resolve_decoder,
    retry,
    timeout,
)
from streamer.middleware.assemble import builtin_middlewares, retry_policy
from streamer.middleware.decode import raw_decoder
from streamer.settings import RetrySettings, Settings

MSG = Message("orders", 1, 42, b"key", b'{"id": 7}', (("message-id", b"7"),), 1_700_000_000_000)


def raising(exc: BaseException) -> Handler:
    """A handler that raises ``exc`` every time."""

    def handler(msg: Message) -> None:
        raise exc

    return handler


def run(middleware: Middleware, handler: Handler, msg: Message = MSG) -> None:
    middleware(handler)(msg)


# --- retry ----------------------------------------------------------------------------------------


def test_retryable_error_becomes_retry_record_with_the_cause() -> None:
    cause = RetryableError("downstream 503")
    with pytest.raises(RetryRecord) as caught:
        run(retry(RetryPolicy(max_attempts=3)), raising(cause))
    assert caught.value.cause is cause
    assert caught.value.__cause__ is cause
    assert "downstream 503" in str(caught.value)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5])
def test_backoff_grows_exponentially_within_the_jitter_bounds(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.2, multiplier=2.0, jitter=0.2, max_backoff=30.0)
    base = 0.2 * 2.0 ** (attempt - 1)
    delays = []
    for _ in range(200):
        with pytest.raises(RetryRecord) as caught:
            run(retry(policy), raising(RetryableError("x")), MSG._replace(attempt=attempt))
        delays.append(caught.value.delay)
    assert all(base * 0.8 <= d <= base * 1.2 for d in delays), (base, min(delays), max(delays))
    assert max(delays) - min(delays) > base * 0.1, "no jitter: retries would move in lockstep"


def test_backoff_delays_grow_from_one_attempt_to_the_next_even_with_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.1, multiplier=2.0, jitter=0.2)
    # With multiplier 2 and jitter 0.2, the ranges [0.8 b, 1.2 b] and [1.6 b, 2.4 b] never overlap.
    for attempt in range(1, 6):
        assert policy.backoff(attempt + 1) > policy.backoff(attempt)


def test_backoff_is_capped_by_max_backoff_jitter_included() -> None:
    policy = RetryPolicy(max_attempts=100, initial_backoff=1.0, multiplier=10.0, max_backoff=5.0, jitter=0.2)
    delays = [policy.backoff(8) for _ in range(100)]
    assert all(4.0 <= d <= 6.0 for d in delays)


def test_no_jitter_gives_exact_delays() -> None:
    policy = RetryPolicy(initial_backoff=0.5, multiplier=3.0, jitter=0.0)
    assert [policy.backoff(a) for a in (1, 2, 3)] == pytest.approx([0.5, 1.5, 4.5])


def test_the_last_attempt_turns_into_a_permanent_error() -> None:
    cause = RetryableError("still 503")
    with pytest.raises(PermanentError, match="gave up after 3 attempts: RetryableError: still 503") as caught:
        run(retry(RetryPolicy(max_attempts=3)), raising(cause), MSG._replace(attempt=3))
    assert caught.value.__cause__ is cause


def test_every_attempt_before_the_last_is_retried() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.01)
    outcomes = []
    for attempt in range(1, 5):
        try:
            run(retry(policy), raising(TimeoutError("slow")), MSG._replace(attempt=attempt))
        except RetryRecord:
            outcomes.append("retry")
        except PermanentError:
            outcomes.append("permanent")
    assert outcomes == ["retry", "retry", "retry", "permanent"]


def test_max_attempts_one_means_no_retry() -> None:
    with pytest.raises(PermanentError, match="gave up after 1 attempts"):
        run(retry(RetryPolicy(max_attempts=1)), raising(RetryableError("x")))


@pytest.mark.parametrize(
    "exc", [ValueError("bad amount"), KeyError("sku"), RuntimeError("bug"), AssertionError()]
)
def test_a_non_retryable_exception_is_permanent_at_once(exc: Exception) -> None:
    with pytest.raises(PermanentError) as caught:
        run(retry(RetryPolicy(max_attempts=5)), raising(exc))
    assert caught.value.__cause__ is exc
    assert type(exc).__name__ in str(caught.value)


@pytest.mark.parametrize("exc", [TimeoutError("t"), ConnectionResetError("c"), HandlerTimeoutError("h")])
def test_timeouts_and_connection_errors_are_retryable_by_default(exc: Exception) -> None:
    with pytest.raises(RetryRecord):
        run(retry(RetryPolicy()), raising(exc))


@pytest.mark.parametrize(
    "signal_exc", [DropRecord("tombstone"), PermanentError("bad data"), RetryRecord(1.0)], ids=type
)
def test_signals_pass_through_untouched(signal_exc: Exception) -> None:
    with pytest.raises(type(signal_exc)) as caught:
        run(retry(RetryPolicy(max_attempts=3)), raising(signal_exc), MSG._replace(attempt=3))
    assert caught.value is signal_exc


def test_a_permanent_error_subclassing_a_retryable_type_is_not_retried() -> None:
    class Rejected(PermanentError, TimeoutError):
        pass

    policy = RetryPolicy(retry_on=(RetryableError, TimeoutError))
    assert not policy.retryable(Rejected("no"))


def test_success_passes_through_once() -> None:
    seen: list[Message] = []
    run(retry(RetryPolicy()), seen.append)
    assert seen == [MSG]


def test_a_base_exception_is_not_swallowed() -> None:
    with pytest.raises(KeyboardInterrupt):
        run(retry(RetryPolicy()), raising(KeyboardInterrupt()))


# --- decode ---------------------------------------------------------------------------------------


def test_json_decode_sets_msg_decoded_for_the_handler() -> None:
    seen: list[Message] = []
    run(decode(json_decoder), seen.append)
    assert seen[0].decoded == {"id": 7}
    assert seen[0]._replace(decoded=None) == MSG, "decode must change nothing but msg.decoded"


def test_json_decode_of_a_tombstone_is_none() -> None:
    seen: list[Message] = []
    run(decode(json_decoder), seen.append, MSG._replace(value=None))
    assert seen[0].decoded is None


@pytest.mark.parametrize("value", [b"{not json", b"", b'{"id": 7', b"\xff\xfe"])
def test_json_decode_failure_is_permanent(value: bytes) -> None:
    called: list[Message] = []
    with pytest.raises(PermanentError, match="cannot decode value") as caught:
        run(decode(json_decoder), called.append, MSG._replace(value=value))
    assert isinstance(caught.value.__cause__, ValueError)  # JSONDecodeError, UnicodeDecodeError
    assert not called, "the handler ran on a value that did not decode"


def test_decode_failure_is_not_retried_by_the_retry_middleware_inside_or_outside() -> None:
    chain = compose(lambda m: None, [retry(RetryPolicy(max_attempts=5)), decode(json_decoder)])
    with pytest.raises(PermanentError):
        chain(MSG._replace(value=b"nope"))


def test_resolve_decoder_by_name_and_by_import_path() -> None:
    assert resolve_decoder("json") is json_decoder
    assert resolve_decoder("raw") is raw_decoder
    assert resolve_decoder("json:loads") is json.loads


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("yaml", "expected one of"),
        ("no_such_module_xyz:decode", "cannot be imported"),
        ("json:no_such_function", "cannot be imported"),
        ("json:__doc__", "not callable"),
    ],
)
def test_resolve_decoder_rejects_bad_specs(spec: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        resolve_decoder(spec)


# --- timeout --------------------------------------------------------------------------------------


def busy_for(seconds: float) -> Handler:
    """A handler that busy-loops (pure Python) for ``seconds``, then fails the test."""

    def handler(msg: Message) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
        raise AssertionError(f"the timeout did not interrupt a handler running {seconds} s")

    return handler


def test_a_handler_running_past_the_timeout_raises_handler_timeout_error() -> None:
    started = time.monotonic()
    with pytest.raises(HandlerTimeoutError, match=r"longer than 0\.05 s"):
        run(timeout(0.05), busy_for(5.0))
    assert time.monotonic() - started < 2.0


def test_a_timer_firing_as_the_handler_returns_never_fails_a_finished_attempt() -> None:
    # Handlers that take about as long as the timeout: some finish, some are interrupted. One
    # that ran to its last statement must never come back as a timeout (it would be retried and
    # its effect repeated).
    races = {"finished": 0, "interrupted": 0}
    for i in range(300):
        done: list[bool] = []

        def about_a_millisecond(msg: Message, done: list[bool] = done, ms: float = 0.5 + i % 6 / 2) -> None:
            deadline = time.perf_counter() + ms / 1000  # 0.5 to 3 ms against a 1 ms timeout
            while time.perf_counter() < deadline:
                pass
            done.append(True)

        try:
            run(timeout(0.001), about_a_millisecond)
        except HandlerTimeoutError:
            assert not done, "a handler that finished was reported as timed out"
            races["interrupted"] += 1
        else:
            races["finished"] += 1
    assert races["interrupted"] > 0, races


def test_a_handler_exception_leaves_no_timeout_behind() -> None:
    with pytest.raises(ValueError, match="boom"):
        run(timeout(0.05), raising(ValueError("boom")))
    deadline = time.monotonic() + 0.2  # past the timeout: a stray injection would land now
    while time.monotonic() < deadline:
        pass


def test_a_timeout_inside_retry_is_retried() -> None:
    chain = compose(busy_for(5.0), [retry(RetryPolicy(max_attempts=3)), timeout(0.05)])
    with pytest.raises(RetryRecord) as caught:
        chain(MSG)
    assert isinstance(caught.value.cause, HandlerTimeoutError)


def test_off_the_main_thread_the_timeout_interrupts_too() -> None:
    outcome: list[Any] = []

    def target() -> None:
        try:
            run(timeout(0.05), busy_for(5.0))
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(5.0)
    assert len(outcome) == 1
    assert isinstance(outcome[0], HandlerTimeoutError)


# --- assembly from settings -----------------------------------------------------------------------


def settings(**sections: Any) -> Settings:
    return Settings(kafka={"bootstrap_servers": "127.0.0.1:9092", "group_id": "g"}, **sections)


def kinds(chain: list[Middleware]) -> list[str]:
    """Which built-in each middleware is (``decode``, ``retry``, ``timeout``)."""
    return [m.__qualname__.split(".")[0] for m in chain]


@pytest.fixture(autouse=True)
def _clean(clean_environment: None) -> None:
    """Keep STREAMER_* variables of the machine out of the settings built here."""


def test_no_settings_no_builtins() -> None:
    assert builtin_middlewares("orders", None) == []


def test_defaults_give_retry_only() -> None:
    assert kinds(builtin_middlewares("orders", settings())) == ["retry"]


def test_all_three_in_the_default_order() -> None:
    s = settings(topics={"orders": {"decoder": "json", "timeout_seconds": 2.5}})
    # DEFAULT_ORDER starts with "trace", there only with tracing on (see test_tracing.py).
    expected = ["decode", "retry", "timeout"]
    assert kinds(builtin_middlewares("orders", s)) == list(DEFAULT_ORDER[1:]) == expected


def test_overrides_apply_to_their_topic_only() -> None:
    s = settings(topics={"orders": {"decoder": "json", "timeout_seconds": 1.0}})
    assert kinds(builtin_middlewares("payments", s)) == ["retry"]


def test_without_retries_and_without_dead_letters_there_is_no_retry_step() -> None:
    s = settings(retry={"max_attempts": 1}, dead_letter={"enabled": False})
    assert kinds(builtin_middlewares("orders", s)) == []


def test_without_retries_the_retry_step_still_turns_failures_permanent_for_the_dead_letter_topic() -> None:
    s = settings(retry={"max_attempts": 1})
    chain = compose(raising(RetryableError("x")), builtin_middlewares("orders", s))
    with pytest.raises(PermanentError, match="gave up after 1 attempts"):
        chain(MSG)


def attempts_until_permanent(chain: Handler) -> int:
    for attempt in range(1, 50):
        try:
            chain(MSG._replace(attempt=attempt))
        except RetryRecord:
            continue
        except PermanentError:
            return attempt
    raise AssertionError("never gave up")


def test_per_topic_retry_settings_replace_the_global_ones() -> None:
    s = settings(retry={"max_attempts": 2}, topics={"orders": {"retry": {"max_attempts": 5}}})
    orders = compose(raising(RetryableError("x")), builtin_middlewares("orders", s))
    payments = compose(raising(RetryableError("x")), builtin_middlewares("payments", s))
    assert attempts_until_permanent(orders) == 5
    assert attempts_until_permanent(payments) == 2


def test_per_topic_backoff_comes_from_the_topic_settings() -> None:
    s = settings(topics={"orders": {"retry": {"initial_backoff": 7.0, "jitter": 0.0}}})
    chain = compose(raising(RetryableError("x")), builtin_middlewares("orders", s))
    with pytest.raises(RetryRecord) as caught:
        chain(MSG)
    assert caught.value.delay == pytest.approx(7.0)


def test_assembled_decode_parks_bad_json_and_timeout_is_retried() -> None:
    s = settings(topics={"orders": {"decoder": "json", "timeout_seconds": 0.05}})
    seen: list[Message] = []
    make: Callable[[Handler], Handler] = lambda h: compose(h, builtin_middlewares("orders", s))  # noqa: E731
    make(seen.append)(MSG)
    assert seen[0].decoded == {"id": 7}
    with pytest.raises(PermanentError, match="cannot decode"):
        make(seen.append)(MSG._replace(value=b"<xml/>"))
    with pytest.raises(RetryRecord) as caught:
        make(busy_for(5.0))(MSG)
    assert isinstance(caught.value.cause, HandlerTimeoutError)


def test_retry_on_import_paths_become_retryable_types() -> None:
    policy = retry_policy(RetrySettings(retry_on=("builtins.KeyError", "json.JSONDecodeError")))
    assert policy.retryable(KeyError("k"))
    assert policy.retryable(json.JSONDecodeError("m", "d", 0))
    assert policy.retryable(RetryableError("always"))
    assert not policy.retryable(TimeoutError("not listed any more"))
    assert not policy.retryable(PermanentError("never"))


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("no_such_module_xyz.Error", "cannot import"),
        ("builtins.NoSuchError", "cannot import"),
        ("builtins.len", "not an exception type"),
    ],
)
def test_bad_retry_on_entries_are_config_errors(path: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        retry_policy(RetrySettings(retry_on=(path,)))


def test_a_bad_topic_decoder_fails_at_assembly_not_per_record() -> None:
    with pytest.raises(ConfigError, match="yaml"):
        builtin_middlewares("orders", settings(topics={"orders": {"decoder": "yaml"}}))

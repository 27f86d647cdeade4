"""Test a handler chain without Kafka: for plugin authors and app teams.

    from streamer.testing import ChainRunner, message

    def test_parks_orders_without_an_id(streamer_runner):
        runner = streamer_runner(app, "orders")
        outcome = runner.run(message(b'{"amount": 3}'))
        assert outcome.dead_lettered
        assert outcome.header("streamer.error.type") == "streamer.errors.PermanentError"

``ChainRunner`` composes the topic's chain as a worker would (the built-in decode / retry / timeout
middlewares from the settings, then the app's middlewares, then the handler) and runs one message
through it the way the worker does: a retry runs the chain again with ``attempt + 1`` (the backoff
is recorded, not slept), a failure that is not retried is parked with the dead-letter headers a
real worker would write. The in-memory twins of the dedup store and the dead-letter sink live here
too, for tests that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pytest

from streamer.app import App
from streamer.chain import Handler
from streamer.deadletter import MemoryDeadLetterSink, failure_headers, header_text
from streamer.dedup import MemoryDedupStore
from streamer.errors import DropRecord, RetryRecord
from streamer.message import Headers, Message
from streamer.settings import Settings, load_settings

__all__ = [
    "ChainRunner",
    "MemoryDeadLetterSink",
    "MemoryDedupStore",
    "Outcome",
    "message",
    "streamer_runner",
]

Kind = Literal["handled", "dropped", "dead_lettered", "failed"]


def message(
    value: bytes | str | None = b"",
    *,
    key: bytes | str | None = None,
    headers: dict[str, bytes | str] | Headers | None = None,
    topic: str = "test",
    partition: int = 0,
    offset: int = 0,
    timestamp: int | None = None,
) -> Message:
    """Build a Message the way the worker would hand it to a chain; str values are UTF-8 encoded."""
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key.encode() if isinstance(key, str) else key,
        value=value.encode() if isinstance(value, str) else value,
        headers=tuple((k, v.encode() if isinstance(v, str) else v) for k, v in items),
        timestamp=timestamp,
    )


@dataclass
class Outcome:
    """What happened to one message, after how many attempts.

    handled, dropped, dead_lettered, or failed (no dead-letter topic: the worker would stop).
    """

    kind: Kind
    attempts: int
    #: Backoffs the retry middleware asked for between attempts, in seconds (not slept).
    retry_delays: list[float] = field(default_factory=list)
    #: The exception that parked the record (dead_lettered), or that DropRecord carried.
    error: BaseException | None = None
    #: Headers of the record as written to the dead-letter topic (dead_lettered only).
    dead_letter_headers: Headers = ()
    dead_letter_topic: str | None = None

    @property
    def handled(self) -> bool:
        """The chain succeeded."""
        return self.kind == "handled"

    @property
    def dropped(self) -> bool:
        """The chain raised DropRecord."""
        return self.kind == "dropped"

    @property
    def dead_lettered(self) -> bool:
        """The record would be parked in the dead-letter topic."""
        return self.kind == "dead_lettered"

    @property
    def retried(self) -> bool:
        """At least one retry happened."""
        return self.attempts > 1

    def header(self, name: str) -> str | None:
        """A dead-letter header as text, e.g. ``streamer.error.type``."""
        return header_text(self.dead_letter_headers, name)


class ChainRunner:
    """Runs messages through one topic's chain as a worker would, in-process."""

    def __init__(self, app: App, topic: str, settings: Settings | None = None, group: str = "test") -> None:
        self.settings = settings or load_settings(kafka={"bootstrap_servers": "in-memory", "group_id": group})
        chains = app.chains(self.settings)
        if topic not in chains:
            raise KeyError(f"app has no handler for topic {topic!r} (it has {sorted(chains)})")
        self._chain: Handler = chains[topic]
        self.topic = topic
        self.dead_letters = MemoryDeadLetterSink()
        self.outcomes: list[Outcome] = []

    def run(self, msg: Message, *, max_attempts: int = 100) -> Outcome:
        """Run ``msg`` (its topic set to this runner's) to a final outcome and return it."""
        msg = msg._replace(topic=self.topic)
        delays: list[float] = []
        while True:
            try:
                self._chain(msg)
            except DropRecord as drop:
                return self._record(Outcome("dropped", msg.attempt, delays, drop))
            except RetryRecord as retry:
                if msg.attempt >= max_attempts:
                    raise AssertionError(f"still retrying after {max_attempts} attempts") from retry
                delays.append(retry.delay)
                msg = msg._replace(attempt=msg.attempt + 1)
                continue
            except Exception as exc:  # noqa: BLE001 - the worker parks any failure; so do we
                if not self.settings.dead_letter.enabled:
                    return self._record(Outcome("failed", msg.attempt, delays, exc))
                dlq = self.settings.dead_letter_topic(self.topic)
                self.dead_letters.park(msg, exc, dlq, self.settings.kafka.group_id, "test-worker")
                headers = failure_headers(msg, exc, self.settings.kafka.group_id, "test-worker")
                return self._record(Outcome("dead_lettered", msg.attempt, delays, exc, headers, dlq))
            return self._record(Outcome("handled", msg.attempt, delays))

    def _record(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome


@pytest.fixture
def streamer_runner() -> Callable[..., ChainRunner]:
    """A factory of ChainRunner: ``streamer_runner(app, "orders", settings=None)``."""
    return ChainRunner

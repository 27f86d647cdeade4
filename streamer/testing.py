"""Test a handler chain without Kafka: for plugin authors and app teams.

    from streamer.testing import ChainRunner, message

    def test_parks_orders_without_an_id(streamer_runner):
        runner = streamer_runner(app, "orders")
        outcome = runner.run(message(b'{"amount": 3}'))
        assert outcome.dead_lettered
        assert outcome.header("streamer.error.type") == "streamer.errors.PermanentError"

``ChainRunner`` runs ``async def`` handlers too (on an event loop of its own), and
``ChainRunner.run_batch`` runs a batch handler over a list of messages the way the worker does.
For a typed handler (``def handle(order: Order)``), build the message from the model:
``runner.run(message(Order(id=7)))``; a value that does not validate is parked, as in a worker.

``ChainRunner`` composes the topic's chain as a worker would (the built-in decode / retry / timeout
middlewares from the settings, then the app's middlewares, then the handler) and runs one message
through it the way the worker does: a retry runs the chain again with ``attempt + 1`` (the backoff
is recorded, not slept), a failure that is not retried is parked with the dead-letter headers a
real worker would write. The in-memory twins of the dedup store and the dead-letter sink live here
too, for tests that need them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import pytest

from streamer.app import App
from streamer.chain import Handler, is_async
from streamer.deadletter import MemoryDeadLetterSink, failure_headers, header_text
from streamer.dedup import MemoryDedupStore
from streamer.engine.batches import BatchChain, BatchFailed
from streamer.errors import DropRecord, PermanentError, RetryableError, RetryRecord
from streamer.message import Headers, Message
from streamer.record import Record, encode_value, outputs_of
from streamer.settings import Settings, load_settings

__all__ = [
    "ChainRunner",
    "MemoryDeadLetterSink",
    "MemoryDedupStore",
    "MemorySource",
    "Outcome",
    "message",
    "streamer_runner",
]

Kind = Literal["handled", "dropped", "dead_lettered", "failed"]


def message(
    value: Any = b"",
    *,
    key: bytes | str | None = None,
    headers: dict[str, bytes | str] | Headers | None = None,
    topic: str = "test",
    partition: int = 0,
    offset: int = 0,
    timestamp: int | None = None,
) -> Message:
    """Build a Message the way the worker would hand it to a chain.

    ``value`` is encoded as an output Record's would be: bytes as is, str as UTF-8, a pydantic
    model or a msgspec Struct as its JSON (``message(Order(id=7), topic="orders")`` for a typed
    handler), a dict or another JSON value as compact JSON.
    """
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key.encode() if isinstance(key, str) else key,
        value=encode_value(value),
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
    #: The records the chain returned (handled only), as the worker would send them.
    outputs: list[Record] = field(default_factory=list)

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

    @staticmethod
    def _await(awaitable: Awaitable[Any]) -> Any:
        async def main() -> Any:
            return await awaitable

        return asyncio.run(main())

    def run(self, msg: Message, *, max_attempts: int = 100) -> Outcome:
        """Run ``msg`` (its topic set to this runner's) to a final outcome and return it."""
        if isinstance(self._chain, BatchChain):
            raise TypeError(f"topic {self.topic!r} has a batch handler: use run_batch()")
        msg = msg._replace(topic=self.topic)
        delays: list[float] = []
        run_async = is_async(self._chain)
        while True:
            try:
                if run_async:
                    result = self._await(cast(Awaitable[Any], self._chain(msg)))
                else:
                    result = self._chain(msg)
                outputs = outputs_of(result, msg)
            except DropRecord as drop:
                return self._record(Outcome("dropped", msg.attempt, delays, drop))
            except RetryRecord as retry:
                if msg.attempt >= max_attempts:
                    raise AssertionError(f"still retrying after {max_attempts} attempts") from retry
                delays.append(retry.delay)
                msg = msg._replace(attempt=msg.attempt + 1)
                continue
            except Exception as exc:  # noqa: BLE001 - the worker parks any failure; so do we
                return self._record(self._failed(msg, exc, delays))
            return self._record(Outcome("handled", msg.attempt, delays, outputs=outputs))

    def run_batch(self, msgs: Sequence[Message]) -> list[Outcome]:
        """Run ``msgs`` through the topic's batch handler as the worker would; an outcome each.

        Records named by ``BatchFailed`` (or all, on another exception) are tried again with the
        topic's retry policy (backoffs recorded, not slept), then parked one by one.
        """
        chain = self._chain
        if not isinstance(chain, BatchChain):
            raise TypeError(f"topic {self.topic!r} has a per-record handler: use run()")
        batch = [m._replace(topic=self.topic) for m in msgs]
        outcomes: list[Outcome | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        if chain.decoder is not None:
            for i in list(pending):
                try:
                    batch[i] = batch[i]._replace(decoded=chain.decoder(batch[i].value))
                except Exception as exc:  # noqa: BLE001 - parked, as the worker does
                    error = PermanentError(f"cannot decode value: {type(exc).__name__}: {exc}")
                    outcomes[i] = self._failed(batch[i], error, [])
                    pending.remove(i)
        attempt, delays = 1, cast(list[float], [])
        while pending:
            failed, cause = self._call_batch(chain, [batch[i]._replace(attempt=attempt) for i in pending])
            if isinstance(cause, DropRecord):
                for i in pending:
                    outcomes[i] = Outcome("dropped", attempt, list(delays), cause)
                break
            failed = [pending[j] for j in failed]
            for i in pending:
                if i not in failed:
                    outcomes[i] = Outcome("handled", attempt, list(delays))
            if not failed or cause is None:
                break
            if chain.policy.retryable(cause) and attempt < chain.policy.max_attempts:
                delays.append(chain.policy.backoff(attempt))
                attempt, pending = attempt + 1, failed
                continue
            for i in failed:
                outcomes[i] = self._failed(batch[i]._replace(attempt=attempt), cause, list(delays))
            break
        done = [o if o is not None else Outcome("handled", attempt, delays) for o in outcomes]
        self.outcomes.extend(done)
        return done

    def _call_batch(self, chain: BatchChain, call: list[Message]) -> tuple[list[int], BaseException | None]:
        """One call of a batch handler: the indexes (into ``call``) that failed, and why."""
        try:
            if chain.is_async:
                self._await(cast(Awaitable[None], chain.func(call)))
            else:
                chain.func(call)
        except DropRecord as drop:
            return [], drop
        except BatchFailed as bad:
            return [j for j in bad.indexes if 0 <= j < len(call)], bad.cause or RetryableError(str(bad))
        except Exception as exc:  # noqa: BLE001 - the whole batch failed
            return list(range(len(call))), exc
        return [], None

    def _failed(self, msg: Message, exc: BaseException, delays: list[float]) -> Outcome:
        if not self.settings.dead_letter.enabled:
            return Outcome("failed", msg.attempt, delays, exc)
        dlq = self.settings.dead_letter_topic(self.topic)
        self.dead_letters.park(msg, exc, dlq, self.settings.kafka.group_id, "test-worker")
        headers = failure_headers(msg, exc, self.settings.kafka.group_id, "test-worker")
        return Outcome("dead_lettered", msg.attempt, delays, exc, headers, dlq)

    def _record(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome


@pytest.fixture
def streamer_runner() -> Callable[..., ChainRunner]:
    """A factory of ChainRunner: ``streamer_runner(app, "orders", settings=None)``."""
    return ChainRunner


class MemorySource:
    """An in-memory twin of the Kafka source: one consumer alone in its group, for unit tests.

    ``records`` maps each topic to its partitions' values (a list per partition). The first poll
    assigns every partition; records come in batches in offset order per partition; commits,
    pauses and seeks are remembered; ``close`` revokes everything, as leaving the group does.
    """

    def __init__(self, records: dict[str, list[list[bytes]]], retention_ms: int = -1) -> None:
        self.records = records
        self.retention_ms = retention_ms
        self.commits: list[tuple[dict[tuple[str, int], int], dict[tuple[str, int], str], bool]] = []
        self.paused: set[tuple[str, int]] = set()
        self.created: dict[str, int] = {}
        self._position: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._metadata: dict[tuple[str, int], str] = {}
        self._callbacks: tuple[Callable[[list[tuple[str, int]]], None], ...] = ()
        self._assigned = False
        self._on_commit: Callable[[Any, list[Any]], None] | None = None
        self._acks: list[dict[tuple[str, int], int]] = []

    def bind(self, on_commit: Callable[[Any, list[Any]], None]) -> None:
        """Asynchronous commits are acknowledged at the next poll, as librdkafka does."""
        self._on_commit = on_commit

    def subscribe(self, topics: Any, on_assign: Any, on_revoke: Any, on_lost: Any) -> None:
        """Remember the callbacks; the first poll assigns."""
        self._callbacks = (on_assign, on_revoke, on_lost)

    def _tps(self) -> list[tuple[str, int]]:
        return [(t, p) for t, parts in self.records.items() for p in range(len(parts))]

    def poll(self, max_records: int, timeout: float) -> list[Any]:
        """The next batch: up to ``max_records`` from unpaused partitions, in offset order."""
        from confluent_kafka import Message as KafkaMessage
        from confluent_kafka import TopicPartition

        while self._acks and self._on_commit is not None:
            acked = self._acks.pop(0)
            self._on_commit(None, [TopicPartition(t, p, o) for (t, p), o in acked.items()])
        if not self._assigned:
            self._assigned = True
            for tp in self._tps():
                self._position[tp] = self._committed.get(tp, 0)
            self._callbacks[0](self._tps())
        batch: list[Any] = []
        for tp in self._tps():
            if tp in self.paused:
                continue
            values = self.records[tp[0]][tp[1]]
            while self._position[tp] < len(values) and len(batch) < max_records:
                offset = self._position[tp]
                batch.append(
                    KafkaMessage(
                        topic=tp[0],
                        partition=tp[1],
                        offset=offset,
                        key=None,
                        value=values[offset],
                        headers=None,
                        timestamp=(1, 0),
                    )
                )
                self._position[tp] = offset + 1
        return batch

    def commit(
        self,
        offsets: dict[tuple[str, int], int],
        metadata: Mapping[tuple[str, int], str],
        *,
        asynchronous: bool,
    ) -> None:
        """Remember the commit."""
        self.commits.append((dict(offsets), dict(metadata), asynchronous))
        self._committed.update(offsets)
        self._metadata.update({tp: metadata[tp] for tp in offsets})
        if asynchronous:
            self._acks.append(dict(offsets))

    def committed(
        self, partitions: list[tuple[str, int]], timeout: float = 10.0
    ) -> dict[tuple[str, int], Any]:
        """The offsets committed so far."""
        from streamer.source import Committed

        return {tp: Committed(self._committed.get(tp), self._metadata.get(tp)) for tp in partitions}

    def watermarks(self, tp: tuple[str, int], timeout: float = 10.0) -> tuple[int, int]:
        """0 and the partition's record count."""
        return 0, len(self.records[tp[0]][tp[1]])

    def pause(self, partitions: list[tuple[str, int]]) -> None:
        """Stop serving ``partitions``."""
        self.paused.update(partitions)

    def resume(self, partitions: list[tuple[str, int]]) -> None:
        """Serve ``partitions`` again."""
        self.paused.difference_update(partitions)

    def seek(self, tp: tuple[str, int], offset: int) -> None:
        """Serve ``tp`` from ``offset`` next."""
        self._position[tp] = offset

    def describe_topics(self, topics: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Every known or created topic exists."""
        from streamer.source import TopicInfo

        known = {t: len(p) for t, p in self.records.items()} | self.created
        return {t: TopicInfo(known[t], self.retention_ms) if t in known else None for t in topics}

    def create_topics(self, topics: Any, timeout: float = 30.0) -> None:
        """Remember created topics."""
        self.created.update(topics)

    def close(self) -> None:
        """Leave the group: revoke every partition."""
        if self._assigned:
            self._callbacks[1](self._tps())

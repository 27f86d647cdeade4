"""Outputs the broker refuses: the input fails with them, is parked in the dead-letter topic with
its original bytes and the reason, and nothing is lost or committed past — against the real
broker, with a worker run in this process until the end offsets.

The output topic accepts record batches of at most ``MAX_BYTES``; the handler sends an output of
``BIG`` bytes for every ``POISON_EVERY``-th id. The broker refuses the whole produce batch such an
output travels in (``MESSAGE_TOO_LARGE``), failing its batchmates too; the worker sends each
failed input's outputs once more, alone, so only the big ones fail again. What must hold, serial
and concurrent: exactly the big inputs are parked, with their original bytes and a reason naming
the output; every other input's output is on the output topic (nothing lost); the group's
committed offsets are the end offsets.
"""

from __future__ import annotations

import pytest
from confluent_kafka.admin import NewTopic

from streamer import App, Message, Record
from streamer.exitcodes import EXIT_OK
from streamer.settings import load_settings
from streamer.worker import Worker
from tests.conftest import TopicFactory
from tests.support.kafka import (
    admin,
    committed_offsets,
    delete_topics,
    encode_value,
    end_offsets,
    produce_records,
    read_all,
    record_id,
)

pytestmark = pytest.mark.integration

RECORDS = 600
POISON_EVERY = 97
MAX_BYTES = 4_000
BIG = 8_000
READ_TIMEOUT_S = 60.0


@pytest.mark.parametrize("concurrency", [1, 16], ids=["serial", "concurrent"])
def test_an_output_the_broker_refuses_parks_its_input_with_the_reason_and_loses_nothing(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id: str, concurrency: int
) -> None:
    source = topic_factory(3)
    out = f"{source}.out"
    dlq = f"{source}.dlq"
    client = admin(kafka_bootstrap)  # referenced until its futures resolve
    futures = client.create_topics(
        [NewTopic(out, 3, 1, config={"max.message.bytes": str(MAX_BYTES)}), NewTopic(dlq, 1, 1)]
    )
    for future in futures.values():
        future.result(30)
    try:
        produce_records(kafka_bootstrap, source, RECORDS)
        app = App()

        def forward(msg: Message) -> Record:
            big = record_id_of(msg) % POISON_EVERY == 0
            return Record(out, b"x" * BIG if big else msg.value, key=msg.key)

        async def forward_async(msg: Message) -> Record:
            return forward(msg)

        app.handler(source)(forward if concurrency == 1 else forward_async)

        settings = load_settings(
            kafka={"bootstrap_servers": kafka_bootstrap, "group_id": group_id},
            metrics={"enabled": False},
            dead_letter={"enabled": True},
            processing={"concurrency": concurrency, "ordering": "key"},
        )
        worker = Worker(settings, app.chains(settings), until_end=True)
        assert worker.run() == EXIT_OK
        assert committed_offsets(kafka_bootstrap, group_id, source) == end_offsets(kafka_bootstrap, source)

        parked = worker.stats.dead_lettered
        committed = {"timeout": READ_TIMEOUT_S, "read_committed": True}
        outputs = read_all(kafka_bootstrap, out, RECORDS - parked, **committed)
        dead = read_all(kafka_bootstrap, dlq, parked, **committed)
        sent = {record_id(m) for m in outputs}
        parked_ids = {record_id(m) for m in dead}
        big = {i for i in range(RECORDS) if i % POISON_EVERY == 0}
        print(f"outputs {len(outputs)}, parked {len(dead)} (big ones {len(big)})")
        assert parked_ids == big, f"parked {sorted(parked_ids)}, expected the big ones {sorted(big)}"
        assert sent == set(range(RECORDS)) - big, "inputs neither sent on nor parked: lost"
        for m in dead:
            reason = (dict(m.headers())["streamer.error.message"] or b"").decode()
            assert "output to" in reason, f"parked without the output's reason: {reason!r}"
            assert m.value() == encode_value(record_id(m), 100)  # the input's original bytes
        assert worker.stats.output_errors == len(big)
        assert worker.stats.outputs == {out: RECORDS - len(big)}
    finally:
        delete_topics(kafka_bootstrap, [out, dlq])


def record_id_of(msg: Message) -> int:
    header = msg.header("message-id")
    return int(header) if header is not None else -1

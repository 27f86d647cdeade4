"""What decoding a record costs in the chain, without a broker: the JSON decoder and typed handlers.

    .venv/bin/python -m bench.decode [--records 200000] [--repeat 3]

Real confluent-kafka Message objects holding a ~100-byte JSON object are built once; each row
then turns every one into a streamer Message (as the worker does) and runs it through the chain
``App.chains(settings)`` composes for the topic, with the default settings (so the retry
middleware is there in every row). Rows:

- no-op handler, no decoder: the baseline;
- ``decoder = "json:loads"``: the decode step with the standard library's parser;
- ``decoder = "orjson:loads"``: the same with orjson (a row only when orjson is installed: it is
  no dependency of streamer, it is here to compare);
- ``decoder = "json"``: streamer's JSON decoder (msgspec);
- a typed handler ``def handle(order: Order)`` with a pydantic model, and with a msgspec Struct
  (no decoder: the typed handler validates the raw bytes itself).

Each row is run ``--repeat`` times, rotating the order between passes so that a drift in machine
load favours no row; the table shows the best pass. CPU µs per record is ``time.process_time``
(this process, one thread); "over no-op" is a row's best minus the baseline's best.

What the decode step costs beyond its parser (~0.35 µs for msgspec here) is mostly building the
new Message with ``decoded`` set (~0.2 µs: a NamedTuple is immutable, so the step copies it); a
typed handler hands the validated object straight to the handler and pays no such copy.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pydantic
from confluent_kafka import Message as KafkaMessage

from streamer import App, Message
from streamer.chain import Handler
from streamer.message import message_from_kafka
from streamer.settings import load_settings

TOPIC = "orders"
VALUE = b'{"order_id": "o-0000012345", "customer": "ada", "amount": 42, "currency": "EUR", "items": [1, 2]}'


class Order(pydantic.BaseModel):
    """The record as a pydantic model."""

    order_id: str
    customer: str
    amount: int
    currency: str
    items: list[int]


class OrderStruct(msgspec.Struct):
    """The record as a msgspec Struct."""

    order_id: str
    customer: str
    amount: int
    currency: str
    items: list[int]


def noop(msg: Message) -> None:
    """A handler that does nothing."""


def typed_pydantic(order: Order) -> None:
    """A typed handler of the pydantic model."""


def typed_struct(order: OrderStruct) -> None:
    """A typed handler of the msgspec Struct."""


def chain(handler: Callable[..., Any], decoder: str | None) -> Handler:
    """The chain a worker of an app with just ``handler`` on TOPIC runs."""
    settings = load_settings(
        kafka={"bootstrap_servers": "none", "group_id": "bench"},
        metrics={"enabled": False},
        topics={TOPIC: {"decoder": decoder}} if decoder else {},
    )
    app = App()
    app.handler(TOPIC)(handler)
    return app.chains(settings)[TOPIC]


def raw_records(records: int) -> list[Any]:
    """Real confluent-kafka Message objects, as a poll returns them."""
    raws = [
        KafkaMessage(
            topic=TOPIC,
            partition=0,
            offset=i,
            key=None,
            value=VALUE,
            headers=None,
            timestamp=(1, 1_700_000_000_000),
        )
        for i in range(records)
    ]
    # The pre-built records would make every GC pass scan a heap a real worker never has.
    gc.collect()
    gc.freeze()
    return raws


def cpu_seconds(run: Handler, raws: list[Any]) -> float:
    """CPU seconds to build and run every record through ``run``."""
    build = message_from_kafka
    started = time.process_time()
    for raw in raws:
        run(build(raw))
    return time.process_time() - started


def main() -> None:
    """Print CPU µs per record for each row, and over the no-op baseline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows: list[tuple[str, Handler]] = [
        ("no-op handler, no decoder", chain(noop, None)),
        ('decoder = "json:loads" (stdlib)', chain(noop, "json:loads")),
    ]
    if importlib.util.find_spec("orjson") is not None:
        rows.append(('decoder = "orjson:loads"', chain(noop, "orjson:loads")))
    rows += [
        ('decoder = "json" (streamer)', chain(noop, "json")),
        ("typed handler, pydantic model", chain(typed_pydantic, None)),
        ("typed handler, msgspec Struct", chain(typed_struct, None)),
    ]
    raws = raw_records(args.records)
    best: dict[str, float] = {}
    for rep in range(args.repeat):
        shift = rep % len(rows)
        for name, run in rows[shift:] + rows[:shift]:
            us = cpu_seconds(run, raws) / args.records * 1e6
            best[name] = min(us, best.get(name, us))
    base = best[rows[0][0]]
    print(f"{args.records:,} records of {len(VALUE)} bytes, best of {args.repeat} passes")
    print(f"{'chain':34} {'CPU µs/rec':>11} {'over no-op':>11}")
    for name, _ in rows:
        print(f"{name:34} {best[name]:11.2f} {best[name] - base:11.2f}")


if __name__ == "__main__":
    main()

"""The example plugin's own tests, written with streamer.testing: no Kafka, no worker."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from orders_plugin import require_customer, totals_handler

from streamer import App
from streamer.plugins import app_from_settings
from streamer.settings import load_settings
from streamer.testing import ChainRunner, message


class DictTotals:
    """Stands in for Redis' HINCRBYFLOAT."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, float]] = {}

    def hincrbyfloat(self, name: str, key: str, amount: float) -> float:
        bucket = self.hashes.setdefault(name, {})
        bucket[key] = bucket.get(key, 0.0) + amount
        return bucket[key]


def order(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.fixture
def totals() -> DictTotals:
    return DictTotals()


@pytest.fixture
def runner(totals: DictTotals, streamer_runner: Callable[..., ChainRunner]) -> ChainRunner:
    app = App()
    app.handler("orders", middlewares=[require_customer()])(totals_handler(client=totals, min_amount=1))
    settings = load_settings(
        kafka={"bootstrap_servers": "in-memory", "group_id": "g"},
        topics={"orders": {"decoder": "json"}},
    )
    return streamer_runner(app, "orders", settings)


def test_an_order_adds_its_amount_to_the_customer_total(runner: ChainRunner, totals: DictTotals) -> None:
    assert runner.run(message(order(customer="ada", amount=3))).handled
    assert runner.run(message(order(customer="ada", amount=4.5))).handled
    assert totals.hashes["orders:totals"] == {"ada": 7.5}


def test_an_order_under_the_minimum_is_dropped(runner: ChainRunner, totals: DictTotals) -> None:
    assert runner.run(message(order(customer="ada", amount=0.5))).dropped
    assert totals.hashes == {}


def test_an_order_without_customer_is_dead_lettered_with_the_reason(runner: ChainRunner) -> None:
    outcome = runner.run(message(order(amount=3), headers={"message-id": "o-1"}))
    assert outcome.dead_lettered
    assert outcome.attempts == 1
    assert outcome.dead_letter_topic == "orders.dlq"
    assert outcome.header("streamer.error.message") == "order has no customer"
    assert outcome.header("message-id") == "o-1", "the idempotency key survives for a replay"


def test_a_value_that_is_not_json_is_dead_lettered_at_once(runner: ChainRunner) -> None:
    outcome = runner.run(message(b"{not json"))
    assert outcome.dead_lettered
    assert outcome.attempts == 1
    assert "cannot decode value" in (outcome.header("streamer.error.message") or "")


def test_the_service_team_can_wire_the_plugin_from_settings_by_entry_point_name(totals: DictTotals) -> None:
    settings = load_settings(
        kafka={"bootstrap_servers": "in-memory", "group_id": "g"},
        topics={
            "orders": {
                "decoder": "json",
                "chain": [
                    "orders-require-customer",
                    {"use": "orders-totals", "options": {"min_amount": 2}},
                ],
            }
        },
    )
    app = app_from_settings(settings)
    assert app.topics == ["orders"]
    assert ChainRunner(app, "orders", settings).run(message(order(customer="bo", amount=1))).dropped

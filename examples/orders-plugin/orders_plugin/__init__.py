"""An example handler plugin for streamer.

``totals_handler`` adds each order's amount to its customer's total in a Redis hash;
``require_customer`` is a middleware that parks orders without a customer. Both are factories:
streamer calls them once at start-up with the options from the settings.
"""

from __future__ import annotations

from typing import Protocol

import redis

from streamer import DropRecord, Handler, Message, Middleware, PermanentError


class Totals(Protocol):
    """The one Redis command the handler uses (a test passes its own)."""

    def hincrbyfloat(self, name: str, key: str, amount: float) -> float:
        """Add ``amount`` to field ``key`` of hash ``name``."""
        ...


def totals_handler(
    *,
    redis_url: str = "redis://127.0.0.1:6379/0",
    totals_key: str = "orders:totals",
    min_amount: float = 0.0,
    client: Totals | None = None,
) -> Handler:
    """A handler adding ``amount`` to ``totals_key[customer]``; orders under min_amount are dropped."""
    store: Totals = client if client is not None else redis.Redis.from_url(redis_url)

    def handle(msg: Message) -> None:
        order = msg.decoded
        if not isinstance(order, dict) or not isinstance(order.get("amount"), int | float):
            raise PermanentError(f"not an order: {order!r}")
        if order["amount"] < min_amount:
            raise DropRecord(f"amount {order['amount']} under {min_amount}")
        store.hincrbyfloat(totals_key, str(order["customer"]), float(order["amount"]))

    return handle


def require_customer() -> Middleware:
    """A middleware that parks (dead-letters) orders without a ``customer`` field."""

    def middleware(next_handler: Handler) -> Handler:
        def handler(msg: Message) -> None:
            if not isinstance(msg.decoded, dict) or not msg.decoded.get("customer"):
                raise PermanentError("order has no customer")
            next_handler(msg)

        return handler

    return middleware

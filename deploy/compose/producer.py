"""The demo producer of docker-compose.yml: a steady stream of records with periodic bursts.

Runs in the streamer image (it only needs confluent-kafka) and is mounted into the container by
docker-compose.yml, so that the Grafana dashboard has something to show: throughput all the time,
lag that rises with every burst and drains again, and a few duplicates for the dedup counters.

Every record carries a ``message-id`` header (the header ``[dedup] key_header`` reads by default).
Every ``PRODUCER_DUPLICATE_EVERY``-th record re-sends the message id of a record sent shortly
before, as a retrying upstream would: the worker counts it as ``deduplicated``.

Environment:
    STREAMER_KAFKA__BOOTSTRAP_SERVERS  brokers (default kafka:9092, the compose network's listener)
    STREAMER_DEMO_TOPIC                topic (default streamer-demo)
    PRODUCER_RATE                      records per second between bursts (default 100)
    PRODUCER_BURST_RECORDS             records sent at once in a burst (default 5000; 0: no bursts)
    PRODUCER_BURST_EVERY               seconds between bursts (default 120)
    PRODUCER_DUPLICATE_EVERY           every Nth record is a duplicate (default 200; 0: none)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import uuid
from types import FrameType

from confluent_kafka import KafkaException, Producer

log = logging.getLogger("producer")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        sys.exit(f"producer: {name} must be a number, got {raw!r}")
    if value < 0:
        sys.exit(f"producer: {name} must not be negative, got {raw!r}")
    return value


class DemoProducer:
    """Sends JSON records at a steady rate, with bursts and occasional duplicate message ids."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.run_id = uuid.uuid4().hex[:8]  # message ids stay unique across producer restarts
        self.sent = 0
        self.stopping = False
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all", "client.id": "demo-producer"}
        )

    def message_id(self, seq: int, duplicate_every: int) -> str:
        """The id of record ``seq``: its own, or for every Nth record the id of one sent 10 before."""
        if duplicate_every and seq >= 10 and seq % duplicate_every == 0:
            seq -= 10
        return f"{self.run_id}-{seq}"

    def send(self, duplicate_every: int) -> None:
        """Send the next record, waiting for room in the local queue if it is full."""
        seq = self.sent
        value = json.dumps({"seq": seq, "run": self.run_id, "ts": time.time()}).encode()
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    key=str(seq % 1000).encode(),
                    value=value,
                    headers=[("message-id", self.message_id(seq, duplicate_every).encode())],
                    on_delivery=_on_delivery,
                )
                break
            except BufferError:
                self._producer.poll(0.1)
        self.sent += 1
        self._producer.poll(0)

    def close(self) -> int:
        """Deliver what is queued; return how many records could not be delivered."""
        return int(self._producer.flush(10))


def _on_delivery(err: object, _msg: object) -> None:
    if err is not None:
        log.warning("delivery failed: %s", err)


def main() -> int:
    """Produce until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s producer %(levelname)s %(message)s")
    bootstrap = os.environ.get("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    topic = os.environ.get("STREAMER_DEMO_TOPIC", "streamer-demo")
    rate = _env_number("PRODUCER_RATE", 100)
    burst_records = int(_env_number("PRODUCER_BURST_RECORDS", 5000))
    burst_every = _env_number("PRODUCER_BURST_EVERY", 120)
    duplicate_every = int(_env_number("PRODUCER_DUPLICATE_EVERY", 200))

    producer = DemoProducer(bootstrap, topic)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        producer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    log.info(
        "producing to %s on %s: %.0f records/s, a burst of %d every %.0f s, run id %s",
        topic,
        bootstrap,
        rate,
        burst_records,
        burst_every,
        producer.run_id,
    )
    started = last_report = time.monotonic()
    next_burst = started + burst_every
    steady = 0  # records of the steady stream sent so far, for the pacing
    try:
        while not producer.stopping:
            now = time.monotonic()
            if burst_records and burst_every and now >= next_burst:
                log.info("burst of %d records", burst_records)
                for _ in range(burst_records):
                    producer.send(duplicate_every)
                next_burst = now + burst_every
            if rate:
                due = int((now - started) * rate)
                while steady < due and not producer.stopping:
                    producer.send(duplicate_every)
                    steady += 1
            if now - last_report >= 30:
                log.info("%d records sent", producer.sent)
                last_report = now
            time.sleep(0.01)
    except KafkaException as exc:
        log.error("kafka error: %s", exc)
        return 1
    finally:
        undelivered = producer.close()
        log.info("stopped after %d records (%d undelivered)", producer.sent, undelivered)
    return 0


if __name__ == "__main__":
    sys.exit(main())

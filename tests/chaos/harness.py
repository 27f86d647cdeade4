"""The chaos suite's machinery: worker incarnations, a live producer, the committed-offset sampler,
the dead-letter reader and the dev services the outage scenarios stop and start.

Nothing here imports ``streamer``: the workers are ``streamer run`` processes, and the engine they
run may be another checkout than the one the tests come from (``CHAOS_ENGINE``, see README.md).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.chaos.history import Effect, Parked, Sample, parse_effects
from tests.support import wait_for
from tests.support.kafka import (
    ID_HEADER,
    REQUEST_TIMEOUT_S,
    encode_value,
    kafka_unavailable_reason,
    protocol_client,
)
from tests.support.redis import redis_unavailable_reason

REPO = Path(__file__).resolve().parents[2]
APP = "tests.chaos.apps.chaos_app:app"

#: Seconds a worker may take from its start to its first handled record (imports, joining the
#: group, waiting out a dead member's session). Generous: two cores, shared with other test runs.
START_TIMEOUT_S = 60.0
#: Seconds a worker may take to exit after SIGTERM: Kubernetes' default grace period.
STOP_TIMEOUT_S = 30.0
#: Seconds the workers may take to drain what is left once the chaos is over.
DRAIN_TIMEOUT_S = 180.0
#: How often the committed offsets are sampled.
SAMPLE_EVERY_S = 0.1
#: librdkafka's wait for one committed-offsets request of the sampler.
SAMPLE_TIMEOUT_S = 2.0
#: The test's own clients log only critical librdkafka errors: during an outage the others (one
#: "connection refused" per reconnect) are expected, and failures are counted where they matter.
QUIET = {"log_level": 2}


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds: the clock of the effects lines of every worker."""
    return time.monotonic_ns()


def free_port(pair: bool = False) -> int:
    """A TCP port nothing listens on; with ``pair``, the port after it is free too (Kafka's controller)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not pair or port >= 65535:
            return port
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


# -- workers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """How a scenario's workers run: the ``STREAMER_*`` settings and the chaos app's own."""

    bootstrap: str
    group: str
    topic: str
    every_records: int
    poll_batch_size: int
    every_seconds: float = 1.0
    client: dict[str, Any] = field(default_factory=dict)
    #: ``[kafka] group_protocol``; classic-only keys of ``client`` are left out under "consumer"
    group_protocol: str = "classic"
    sleep_us: int = 0
    #: each record sleeps 0.5-1.5 x ``sleep_us`` (drawn from its id) instead
    sleep_jitter: bool = False
    slow_while: Path | None = None
    #: ``[processing] concurrency``: records in flight per worker (1: serial dispatch)
    concurrency: int = 1
    #: ``[processing] ordering`` ("partition", "key", "none"); None: the default
    ordering: str | None = None
    #: an ``async def`` handler instead of a ``def`` one
    async_handler: bool = False
    dedup_url: str | None = None
    dedup_namespace: str = "streamer"
    lease_seconds: float | None = None
    fail_ids: frozenset[int] = frozenset()
    retry_ids: frozenset[int] = frozenset()
    config: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def environment(self, name: str, effects: Path) -> dict[str, str]:
        """The environment of the worker incarnation ``name``."""
        settings = {
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAMER_KAFKA__GROUP_ID": self.group,
            "STREAMER_KAFKA__GROUP_PROTOCOL": self.group_protocol,
            "STREAMER_KAFKA__POLL_BATCH_SIZE": str(self.poll_batch_size),
            "STREAMER_COMMIT__EVERY_RECORDS": str(self.every_records),
            "STREAMER_COMMIT__EVERY_SECONDS": str(self.every_seconds),
            "STREAMER_LOG_LEVEL": "INFO",
            "STREAMER_LOG_FORMAT": "json",
            # No HTTP endpoint: workers of one scenario would race for its port.
            "STREAMER_METRICS__ENABLED": "false",
            # Retries of CHAOS_RETRY_IDS run out in well under a second.
            "STREAMER_RETRY__INITIAL_BACKOFF": "0.05",
            "STREAMER_RETRY__MAX_BACKOFF": "0.2",
            "CHAOS_TOPIC": self.topic,
            "CHAOS_EFFECTS": str(effects),
            "CHAOS_WORKER": name,
            "CHAOS_SLEEP_US": str(self.sleep_us),
            "CHAOS_SLEEP_JITTER": "1" if self.sleep_jitter else "",
            "CHAOS_ASYNC": "1" if self.async_handler else "",
            "CHAOS_SLOW_WHILE": str(self.slow_while or ""),
            "CHAOS_FAIL_IDS": ",".join(map(str, sorted(self.fail_ids))),
            "CHAOS_RETRY_IDS": ",".join(map(str, sorted(self.retry_ids))),
            "CHAOS_PARENT_PID": str(os.getpid()),
        }
        client = protocol_client(self.client, self.group_protocol)
        if client:
            settings["STREAMER_KAFKA__CLIENT"] = json.dumps(client)
        if self.concurrency != 1:
            settings["STREAMER_PROCESSING__CONCURRENCY"] = str(self.concurrency)
        if self.ordering is not None:
            settings["STREAMER_PROCESSING__ORDERING"] = self.ordering
        if self.dedup_url is not None:
            settings["STREAMER_DEDUP__ENABLED"] = "true"
            settings["STREAMER_DEDUP__REDIS_URL"] = self.dedup_url
            settings["STREAMER_DEDUP__NAMESPACE"] = self.dedup_namespace
            if self.lease_seconds is not None:
                settings["STREAMER_DEDUP__LEASE_SECONDS"] = str(self.lease_seconds)
        return {**settings, **self.env}


def worker_environment(extra: dict[str, str]) -> dict[str, str]:
    """``os.environ`` without ``STREAMER_*`` / ``CHAOS_*``, with the engine and the repo on PYTHONPATH.

    ``CHAOS_ENGINE`` (a directory holding a ``streamer`` package) puts that engine first, so the
    suite can run against another checkout than the one the tests come from.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMER_", "CHAOS_"))}
    paths = [os.environ.get("CHAOS_ENGINE", ""), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


@dataclass
class Incarnation:
    """One run of a worker slot: one ``streamer run`` process, its effects file and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    effects: Path
    log: Path
    until_end: bool = False
    started_ns: int = field(default_factory=now_ns)

    @property
    def running(self) -> bool:
        """Whether the process has not exited (a SIGSTOPped process is running)."""
        return self.proc.poll() is None

    def handled(self) -> int:
        """Records handled so far: complete lines of the effects file."""
        try:
            return self.effects.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def read_effects(self) -> list[Effect]:
        """Every complete line of the effects file."""
        try:
            return parse_effects(self.effects.read_bytes())
        except FileNotFoundError:
            return []

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the worker's output."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        """One paragraph about the incarnation, for failure messages."""
        state = "running" if self.running else f"exited {self.proc.returncode}"
        return f"{self.name} ({state}, handled {self.handled()}); log tail:\n{self.log_tail()}"


class Cluster:
    """The worker incarnations of one scenario, and the nemesis' log of what was done to them.

    ``start("w1")`` starts incarnation ``w1.1``, the next start of that slot ``w1.2``. Every process
    still running when the cluster closes is SIGKILLed and reaped.
    """

    def __init__(self, directory: Path, settings: WorkerSettings) -> None:
        self.directory = directory
        self.settings = settings
        self.incarnations: list[Incarnation] = []
        self.current: dict[str, Incarnation] = {}
        self.kills: dict[str, int] = {}
        self.terminated: set[str] = set()
        self.events: list[tuple[int, str]] = []
        self._epoch = now_ns()

    def close(self) -> None:
        """SIGKILL every incarnation still running and reap all of them."""
        for inc in self.incarnations:
            if inc.running:
                inc.proc.kill()
            inc.proc.wait()

    def note(self, text: str) -> None:
        """Add a line to the nemesis log."""
        self.events.append((now_ns(), text))

    def start(self, slot: str, *, until_end: bool = False) -> Incarnation:
        """Start the next incarnation of ``slot``."""
        n = sum(1 for inc in self.incarnations if inc.name.startswith(f"{slot}.")) + 1
        name = f"{slot}.{n}"
        effects = self.directory / f"{name}.effects"
        log = self.directory / f"{name}.log"
        args = ["run", APP, "--no-progress", *(["--until-end"] if until_end else [])]
        if self.settings.config is not None:
            args += ["--config", str(self.settings.config)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamer", *args],
                # Not the repository: `python -m` puts the working directory first on sys.path,
                # ahead of CHAOS_ENGINE.
                cwd=self.directory,
                env=worker_environment(self.settings.environment(name, effects)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        inc = Incarnation(name, proc, effects, log, until_end)
        self.incarnations.append(inc)
        self.current[slot] = inc
        self.note(f"start {name}")
        return inc

    def kill(self, inc: Incarnation) -> None:
        """SIGKILL ``inc`` and reap it; the kill goes into the history."""
        self.kills[inc.name] = now_ns()
        inc.proc.kill()
        inc.proc.wait()
        self.note(f"SIGKILL {inc.name} (handled {inc.handled()})")

    def stop_all(
        self, incarnations: Sequence[Incarnation] | None = None, timeout: float = STOP_TIMEOUT_S
    ) -> dict[str, int | None]:
        """SIGTERM the running ``incarnations`` (default: all) at once; return their exit codes.

        One still running after ``timeout`` is SIGKILLed; its code is None.
        """
        running = [inc for inc in incarnations or self.incarnations if inc.running]
        for inc in running:
            self.note(f"SIGTERM {inc.name}")
            self.terminated.add(inc.name)
            inc.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for inc in running:
            try:
                codes[inc.name] = inc.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                self.note(f"{inc.name} exited {codes[inc.name]}")
            except subprocess.TimeoutExpired:
                codes[inc.name] = None
                inc.proc.kill()
                inc.proc.wait()
                self.note(f"{inc.name} still running {timeout:g}s after SIGTERM: SIGKILL")
        return codes

    def pause(self, inc: Incarnation) -> None:
        """SIGSTOP ``inc``: a zombie that stops heartbeating but keeps its state."""
        inc.proc.send_signal(signal.SIGSTOP)
        self.note(f"SIGSTOP {inc.name}")

    def resume(self, inc: Incarnation) -> None:
        """SIGCONT ``inc``."""
        inc.proc.send_signal(signal.SIGCONT)
        self.note(f"SIGCONT {inc.name}")

    def died(self) -> list[Incarnation]:
        """Incarnations that exited by themselves: a crash, or a worker that gave up (a bounded job
        that finished, exit 0, did not die)."""
        return [
            inc
            for inc in self.incarnations
            if not inc.running
            and inc.name not in self.kills
            and inc.name not in self.terminated
            and not (inc.until_end and inc.proc.returncode == 0)
        ]

    def effects(self) -> list[Effect]:
        """The effects of every incarnation so far."""
        return [effect for inc in self.incarnations for effect in inc.read_effects()]

    def wait_handled(self, inc: Incarnation, at_least: int, timeout: float = START_TIMEOUT_S) -> int:
        """Wait until ``inc`` handled ``at_least`` records; fail if it exits first."""

        def reached() -> int:
            handled = inc.handled()
            if handled >= at_least:
                return handled
            assert inc.running, f"exited before handling {at_least} records: {inc.describe()}"
            return 0

        return wait_for(
            reached,
            timeout,
            interval=0.02,
            message=lambda: f"waiting for {at_least} records: {self.describe()}",
        )

    def describe(self) -> str:
        """The nemesis log and every incarnation's state, for failure messages."""
        log = "\n".join(f"  {(at - self._epoch) / 1e9:7.2f}s {text}" for at, text in self.events)
        return "nemesis log:\n" + log + "\n" + "\n".join(inc.describe() for inc in self.incarnations)


# -- producing ----------------------------------------------------------------------------------------


class LiveProducer:
    """Produces records with increasing ids at a steady rate in a thread; records what was acknowledged.

    Records go round-robin to the topic's partitions, carry their id in the ``message-id`` header and
    in a JSON value (``tests.support.kafka.encode_value``), and the Kafka key ``keys(id)`` if
    given, with acks=all and idempotence, so that an acknowledged record is in the log exactly
    once. Ids produced but not acknowledged by ``stop()`` (a broker outage outlasted the flush)
    are indeterminate.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int,
        *,
        rate: float,
        start_id: int,
        keys: Callable[[int], bytes] | None = None,
    ) -> None:
        self.topic = topic
        self.partitions = partitions
        self.keys = keys
        self.rate = rate
        self.start_id = start_id
        self.produced = 0
        #: id -> (partition, offset) of every record the broker acknowledged
        self.acked: dict[int, tuple[int, int]] = {}
        self.failed: dict[int, str] = {}
        self._producer = Producer(
            {
                **QUIET,
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
            }
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-producer", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> LiveProducer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def ids(self) -> range:
        """The ids produced so far."""
        return range(self.start_id, self.start_id + self.produced)

    @property
    def indeterminate(self) -> set[int]:
        """Ids produced and not acknowledged (failed, or unconfirmed when the flush gave up)."""
        return set(self.ids) - self.acked.keys()

    def stop(self, flush_timeout: float = 60.0) -> None:
        """Stop producing and wait (up to ``flush_timeout``) for the outstanding acknowledgements."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._producer.flush(flush_timeout)
        if self.error is not None:
            raise self.error

    def _on_delivery(self, record: int, err: KafkaError | None, msg: Message) -> None:
        if (position := acknowledged_at(err, msg)) is not None:
            self.acked[record] = position
        else:
            self.failed[record] = str(err)

    def _run(self) -> None:
        try:
            started = time.monotonic()
            while not self._stop.is_set():
                due = int((time.monotonic() - started) * self.rate)
                while self.produced < due:
                    record = self.start_id + self.produced
                    try:
                        self._producer.produce(
                            self.topic,
                            key=None if self.keys is None else self.keys(record),
                            value=encode_value(record, 100),
                            partition=record % self.partitions,
                            headers=[(ID_HEADER, str(record).encode())],
                            on_delivery=functools.partial(self._on_delivery, record),
                        )
                    except BufferError:
                        break  # the local queue is full (a broker outage): try again next tick
                    self.produced += 1
                self._producer.poll(0)
                self._stop.wait(0.02)  # pacing the production rate, not waiting for a condition
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop() in the test's thread
            self.error = exc


def acknowledged_at(err: KafkaError | None, msg: Message) -> tuple[int, int] | None:
    """Where a delivery report says the record landed: (partition, offset), or None if it failed."""
    partition, offset = msg.partition(), msg.offset()
    if err is not None or partition is None or offset is None:
        return None
    return partition, offset


def produce_backlog(
    bootstrap: str,
    topic: str,
    partitions: int,
    ids: Sequence[int],
    *,
    values: dict[int, bytes] | None = None,
    keys: Callable[[int], bytes] | None = None,
) -> dict[int, tuple[int, int]]:
    """Produce ``ids`` (round-robin by id); every one must be acknowledged. Returns id -> (partition, offset).

    ``values`` replaces the JSON value of some ids (poison records keep their ``message-id``);
    ``keys`` gives each id its Kafka key (default: none).
    """
    acked: dict[int, tuple[int, int]] = {}
    errors: list[str] = []

    def on_delivery(record: int, err: KafkaError | None, msg: Message) -> None:
        # Delivery reports carry no headers: the id comes bound to the callback.
        if (position := acknowledged_at(err, msg)) is not None:
            acked[record] = position
        else:
            errors.append(f"{record}: {err}")

    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
    )
    for record in ids:
        value = (values or {}).get(record) or encode_value(record, 100)
        while True:
            try:
                producer.produce(
                    topic,
                    key=None if keys is None else keys(record),
                    value=value,
                    partition=record % partitions,
                    headers=[(ID_HEADER, str(record).encode())],
                    on_delivery=functools.partial(on_delivery, record),
                )
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: serve delivery reports, then produce again
        producer.poll(0)
    assert producer.flush(60) == 0, f"records to {topic} still undelivered after 60s"
    assert not errors, f"{len(errors)} records to {topic} failed: {errors[:5]}"
    return acked


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The high watermark of each partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "chaos-watermarks"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=REQUEST_TIMEOUT_S)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


# -- observing ----------------------------------------------------------------------------------------


class Stalled(AssertionError):
    """The group's committed offsets stopped moving before they reached the end offsets."""


class CommittedSampler:
    """Samples the group's committed offsets every ``SAMPLE_EVERY_S`` in a thread.

    A plain consumer in the group that never subscribes asks the coordinator with
    ``Consumer.committed()``: it never joins, so it never causes a rebalance. (Not
    ``AdminClient.list_consumer_group_offsets``: that call has crashed librdkafka 2.16 right after a
    broker restart.) A failed sample (the broker is down, the coordinator is moving) is counted and
    skipped, so sampling carries on across an outage.
    """

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self._consumer = Consumer(
            {
                **QUIET,
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                # Back soon after a broker restart (the default backs off to 10 s).
                "reconnect.backoff.max.ms": 500,
            }
        )
        self._partitions = [TopicPartition(topic, p) for p in range(partitions)]
        self._lock = threading.Lock()
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="committed-sampler", daemon=True)

    def __enter__(self) -> CommittedSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        self._consumer.close()

    def stop(self) -> None:
        """Stop sampling (the last sample can still be taken with ``read``)."""
        self._stop.set()
        self._thread.join()

    def read(self) -> dict[int, int] | None:
        """The committed offsets now (partitions without one left out), or None if the request failed."""
        with self._lock:
            try:
                result = self._consumer.committed(self._partitions, timeout=SAMPLE_TIMEOUT_S)
            except KafkaException:
                self.errors += 1
                return None
        if any(tp.error is not None for tp in result):
            self.errors += 1
            return None
        return {tp.partition: tp.offset for tp in result if tp.offset >= 0}

    def latest(self) -> dict[int, int] | None:
        """The last successful sample."""
        return dict(self.samples[-1].offsets) if self.samples else None

    def wait_until(self, ends: dict[int, int], timeout: float, stall_timeout: float) -> None:
        """Wait until a sample shows every partition committed up to ``ends``.

        Raises Stalled once the committed offsets stopped moving for ``stall_timeout`` (or at the
        ``timeout``): a run whose commits no longer land is not waited for any longer.
        """
        last, moved_at = self.latest(), time.monotonic()

        def done() -> bool:
            nonlocal last, moved_at
            latest = self.latest()
            if latest == ends:
                return True
            if latest != last:
                last, moved_at = latest, time.monotonic()
            elif time.monotonic() - moved_at > stall_timeout:
                raise Stalled(f"no commit for {stall_timeout:g}s: committed {latest}, end offsets {ends}")
            return False

        try:
            wait_for(done, timeout, interval=0.1)
        except Stalled:
            raise
        except AssertionError:
            raise Stalled(
                f"not committed to the end after {timeout:g}s: committed {self.latest()}, end offsets {ends}"
            ) from None

    def _run(self) -> None:
        while not self._stop.is_set():
            at = now_ns()
            offsets = self.read()
            if offsets is not None:
                self.samples.append(Sample(at, offsets))
            self._stop.wait(SAMPLE_EVERY_S)  # the sampling period, not a wait for a condition


def read_parked(bootstrap: str, topic: str, partitions: int, timeout: float = 30.0) -> list[Parked]:
    """Every record of the dead-letter topic ``topic`` up to its end offsets."""
    ends = {p: o for p, o in end_offsets(bootstrap, topic, partitions).items() if o > 0}
    if not ends:
        return []
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "chaos-dlq-reader", "enable.auto.commit": False}
    )
    parked: list[Parked] = []
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        left = dict(ends)
        deadline = time.monotonic() + timeout
        while left:
            assert time.monotonic() < deadline, f"read {len(parked)} records of {topic}; missing {left}"
            for msg in consumer.consume(500, 0.2):
                assert msg.error() is None, msg.error()
                partition, offset = msg.partition(), msg.offset()
                if partition not in left or offset is None or offset >= ends[partition]:
                    continue
                header = dict(msg.headers() or []).get(ID_HEADER)
                parked.append(Parked(int(header) if header is not None else -1, msg.value()))
                if offset + 1 >= ends[partition]:
                    del left[partition]
    finally:
        consumer.close()
    return parked


def group_members(bootstrap: str, group: str) -> int:
    """How many members the coordinator lists in ``group``."""
    client = AdminClient({"bootstrap.servers": bootstrap})  # keep a reference while futures run
    future = client.describe_consumer_groups([group], request_timeout=REQUEST_TIMEOUT_S)[group]
    return len(future.result(timeout=REQUEST_TIMEOUT_S).members)


# -- the dev services ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevServices:
    """A set of ``dev/services`` (Kafka and Redis) the outage scenarios may stop and start.

    Normally a private set, in its own directory and on its own ports (``private``), so that an
    outage never reaches other test runs on the shared services; with ``CHAOS_SHARED_SERVICES=1``
    the shared dev services themselves (``shared``).
    """

    root: Path
    kafka_port: int
    redis_port: int
    private: bool

    @classmethod
    def create_private(cls, root: Path, libs: Path) -> DevServices:
        """A private set in ``root`` (not started), reusing the Kafka jars in ``libs``."""
        root.mkdir(parents=True)
        if libs.is_dir():
            (root / "kafka-libs").symlink_to(libs.resolve())
        services = cls(root, free_port(pair=True), free_port(), private=True)
        (root / "services.json").write_text(
            json.dumps({"kafka_port": services.kafka_port, "redis_port": services.redis_port})
        )
        return services

    @classmethod
    def load_private(cls, root: Path) -> DevServices:
        """The private set an earlier run left in ``root``."""
        ports = json.loads((root / "services.json").read_text())
        return cls(root, int(ports["kafka_port"]), int(ports["redis_port"]), private=True)

    @classmethod
    def shared(cls) -> DevServices:
        """The shared dev services (ports and directory from the same variables as ``dev/services``)."""
        root = Path(os.environ.get("STREAMER_DEV_DIR") or REPO / ".dev")
        kafka = int(os.environ.get("STREAMER_DEV_KAFKA_PORT") or 9092)
        redis = int(os.environ.get("STREAMER_DEV_REDIS_PORT") or 6379)
        return cls(root, kafka, redis, private=False)

    @property
    def bootstrap(self) -> str:
        """Kafka's bootstrap servers."""
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        """Database 0 of the Redis."""
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def kafka_answers(self) -> bool:
        """Whether the broker answers a metadata request."""
        return kafka_unavailable_reason(self.bootstrap, timeout=2.0) is None

    def redis_answers(self) -> bool:
        """Whether Redis answers PING."""
        return redis_unavailable_reason(self.redis_url, timeout=1.0) is None

    def up(self, subset: str) -> None:
        """``dev/services up`` for ``subset`` ("kafka", "redis", "kafka,redis"); returns once they answer."""
        self._run("up", subset)

    def down(self, subset: str) -> None:
        """``dev/services down`` for ``subset``: stops those services and nothing else."""
        self._run("down", subset)

    def _run(self, command: str, subset: str) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STREAMER_DEV_")},
            "STREAMER_DEV_DIR": str(self.root),
            "STREAMER_DEV_KAFKA_PORT": str(self.kafka_port),
            "STREAMER_DEV_REDIS_PORT": str(self.redis_port),
            "STREAMER_DEV_SERVICES": subset,
        }
        result = subprocess.run(
            [sys.executable, str(REPO / "dev" / "services"), command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, (
            f"dev/services {command} ({subset}, {self.root}) exited {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def stale_private_services(parent: Path) -> Iterator[Path]:
    """Directories of private services whose test run (the pid their name starts with) is gone."""
    if not parent.is_dir():
        return
    for root in sorted(parent.iterdir()):
        pid = root.name.split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            yield root
        except PermissionError:
            continue


def delete_keys(url: str, pattern: str) -> None:
    """Delete the keys matching ``pattern`` in the Redis at ``url``."""
    client: redis.Redis = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    finally:
        client.close()

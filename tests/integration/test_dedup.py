"""Dedup against the real Redis and Kafka: the store's scripts, crashes, replays, rebalances, outages.

Workers run ``tests.integration.apps.dedup_app:app`` as real processes (so they can be SIGKILLed
or SIGTERMed). Their side effect is ``INCR effect:<prefix>:<id>`` in the shared dev Redis, so a
test reads how many times each record's chain ran, even across a dedup-Redis outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from streamer.dedup import (
    ClaimStatus,
    DedupKey,
    DedupUnavailableError,
    KeyBuilder,
    RedisDedupStore,
    shard_bits_for,
)
from streamer.exitcodes import EXIT_USAGE
from streamer.highwater import HighWaterStore
from streamer.message import Message
from tests.support.kafka import (
    admin,
    committed_offsets,
    delete_topics,
    end_offsets,
    produce_records,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
APP = "tests.integration.apps.dedup_app:app"
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 60.0
#: A short session timeout, so a killed worker's partitions move on quickly; frequent heartbeats,
#: so the members of a cooperative rebalance learn of its second round quickly.
CLIENT: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def prefix(unique_name: str) -> str:
    """Prefix of every Redis key a test writes: counters and the dedup namespace."""
    return unique_name


@pytest.fixture
def effects_redis(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    """A client of the shared dev Redis; every key containing ``prefix`` is deleted at teardown."""
    client: redis.Redis = redis.Redis.from_url(redis_url)
    yield client
    batch = list(client.scan_iter(match=f"*{prefix}*", count=1000))
    for i in range(0, len(batch), 1000):
        client.delete(*batch[i : i + 1000])
    client.close()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerProc:
    """One ``streamer run`` process of the dedup app."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_events(self) -> list[dict[str, Any]]:
        """The worker's JSON log lines (others, e.g. a traceback, are skipped)."""
        events = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def logged(self, text: str) -> int:
        """How many log events say ``text``."""
        return sum(1 for e in self.log_events() if e.get("event") == text)

    def stopped_event(self) -> dict[str, Any]:
        """The "worker stopped" log event, with the run's counters."""
        stopped = [e for e in self.log_events() if e.get("event") == "worker stopped"]
        assert stopped, f"no 'worker stopped' log line: {self.describe()}"
        return stopped[-1]

    def describe(self) -> str:
        state = "running" if self.running else f"exited {self.proc.returncode}"
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return f"worker {self.name} ({state}); log tail:\n{tail}"

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:g}s: {self.describe()}") from None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.running:
            self.proc.send_signal(sig)


class Workers:
    """Starts dedup-app workers for one test; kills the ones still running at teardown."""

    def __init__(
        self, directory: Path, bootstrap: str, group: str, topic: str, effects_url: str, prefix: str
    ) -> None:
        self.directory = directory
        self.bootstrap = bootstrap
        self.group = group
        self.topic = topic
        self.effects_url = effects_url
        self.prefix = prefix
        self.started: list[WorkerProc] = []

    def start(
        self,
        name: str,
        *,
        dedup_url: str,
        until_end: bool = False,
        batch: int = 500,
        every_records: int = 1000,
        work_us: int = 0,
        guard: bool = False,
        client: dict[str, Any] | None = None,
        dedup: dict[str, str] | None = None,
        effect: str = "",
    ) -> WorkerProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMER_", "DEDUP_APP_"))}
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(
            {
                "STREAMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
                "STREAMER_KAFKA__GROUP_ID": self.group,
                "STREAMER_KAFKA__POLL_BATCH_SIZE": str(batch),
                "STREAMER_KAFKA__CLIENT": json.dumps({**CLIENT, **(client or {})}),
                "STREAMER_COMMIT__EVERY_RECORDS": str(every_records),
                "STREAMER_COMMIT__EVERY_SECONDS": "0",
                "STREAMER_DEDUP__ENABLED": "true",
                "STREAMER_DEDUP__REDIS_URL": dedup_url,
                "STREAMER_DEDUP__NAMESPACE": self.prefix,
                "STREAMER_DEDUP__WINDOW_SECONDS": "600",
                "STREAMER_LOG_FORMAT": "json",
                "STREAMER_LOG_LEVEL": "INFO",
                "DEDUP_APP_TOPIC": self.topic,
                "DEDUP_APP_REDIS_URL": self.effects_url,
                "DEDUP_APP_PREFIX": self.prefix,
                "DEDUP_APP_WORK_US": str(work_us),
                "DEDUP_APP_GUARD": "1" if guard else "0",
                "DEDUP_APP_WORKER": name,
                "DEDUP_APP_EFFECT": effect,
            }
        )
        env.update({f"STREAMER_DEDUP__{k.upper()}": v for k, v in (dedup or {}).items()})
        log = self.directory / f"{name}.log"
        args = ["run", APP, "--no-progress", *(["--until-end"] if until_end else [])]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamer", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        worker = WorkerProc(name, proc, log)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            if worker.running:
                worker.proc.kill()
            worker.proc.wait()


@pytest.fixture
def workers(
    tmp_path: Path,
    kafka_bootstrap: str,
    group_id: str,
    topic_factory: Callable[..., str],
    redis_url: str,
    prefix: str,
) -> Iterator[Callable[[str], Workers]]:
    """``workers(topic)``: a Workers for that topic; every process is killed at teardown."""
    pools: list[Workers] = []

    def make(topic: str) -> Workers:
        pool = Workers(tmp_path, kafka_bootstrap, group_id, topic, redis_url, prefix)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.kill_all()
    # Workers create their topics' dead-letter topics (``<topic>.dlq``): delete them too.
    names = admin(kafka_bootstrap).list_topics(timeout=10).topics
    derived = [t for pool in pools for t in names if t.startswith(pool.topic) and t != pool.topic]
    for failure in delete_topics(kafka_bootstrap, derived):
        print(f"could not delete {failure}", file=sys.stderr)


class RedisServer:
    """A throwaway ``redis-server`` without persistence, on its own port; stopped at teardown."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"redis-server on {self.port} exited {self.proc.returncode}"
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_for(answers, 10, message=f"redis-server on port {self.port} does not answer PING")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A separate redis-server (started) that a test may stop and restart."""
    if subprocess.run(["redis-server", "--version"], capture_output=True, check=False).returncode != 0:
        pytest.fail("redis-server is not installed (dev/bootstrap installs it)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def effect_counts(client: redis.Redis, prefix: str, ids: range) -> dict[int, int]:
    """How many times the chain ran for each id (0 for never)."""
    counts: dict[int, int] = {}
    chunk = 2000
    for start in range(ids.start, ids.stop, chunk):
        part = range(start, min(start + chunk, ids.stop))
        values = client.mget([f"effect:{prefix}:{i}" for i in part])
        counts.update({i: int(v) if v is not None else 0 for i, v in zip(part, values, strict=True)})
    return counts


def handled(client: redis.Redis, prefix: str, *names: str) -> int:
    """Records the named workers handled (chain ran) so far."""
    values = client.mget([f"handled:{prefix}:{name}" for name in names])
    return sum(int(v) for v in values if v is not None)


def wait_handled(
    client: redis.Redis,
    prefix: str,
    worker: WorkerProc,
    at_least: int,
    timeout: float = START_TIMEOUT_S,
) -> int:
    """Wait until ``worker`` handled ``at_least`` records; fail early if it exits."""

    def reached() -> int:
        count = handled(client, prefix, worker.name)
        if count >= at_least:
            return count
        assert worker.running, f"exited before handling {at_least} records: {worker.describe()}"
        return 0

    return wait_for(reached, timeout, interval=0.02, message=worker.describe)


def marked_done(url: str, prefix: str, group: str, topic: str, records: int) -> int:
    """How many of the record ids produced by ``produce_records`` are marked done in ``url``."""
    store = RedisDedupStore.from_url(
        url, namespace=prefix, group=group, shard_bits=shard_bits_for(1_000_000), window_ms=600_000
    )
    builder = KeyBuilder(prefix, group, "message-id", None)
    keys = [
        builder.key(Message(topic, 0, i, None, b"", (("message-id", str(i).encode()),)))
        for i in range(records)
    ]
    return sum(status is ClaimStatus.DONE for status in store.claim(keys, "c:probe", 1))


# --- 1. the store's scripts against a real Redis ------------------------------------------------------


def _keys(prefix: str, *ids: str | int, topic: str = "t", partition: int = 0) -> list[DedupKey]:
    """Dedup keys of records at offsets 0.. of ``topic``/``partition``; an int id means "no id"."""
    builder = KeyBuilder(prefix, "g", "message-id", None)
    return [
        builder.key(
            Message(
                topic,
                partition,
                i,
                None,
                b"",
                (("message-id", str(x).encode()),) if isinstance(x, str) else (),
            )
        )
        for i, x in enumerate(ids)
    ]


def test_redis_store_claims_leases_marks_and_expiry(
    effects_redis: redis.Redis, redis_url: str, prefix: str
) -> None:
    store = RedisDedupStore.from_url(redis_url, namespace=prefix, group="g", shard_bits=3, window_ms=600_000)
    a, b, c = _keys(prefix, "a", "b", 2)  # two id-keyed records and one keyed by its position
    a_elsewhere = _keys(prefix, 7, "a", partition=1)[1]  # the same id in another partition
    lease = store.layout.lease(("t", 0))

    # An id is claimed in its bucket's hash until done; a position by its partition's lease.
    assert store.claim([a, b, c], "c:a", 10_000) == [ClaimStatus.CLAIMED] * 3
    assert a.claimed is not None
    claim = effects_redis.hget(a.claimed, (a.digest or b"")[4:14]) or b""
    assert claim.startswith(b"c:a:")
    assert effects_redis.get(lease) == b"c:a"
    assert 0 < effects_redis.pttl(lease) <= 10_000
    # The holder claiming again renews; another token finds both contested — the id also in
    # another partition, so that a chain for it never runs on two workers at once.
    assert store.claim([a, c], "c:a", 20_000) == [ClaimStatus.CLAIMED] * 2
    assert 10_000 < effects_redis.pttl(lease) <= 20_000
    assert store.claim([a_elsewhere, c], "c:b", 10_000) == [ClaimStatus.CONTESTED] * 2

    # Marks are pipelined: sent without a reply, landed once waited for; done is done for all.
    store.send_marks([a, c])
    store.wait_marks()
    assert effects_redis.hget(a.claimed, (a.digest or b"")[4:14]) == b""
    assert store.claim([a, b, c], "c:b", 10_000) == [
        ClaimStatus.DONE,
        ClaimStatus.CONTESTED,
        ClaimStatus.DONE,
    ]
    assert store.claim([a_elsewhere], "c:b", 10_000) == [ClaimStatus.DONE]

    # Where the marks live: an id as a 10-byte field of a bucket's hash shard (the whole bucket
    # expires, one window after it ends), a position as one bit of its partition's bitmap.
    shard = store.layout.shard(int(time.time() * 1000) // 600_000, a.digest or b"")
    assert (a.digest or b"")[4:14] in effects_redis.hkeys(shard)
    assert 600_000 < effects_redis.pttl(shard) <= 1_200_000
    bitmap = store.layout.chunk("t", 0, 2)
    assert effects_redis.getbit(bitmap, 2) == 1
    assert effects_redis.bitcount(bitmap) == 1
    assert effects_redis.pttl(bitmap) > 600_000

    # Releases by a non-holder do nothing; the holder's free the id and the partition at once.
    store.release([b], "c:b")
    store.hand_over([("t", 0)], "c:b")
    assert store.claim([b, c], "c:b", 10_000) == [ClaimStatus.CONTESTED, ClaimStatus.DONE]
    store.release([b], "c:a")
    store.hand_over([("t", 0)], "c:a")
    assert effects_redis.exists(lease) == 0
    assert store.claim([b, _keys(prefix, 0, 0, 0, 9)[3]], "c:b", 200) == [ClaimStatus.CLAIMED] * 2

    # Claims that run out let another token in; renewals keep them.
    assert store.claim([b], "c:a", 10_000) == [ClaimStatus.CONTESTED]
    wait_for(lambda: effects_redis.exists(lease) == 0, 5, message="the 200 ms lease did not expire")
    assert store.claim([b, _keys(prefix, 0, 0, 0, 9)[3]], "c:a", 10_000) == [ClaimStatus.CLAIMED] * 2
    store.renew([b, c], "c:a", 30_000)
    assert 20_000 < effects_redis.pttl(lease) <= 30_000
    assert store.claim([b], "c:b", 10_000) == [ClaimStatus.CONTESTED]

    assert store.claim([], "c:a", 10_000) == []
    store.send_marks([])
    store.wait_marks()


def test_partition_local_ids_use_the_partition_lease_instead_of_a_claim_each(
    effects_redis: redis.Redis, redis_url: str, prefix: str
) -> None:
    plain = RedisDedupStore.from_url(redis_url, namespace=prefix, group="g", shard_bits=3)
    local = RedisDedupStore(plain.client, plain.layout, partition_local_ids=True)
    a, b = _keys(prefix, "a", "b")
    assert local.claim([a, b], "c:a", 10_000) == [ClaimStatus.CLAIMED] * 2
    assert a.claimed is None
    assert effects_redis.keys(f"{prefix}:2:*h:*") == []  # no write per record
    assert effects_redis.get(local.layout.lease(("t", 0))) == b"c:a"
    assert local.claim([b], "c:b", 10_000) == [ClaimStatus.CONTESTED]
    local.send_marks([a])
    local.wait_marks()
    assert local.claim([a, b], "c:b", 10_000) == [ClaimStatus.DONE, ClaimStatus.CONTESTED]


def test_redis_store_reads_marks_of_the_previous_format_when_asked(
    effects_redis: redis.Redis, redis_url: str, prefix: str
) -> None:
    old_id, old_position, new = _keys(prefix, "x" * 40, 1, "fresh")
    effects_redis.set(f"{prefix}:{{g}}:".encode() + hashlib.blake2b(b"x" * 40, digest_size=16).digest(), b"1")
    effects_redis.set(f"{prefix}:{{g}}:t/0/1", b"1")
    plain = RedisDedupStore.from_url(redis_url, namespace=prefix, group="g", shard_bits=3)
    assert plain.claim([old_id, old_position, new], "c:a", 10_000) == [ClaimStatus.CLAIMED] * 3
    legacy = RedisDedupStore(plain.client, plain.layout, legacy=True)
    assert legacy.claim([old_id, old_position, new], "c:a", 10_000) == [
        ClaimStatus.DONE,
        ClaimStatus.DONE,
        ClaimStatus.CLAIMED,
    ]


def test_redis_store_unreachable_raises_and_resends_its_marks_when_back(
    effects_redis: redis.Redis, redis_url: str, prefix: str
) -> None:
    down = RedisDedupStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    (k,) = _keys(prefix, "k")
    with pytest.raises(DedupUnavailableError):
        down.ping()
    with pytest.raises(DedupUnavailableError):
        down.claim([k], "c:a", 1000)
    down.send_marks([k])  # never raises: the mark stays pending
    with pytest.raises(DedupUnavailableError):
        down.wait_marks()
    with pytest.raises(DedupUnavailableError):
        down.hand_over([("t", 0)], "c:a")

    # A connection that breaks after marks were sent: wait_marks sends them all again.
    store = RedisDedupStore.from_url(redis_url, namespace=prefix, group="g", shard_bits=3)
    first, second = _keys(prefix, "one", "two")
    store.send_marks([first])
    effects_redis.client_kill_filter(_type="normal", skipme=True)
    store.send_marks([second])
    with contextlib.suppress(DedupUnavailableError):
        store.wait_marks()  # the broken connection is found here (or at the send)
    store.wait_marks()
    assert store.claim([first, second], "c:b", 1000) == [ClaimStatus.DONE, ClaimStatus.DONE]


# --- 2. SIGKILL mid-run: the duplicate window is the batch in flight ----------------------------------


@pytest.mark.parametrize(
    ("mark_mode", "records", "batch", "window"),
    [
        pytest.param("batch", 10_000, 500, 500, id="batch"),  # at most the poll batch in flight
        # Sent every 8 records without waiting: at most the 7 unsent and the record in hand.
        pytest.param("pipelined", 10_000, 500, 8, id="pipelined"),
        # The effect and its mark in one MULTI/EXEC (streamer.dedup.redis_effect): none.
        pytest.param("transaction", 10_000, 500, 0, id="redis_effect"),
        pytest.param("per_record", 6_000, 500, 1, id="per_record"),  # at most the record in hand
    ],
)
def test_sigkill_then_restart_loses_nothing_and_duplicates_at_most_the_window(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    group_id: str,
    effects_redis: redis.Redis,
    redis_url: str,
    prefix: str,
    mark_mode: str,
    records: int,
    batch: int,
    window: int,
) -> None:
    topic = topic_factory(3)
    produce_records(kafka_bootstrap, topic, records)
    pool = workers(topic)
    # Static membership: the restart takes over the killed member (and its claims) at once.
    static = {"group.instance.id": f"{prefix}-static"}
    options: dict[str, Any] = {
        "dedup_url": redis_url,
        "batch": batch,
        # Not a multiple of the batch: some re-read records were marked done, some were not.
        "every_records": 1300,
        "client": static,
        "dedup": {"mark_mode": "pipelined" if mark_mode == "transaction" else mark_mode},
        "effect": "transaction" if mark_mode == "transaction" else "",
    }
    first = pool.start("first", until_end=True, work_us=300, **options)
    kill_at = records * 2 // 5 + batch // 2  # mid-batch: poll batches are `batch` records
    wait_handled(effects_redis, prefix, first, kill_at)
    first.stop(signal.SIGKILL)
    first.wait(10)
    before = effect_counts(effects_redis, prefix, range(records))
    first_ran = sum(1 for n in before.values() if n)
    committed_at_kill = sum(committed_offsets(kafka_bootstrap, group_id, topic).values())

    second = pool.start("second", until_end=True, **options)
    assert second.wait() == 0, second.describe()

    counts = effect_counts(effects_redis, prefix, range(records))
    lost = sorted(i for i, n in counts.items() if n == 0)
    assert not lost, f"{len(lost)} ids never handled, e.g. {lost[:10]}"
    dups = {i: n for i, n in counts.items() if n > 1}
    stopped = second.stopped_event()
    print(
        f"\n[{mark_mode}] killed after {first_ran} handled (committed {committed_at_kill}); "
        f"restart: processed {stopped['processed']}, dedup hits {stopped['dedup_hits']}; "
        f"ids run twice: {len(dups)} (window {window})"
    )
    assert max(dups.values(), default=1) <= 2, f"ids run more than twice: {dups}"
    assert len(dups) <= window, f"{len(dups)} ids ran twice, more than the {window} in flight"
    assert end_offsets(kafka_bootstrap, topic) == committed_offsets(kafka_bootstrap, group_id, topic)
    # Re-read records that were marked before the kill are skipped, not re-run.
    assert stopped["processed"] + stopped["dedup_hits"] == records - committed_at_kill
    assert stopped["processed"] == records - first_ran + len(dups)


# --- 3. the same id twice in the topic: one effect --------------------------------------------------


def test_a_record_produced_twice_runs_once(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    effects_redis: redis.Redis,
    redis_url: str,
    prefix: str,
) -> None:
    records = 2000
    topic = topic_factory(3)
    produce_records(kafka_bootstrap, topic, records)
    # The copies go to other partitions than the originals: dedup is by key, not by position.
    produce_records(kafka_bootstrap, topic, records, partitions=[1, 2, 0])
    worker = workers(topic).start("only", until_end=True, dedup_url=redis_url, batch=200)
    assert worker.wait() == 0, worker.describe()

    counts = effect_counts(effects_redis, prefix, range(records))
    assert set(counts.values()) == {1}, {i: n for i, n in counts.items() if n != 1}
    stopped = worker.stopped_event()
    assert stopped["processed"] == records
    assert stopped["dedup_hits"] == records


# --- 4. two workers and rebalances under load: never twice at once, never twice -------------------------


def test_rebalances_under_load_never_run_a_record_twice(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    group_id: str,
    effects_redis: redis.Redis,
    redis_url: str,
    prefix: str,
) -> None:
    records = 7200
    topic = topic_factory(6)
    produce_records(kafka_bootstrap, topic, records)
    pool = workers(topic)
    options: dict[str, Any] = {
        "dedup_url": redis_url,
        "batch": 100,
        "every_records": 200,
        "work_us": 500,
        "guard": True,
        "dedup": {"lease_seconds": "5"},
    }
    a = pool.start("a", **options)
    wait_handled(effects_redis, prefix, a, 600)
    b = pool.start("b", **options)
    wait_handled(effects_redis, prefix, b, 200)
    a.stop(signal.SIGTERM)
    assert a.wait(30) == 0, a.describe()
    a2 = pool.start("a2", **options)

    def all_handled() -> bool:
        counts = effect_counts(effects_redis, prefix, range(records))
        return all(n >= 1 for n in counts.values())

    def progress() -> str:
        counts = effect_counts(effects_redis, prefix, range(records))
        return f"{sum(1 for n in counts.values() if n)} of {records} ids handled; {b.describe()}"

    wait_for(all_handled, RUN_TIMEOUT_S, interval=0.2, message=progress)
    for worker in (b, a2):
        worker.stop(signal.SIGTERM)
    for worker in (b, a2):
        assert worker.wait(30) == 0, worker.describe()
    # Every record finished, and each stop committed what its worker finished.
    assert end_offsets(kafka_bootstrap, topic) == committed_offsets(kafka_bootstrap, group_id, topic)

    counts = effect_counts(effects_redis, prefix, range(records))
    per_worker = {w: handled(effects_redis, prefix, w) for w in ("a", "b", "a2")}
    hits = sum(w.stopped_event()["dedup_hits"] for w in (a, b, a2))
    print(f"\n[rebalance] handled per worker {per_worker}; dedup hits {hits}")
    assert int(effects_redis.get(f"violations:{prefix}") or 0) == 0, "a chain ran in two workers at once"
    dups = {i: n for i, n in counts.items() if n > 1}
    assert not dups, f"{len(dups)} ids ran more than once, e.g. {sorted(dups.items())[:10]}"
    assert sum(per_worker.values()) == records
    # The handovers happened under load: each worker had records to run.
    assert all(per_worker.values()), per_worker


# --- 5. the dedup Redis goes away: fail closed, then resume ---------------------------------------------


def test_dedup_outage_fails_closed_and_resumes(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    group_id: str,
    effects_redis: redis.Redis,
    own_redis: RedisServer,
    prefix: str,
) -> None:
    records = 3000
    outage_s = 10.0
    topic = topic_factory(3)
    produce_records(kafka_bootstrap, topic, records)
    # Dedup on the throwaway Redis; the side-effect counters stay on the shared one.
    worker = workers(topic).start(
        "only",
        until_end=True,
        dedup_url=own_redis.url,
        batch=100,
        every_records=100,
        work_us=1000,
        dedup={"timeout": "0.5"},
    )
    wait_handled(effects_redis, prefix, worker, 1000)
    own_redis.stop()
    wait_for(
        lambda: worker.logged("dedup store unavailable; pausing partitions, committing nothing"),
        10,
        message=lambda: f"the worker did not notice the outage: {worker.describe()}",
    )
    committed = committed_offsets(kafka_bootstrap, group_id, topic)
    done = handled(effects_redis, prefix, "only")
    samples = 0

    def outage_holds() -> bool:
        nonlocal samples
        samples += 1
        assert worker.running, f"the worker died during the outage: {worker.describe()}"
        now = committed_offsets(kafka_bootstrap, group_id, topic)
        assert now == committed, f"committed {now} during the outage (before: {committed})"
        assert handled(effects_redis, prefix, "only") == done, "a chain ran without a claim"
        return False

    outage_ends = time.monotonic() + outage_s
    wait_for(lambda: outage_holds() or time.monotonic() >= outage_ends, outage_s + 5, interval=0.5)
    own_redis.start()  # same port, empty: no persistence
    assert worker.wait() == 0, worker.describe()

    counts = effect_counts(effects_redis, prefix, range(records))
    assert min(counts.values()) >= 1, "records lost"
    dups = {i: n for i, n in counts.items() if n > 1}
    done_marks = marked_done(own_redis.url, prefix, group_id, topic, records)
    print(
        f"\n[outage] {done} handled before the outage, {samples} samples over {outage_s:g}s, "
        f"committed before {sum(committed.values())}, ids run twice: {len(dups)}, "
        f"'still unavailable' logs {worker.logged('dedup store still unavailable')}, "
        f"done marks in the restarted Redis: {done_marks} of {records}"
    )
    assert not dups, f"{len(dups)} ids ran more than once: {sorted(dups.items())[:10]}"
    assert end_offsets(kafka_bootstrap, topic) == committed_offsets(kafka_bootstrap, group_id, topic)


# --- 6. on_unavailable = "proceed": no dedup, no stop ---------------------------------------------------


def test_proceed_mode_processes_everything_without_redis(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    group_id: str,
    effects_redis: redis.Redis,
    prefix: str,
) -> None:
    records = 1000
    topic = topic_factory(3)
    produce_records(kafka_bootstrap, topic, records)
    worker = workers(topic).start(
        "only",
        until_end=True,
        dedup_url=f"redis://127.0.0.1:{free_port()}/0",
        batch=200,
        dedup={"on_unavailable": "proceed", "timeout": "0.5"},
    )
    assert worker.wait() == 0, worker.describe()
    counts = effect_counts(effects_redis, prefix, range(records))
    assert set(counts.values()) == {1}
    assert worker.logged("dedup store unavailable; proceeding without dedup") > 0
    assert worker.stopped_event()["processed"] == records
    assert end_offsets(kafka_bootstrap, topic) == committed_offsets(kafka_bootstrap, group_id, topic)


# --- 7. a record claimed by another worker waits for it ----------------------------------------------


def test_contested_records_wait_for_the_other_claim_then_run_once(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    group_id: str,
    effects_redis: redis.Redis,
    redis_url: str,
    prefix: str,
) -> None:
    records = 3000
    topic = topic_factory(3)
    produce_records(kafka_bootstrap, topic, records)
    # Another worker holds claims on three records (long leases); a third one already finished two.
    other = RedisDedupStore.from_url(
        redis_url, namespace=prefix, group=group_id, shard_bits=shard_bits_for(1_000_000), window_ms=600_000
    )
    builder = KeyBuilder(prefix, group_id, "message-id", None)

    def key(record: int) -> DedupKey:
        return builder.key(Message(topic, 0, record, None, b"", (("message-id", str(record).encode()),)))

    claimed, finished = [key(r) for r in (10, 11, 1500)], [key(r) for r in (20, 21)]
    assert other.claim([*claimed, *finished], "c:other-worker", 60_000) == [ClaimStatus.CLAIMED] * 5
    other.send_marks(finished)
    other.wait_marks()

    worker = workers(topic).start("only", until_end=True, dedup_url=redis_url, batch=100)
    waiting = "record claimed by another worker; waiting for it"
    wait_for(lambda: worker.logged(waiting), START_TIMEOUT_S, message=worker.describe)
    stalled_at = handled(effects_redis, prefix, "only")
    assert stalled_at < records
    # The other worker finishes record 10; its claims on the other two run out.
    other.send_marks(claimed[:1])
    other.wait_marks()
    other.renew(claimed[1:], "c:other-worker", 300)
    assert worker.wait(30) == 0, worker.describe()

    counts = effect_counts(effects_redis, prefix, range(records))
    skipped = (10, 20, 21)
    assert all(counts[r] == 0 for r in skipped), {r: counts[r] for r in skipped}
    others = {i: n for i, n in counts.items() if i not in skipped and n != 1}
    assert not others, f"ids not run exactly once: {others}"
    stopped = worker.stopped_event()
    print(f"\n[contested] stalled at {stalled_at} handled; waits logged {worker.logged(waiting)}")
    assert stopped["dedup_hits"] == len(skipped)
    assert end_offsets(kafka_bootstrap, topic) == committed_offsets(kafka_bootstrap, group_id, topic)


def test_a_mark_written_after_a_bucket_boundary_wins_over_the_claim_left_before_it(
    effects_redis: redis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claimed in bucket N, marked in bucket N+1: the claim left in N must not make it contested."""
    store = RedisDedupStore.from_url(redis_url, namespace=prefix, group="g", shard_bits=3, window_ms=600_000)
    (x,) = _keys(prefix, "x")
    (x_elsewhere,) = _keys(prefix, "x", partition=1)
    assert store.claim([x], "c:a", 60_000) == [ClaimStatus.CLAIMED]
    later = time.time() + 600
    monkeypatch.setattr("streamer.dedup.time.time", lambda: later)
    store.send_marks([x])
    store.wait_marks()
    assert (effects_redis.hget(x.claimed or b"", (x.digest or b"")[4:14]) or b"").startswith(b"c:a:")
    assert store.claim([x_elsewhere], "c:b", 60_000) == [ClaimStatus.DONE]


# --- Redis that would lose marks: refused at start, restarts that lost them counted -----------------


def test_a_redis_that_may_evict_marks_is_refused_at_start_unless_told_to_warn(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    own_redis: RedisServer,
) -> None:
    topic = topic_factory(1)
    produce_records(kafka_bootstrap, topic, 50)
    client = redis.Redis.from_url(own_redis.url)
    client.config_set("maxmemory", "256mb")
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.close()
    pool = workers(topic)
    refused = pool.start("refused", until_end=True, dedup_url=own_redis.url)
    assert refused.wait(START_TIMEOUT_S) == EXIT_USAGE, refused.describe()
    assert "Traceback" not in refused.log.read_text(), refused.describe()
    assert "maxmemory-policy allkeys-lru" in refused.log.read_text(), refused.describe()
    warned = pool.start("warned", until_end=True, dedup_url=own_redis.url, dedup={"redis_checks": "warn"})
    assert warned.wait() == 0, warned.describe()
    assert warned.logged("dedup Redis may evict marks") == 1, warned.describe()
    assert warned.logged("dedup Redis has no persistence") == 1, warned.describe()


def test_a_redis_restart_that_lost_the_marks_is_found_and_counted(
    workers: Callable[[str], Workers],
    topic_factory: Callable[..., str],
    kafka_bootstrap: str,
    effects_redis: redis.Redis,
    prefix: str,
    own_redis: RedisServer,
) -> None:
    topic = topic_factory(1)
    produce_records(kafka_bootstrap, topic, 200)
    worker = workers(topic).start("only", dedup_url=own_redis.url, dedup={"lease_seconds": "1.5"})
    wait_for(lambda: handled(effects_redis, prefix, "only") == 200, START_TIMEOUT_S, message=worker.describe)
    own_redis.stop()
    own_redis.start()  # empty: no persistence
    lost = "dedup Redis restarted without its data"
    wait_for(lambda: worker.logged(lost), START_TIMEOUT_S, message=worker.describe)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(START_TIMEOUT_S) == 0, worker.describe()
    assert worker.stopped_event()["dedup_store_resets"] == 1


def test_high_water_saves_are_pipelined_and_only_ever_raise_the_marks(
    effects_redis: redis.Redis, redis_url: str, prefix: str
) -> None:
    marks = HighWaterStore(redis.Redis.from_url(redis_url), prefix, "g", 600)
    for offsets in ({("t", 0): 5, ("t", 1): 9}, {("t", 0): 7, ("t", 1): 3}, {("t", 0): 6}):
        marks.save(offsets)  # sent without waiting for the reply
    marks.close()  # reads every reply owed
    assert marks.errors == 0
    assert marks.load([("t", 0), ("t", 1), ("t", 2)]) == {("t", 0): 7, ("t", 1): 9}
    # A save Redis refuses is counted and logged when its reply is read, never raised; the
    # saves after it still land.
    effects_redis.hset(f"{prefix}:hwm:{{g}}:t:3", "not", "a string")
    marks.save({("t", 3): 1})
    wait_for(lambda: marks._conn.can_read(timeout=0), 5, message="no reply to the refused save")
    marks.save({("t", 0): 8})
    marks.close()
    assert marks.errors == 1
    assert marks.load([("t", 0)]) == {("t", 0): 8}


def test_a_claim_sent_ahead_answers_as_a_claim_and_heals_after_a_lost_connection(
    effects_redis: redis.Redis, redis_url: str, prefix: str
) -> None:
    store = RedisDedupStore.from_url(redis_url, namespace=prefix, group="g", shard_bits=3)
    a, b, c = _keys(prefix, "a", "b", 2)
    (b_elsewhere,) = _keys(prefix, "b", partition=1)
    assert store.claim([b_elsewhere], "c:other", 10_000) == [ClaimStatus.CLAIMED]
    answer = store.claim_send([a, b, c], "c:a", 10_000)  # sent: the claims land without a read
    wait_for(lambda: effects_redis.get(store.layout.lease(("t", 0))) == b"c:a", 5, message="not sent")
    assert answer() == [ClaimStatus.CLAIMED, ClaimStatus.CONTESTED, ClaimStatus.CLAIMED]
    store.send_marks([a])
    store.wait_marks()
    second = store.claim_send([a, c], "c:a", 10_000)  # the same connection: no script load again
    assert second() == [ClaimStatus.DONE, ClaimStatus.CLAIMED]
    effects_redis.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(DedupUnavailableError):
        store.claim_send([c], "c:a", 10_000)()
    assert store.claim_send([c], "c:a", 10_000)() == [ClaimStatus.CLAIMED]  # a new connection

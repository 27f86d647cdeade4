"""The status page: the snapshot of a worker's state and its JSON and HTML renderings (no broker)."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamer import App, Message
from streamer.commit import AdaptivePolicy, CommitPolicy, IntervalPolicy
from streamer.engine.partition import TP, OutOfOrder, PartitionState
from streamer.errors import PermanentError, RetryRecord
from streamer.metrics import HealthServer
from streamer.settings import CommitSettings, MetricsSettings, Settings, load_settings
from streamer.stats import COMMIT_TIMES, Recent, TopicStats, WorkerStats, error_types
from streamer.status import (
    RATE_WINDOW_S,
    WorkerStatus,
    commit_rate,
    redact,
    render_html,
    render_json,
    snapshot,
)
from streamer.testing import MemoryDeadLetterSink, MemorySource
from streamer.worker import Worker

SECRET = "s3cr3t-sasl-password"  # noqa: S105 - a made-up secret the page must not show
REDIS_PASSWORD = "r3d1s-pw"  # noqa: S105 - likewise
PAYLOAD = b"PAYLOAD-card-4111-1111"
NOW = 1_800_000_000.0
MONO = 5_000.0


def secret_settings(**sections: Any) -> Settings:
    """Settings with a SASL password and a Redis URL with a password in them."""
    return load_settings(
        kafka={
            "bootstrap_servers": "memory",
            "group_id": "orders",
            "poll_batch_size": 7,
            "client": {"sasl.password": SECRET},
        },
        dedup={"redis_url": f"redis://app:{REDIS_PASSWORD}@127.0.0.1:6379/0"},
        metrics={"enabled": False},
        **sections,
    )


@dataclass
class FakeWorker:
    """Just what the snapshot reads of a worker."""

    settings: Settings
    stats: WorkerStats = field(default_factory=WorkerStats)
    worker_id: str = "host-1-abc"
    joined: bool = True
    stop_requested: bool = False
    policy: CommitPolicy = field(default_factory=lambda: IntervalPolicy(10_000, 5.0))
    outage: str | None = None
    running_partition: PartitionState | None = None
    records_in_flight: int = 0
    records_waiting: int = 0
    states: dict[TP, PartitionState] = field(default_factory=dict)
    member: str | None = "rdkafka-1234"

    def partitions(self) -> list[tuple[TP, PartitionState]]:
        return list(self.states.items())

    def member_id(self) -> str | None:
        return self.member


def state(tp: TP, *, committed: int, position: int, end: int, last_ts: float) -> PartitionState:
    s = PartitionState(tp, committed)
    s.first_offset = committed
    s.offsets.advance(position)
    s.high_watermark = end
    s.last_ts = int(last_ts * 1000)
    return s


def take(worker: FakeWorker) -> WorkerStatus:
    return snapshot(worker, version="1.2.3", now=NOW, monotonic=MONO)


# -- the snapshot ---------------------------------------------------------------------------------


def test_snapshot_shows_each_partitions_offsets_lag_work_at_risk_and_pause_reasons() -> None:
    worker = FakeWorker(secret_settings())
    worker.stats.started_at = MONO - 90
    worker.stats.last_poll = MONO - 0.25
    a = worker.states["orders", 1] = state(
        ("orders", 1), committed=100, position=130, end=150, last_ts=NOW - 7
    )
    a.acked_at = NOW - 3
    a.paused_for.add("retry")
    a.retry_due = MONO + 1.5
    b = worker.states["orders", 0] = state(("orders", 0), committed=40, position=40, end=40, last_ts=NOW - 60)
    b.paused_for.update({"backpressure", "busy"})
    worker.running_partition = a

    status = take(worker)

    assert (status.group, status.member_id, status.state, status.version) == (
        "orders",
        "rdkafka-1234",
        "running",
        "1.2.3",
    )
    assert status.uptime_seconds == 90
    assert status.started_at == NOW - 90
    assert status.polled_ago == 0.25
    first, second = status.partitions
    assert (first.topic, first.partition) == ("orders", 0), "sorted by topic and partition"
    assert (first.committed, first.position, first.end, first.lag, first.lag_seconds) == (40, 40, 40, 0, 0.0)
    assert first.paused_for == ("backpressure", "busy")
    assert (first.in_flight, first.retry_in) == (0, None)
    assert (second.committed, second.position, second.end, second.lag) == (100, 130, 150, 20)
    assert second.lag_seconds == pytest.approx(7.0, abs=0.01), "age of the oldest unprocessed record"
    assert second.at_risk == 30, "finished since the last acknowledged commit"
    assert second.committed_at == NOW - 3
    assert second.paused_for == ("retry",)
    assert second.retry_in == 1.5
    assert second.in_flight == 1, "serial dispatch: the partition whose record is in the chain"


def test_snapshot_counts_in_flight_records_per_partition_in_concurrent_dispatch() -> None:
    worker = FakeWorker(secret_settings())
    s = worker.states["t", 0] = state(("t", 0), committed=0, position=10, end=20, last_ts=NOW)
    s.tracker = OutOfOrder()
    s.in_flight, s.waiting = 4, 9
    worker.records_in_flight, worker.records_waiting = 4, 9
    status = take(worker)
    assert (status.partitions[0].in_flight, status.partitions[0].waiting) == (4, 9)
    assert (status.in_flight, status.waiting) == (4, 9)


def test_snapshot_before_joining_and_while_stopping_says_so() -> None:
    worker = FakeWorker(secret_settings(), joined=False, member=None)
    assert take(worker).state == "starting"
    assert take(worker).member_id is None
    worker.joined, worker.stop_requested = True, True
    assert take(worker).state == "stopping"


def test_snapshot_totals_outcomes_over_topics() -> None:
    worker = FakeWorker(secret_settings())
    worker.stats.topics = {"a": TopicStats(ok=5, dead_lettered=1), "b": TopicStats(ok=2, dropped=3, failed=1)}
    worker.stats.retries = 4
    status = take(worker)
    assert status.records == {
        "ok": 7,
        "dropped": 3,
        "deduplicated": 0,
        "skipped": 0,
        "dead_lettered": 1,
        "failed": 1,
    }
    assert status.retries == 4
    assert status.topics == ("a", "b")


def test_snapshot_shows_the_fixed_interval_and_the_commit_rate() -> None:
    worker = FakeWorker(secret_settings())
    worker.stats.started_at = MONO - 600
    worker.stats.commits, worker.stats.commit_errors = 30, 2
    for t in reversed(range(30)):
        worker.stats.commit_times.add(MONO - 2 * t)  # one every 2 s for the last minute, oldest first
    commit = take(worker).commit
    assert (commit.policy, commit.every_records, commit.every_seconds) == ("interval", 10_000, 5.0)
    assert (commit.commits, commit.errors) == (30, 2)
    assert commit.per_second == pytest.approx(30 / RATE_WINDOW_S)
    assert commit.last_at == NOW
    assert (commit.cost_ms, commit.mtbf_seconds) == (None, None)


def test_snapshot_shows_the_interval_the_adaptive_policy_learned() -> None:
    policy = AdaptivePolicy(CommitSettings(policy="adaptive", mtbf_seconds=3600))
    policy.committed(0.002)
    policy.failure_observed(1800)
    worker = FakeWorker(secret_settings(), policy=policy)
    commit = take(worker).commit
    assert commit.policy == "adaptive"
    assert commit.cost_ms == pytest.approx(2.0)
    assert commit.mtbf_seconds == 1800
    assert commit.failures == 1
    assert commit.every_seconds == pytest.approx(AdaptivePolicy.young_interval(0.002, 1800))


def test_commit_rate_is_over_the_last_minute_or_what_the_buffer_still_holds() -> None:
    assert commit_rate([], forgotten=False, now=100.0, uptime=100.0) == 0.0
    assert commit_rate([10.0, 95.0, 99.0], forgotten=False, now=100.0, uptime=100.0) == pytest.approx(2 / 60)
    assert commit_rate([90.0, 99.0], forgotten=False, now=100.0, uptime=20.0) == pytest.approx(2 / 20)
    # 256 commits within the last 8 s, older ones forgotten: the rate over those 8 s.
    times = [92.0 + 8.0 * i / COMMIT_TIMES for i in range(COMMIT_TIMES)]
    assert commit_rate(times, forgotten=True, now=100.0, uptime=500.0) == pytest.approx(COMMIT_TIMES / 8)
    assert commit_rate([99.9], forgotten=False, now=100.0, uptime=0.1) == 1.0, "a young worker counts 1 s"


def test_errors_and_dead_letters_come_newest_first_scrubbed_of_secrets() -> None:
    worker = FakeWorker(secret_settings())
    worker.stats.error("commit", "commit failed: REQUEST_TIMED_OUT")
    worker.stats.error("dead-letter", f"cannot write to t.dlq: sasl auth failed for {SECRET}")
    worker.stats.error("dedup", f"redis://app:{REDIS_PASSWORD}@127.0.0.1 unreachable")
    status = take(worker)
    assert [i.kind for i in status.errors] == ["dedup", "dead-letter", "commit"]
    text = render_json(status) + render_html(status)
    assert SECRET not in text
    assert REDIS_PASSWORD not in text
    assert status.errors[1].text == "cannot write to t.dlq: sasl auth failed for **********"


def test_redact_replaces_the_longest_secret_first() -> None:
    assert redact("token abcdef and abc", ["abc", "abcdef"]) == "token ********** and **********"


def test_recent_keeps_the_last_items_and_counts_all() -> None:
    recent: Recent[int] = Recent(3)
    for i in range(5):
        recent.add(i)
    assert recent.items() == [2, 3, 4]
    assert recent.total == 5


def test_recent_is_safe_to_read_while_another_thread_adds() -> None:
    recent: Recent[int] = Recent(50)
    done = threading.Event()

    def writer() -> None:
        for i in range(50_000):
            recent.add(i)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        items = recent.items()
        if items:  # a consistent copy: consecutive items, never a torn one
            assert items == list(range(items[0], items[0] + len(items)))
    thread.join()
    assert recent.total == 50_000


def test_error_types_name_the_chain_of_causes_never_their_messages() -> None:
    cause = ValueError(f"amount {PAYLOAD!r} is not a number")
    wrapped = PermanentError(f"ValueError: {cause}")
    wrapped.__cause__ = cause
    assert error_types(wrapped) == "PermanentError: ValueError"
    assert error_types(RetryRecord(0.5, TimeoutError("slow"))) == "RetryRecord: TimeoutError"


# -- the renderings ---------------------------------------------------------------------------------


def hostile_status() -> WorkerStatus:
    """A worker whose names are markup: everything must come out escaped."""
    worker = FakeWorker(
        load_settings(kafka={"bootstrap_servers": "memory", "group_id": "<script>alert(1)</script>"}),
        member='"><img src=x onerror=alert(2)>',
    )
    worker.stats.topics = {"<b>t</b>": TopicStats()}
    worker.states["<b>t</b>", 0] = state(("<b>t</b>", 0), committed=1, position=2, end=3, last_ts=NOW)
    worker.states["<b>t</b>", 0].paused_for.add("<i>why</i>")
    worker.stats.error("record", "<svg onload=alert(3)>", "<b>t</b>", 0, 1)
    return take(worker)


def test_html_escapes_every_name_and_text() -> None:
    page = render_html(hostile_status())
    for raw in ("<script>alert(1)", "<img src=x", "<b>t</b>", "<i>why</i>", "<svg onload"):
        assert raw not in page, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;svg onload=alert(3)&gt;" in page


def test_html_refreshes_itself_and_loads_nothing_from_elsewhere() -> None:
    page = render_html(hostile_status())
    assert re.search(r'<noscript><meta http-equiv="refresh" content="\d+"></noscript>', page)
    scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    assert len(scripts) == 1, "one inline script"
    assert "setInterval" in scripts[0]
    assert "fetch(location.pathname" in scripts[0]
    assert not re.search(r"<script[^>]*\ssrc=|<link\b|<img\b|@import|url\(", page), "no external resource"
    assert "http://" not in page
    assert "https://" not in page


def test_html_shows_partitions_commits_errors_and_dead_letters() -> None:
    worker = FakeWorker(secret_settings())
    worker.states["orders", 2] = state(("orders", 2), committed=1200, position=1234, end=1300, last_ts=NOW)
    worker.stats.error("commit", "commit failed (running): REQUEST_TIMED_OUT: timed out")
    page = render_html(take(worker))
    row = re.search(r'<tr data-tp="orders/2">(.*?)</tr>', page)
    assert row is not None
    assert '<td class="committed">1,200</td>' in row.group(1)
    assert '<td class="lag">66</td>' in row.group(1)
    assert "rdkafka-1234" in page
    assert "Policy <b>interval</b>: commit every 10,000 records or 5 s" in page
    assert "REQUEST_TIMED_OUT" in page
    assert '<p class="note" id="dead-letters">None.</p>' in page


def test_json_is_the_snapshot() -> None:
    worker = FakeWorker(secret_settings())
    worker.states["orders", 0] = state(("orders", 0), committed=5, position=8, end=9, last_ts=NOW)
    body = json.loads(render_json(take(worker)))
    assert body["group"] == "orders"
    assert body["member_id"] == "rdkafka-1234"
    assert body["partitions"] == [
        {
            "topic": "orders",
            "partition": 0,
            "committed": 5,
            "committed_at": None,
            "position": 8,
            "end": 9,
            "lag": 1,
            "lag_seconds": 0.0,
            "at_risk": 3,
            "in_flight": 0,
            "waiting": 0,
            "paused_for": [],
            "retry_in": None,
        }
    ]
    assert body["commit"]["policy"] == "interval"


# -- a real worker on the in-memory source --------------------------------------------------------


class FlakySource(MemorySource):
    """Refuses the first steady-state commit, as a moving coordinator does."""

    refused = False

    def commit(self, offsets: dict[TP, int], metadata: Any, *, asynchronous: bool) -> None:
        if not self.refused and all("state=running" in m for m in metadata.values()):
            self.refused = True
            raise KafkaException(KafkaError(KafkaError.REQUEST_TIMED_OUT, "the coordinator moved"))
        super().commit(offsets, metadata, asynchronous=asynchronous)


def test_a_worker_run_leaves_its_errors_and_dead_letters_without_payloads_or_secrets() -> None:
    settings = secret_settings(
        commit={"every_records": 5, "every_seconds": 0},
        retry={"max_attempts": 2, "initial_backoff": 0.01, "max_backoff": 0.01, "jitter": 0},
    )
    app = App(name="status")

    @app.handler("orders")
    def handle(msg: Message) -> None:
        if msg.offset in (3, 11):
            # An application's message quoting the record: must not reach the page.
            raise TimeoutError(f"downstream timed out on {msg.value!r}")

    values = [PAYLOAD + b"-%d" % i for i in range(20)]
    source = FlakySource({"orders": [values]})
    sink = MemoryDeadLetterSink()
    worker = Worker(settings, app.chains(settings), source=source, until_end=True, dead_letter=sink)
    assert worker.run() == 0
    assert len(sink.parked) == 2

    status = snapshot(worker, version="test")
    parked = [(d.topic, d.partition, d.offset, d.dead_letter_topic, d.attempts) for d in status.dead_letters]
    assert parked == [("orders", 0, 11, "orders.dlq", 2), ("orders", 0, 3, "orders.dlq", 2)]
    assert status.dead_letters[0].reason == "PermanentError: TimeoutError"
    kinds = [(i.kind, i.offset) for i in reversed(status.errors)]
    assert ("record", 3) in kinds
    assert ("record", 11) in kinds
    assert ("commit", None) in kinds
    assert any(i.text.startswith("attempt 1 failed, retry in") for i in status.errors)
    assert status.commit.errors == 1
    page = render_html(status) + render_json(status)
    assert PAYLOAD.decode() not in page
    assert "PAYLOAD" not in page
    assert SECRET not in page
    assert REDIS_PASSWORD not in page


def test_the_worker_has_no_member_id_on_the_in_memory_source() -> None:
    worker = Worker(secret_settings(), {"t": lambda m: None}, source=MemorySource({"t": [[]]}))
    assert worker.member_id() is None


class MemberSource(MemorySource):
    """Says its member id, and on which threads it was asked."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.asked_on: list[str] = []

    def member_id(self) -> str:
        self.asked_on.append(threading.current_thread().name)
        return "member-7"


def test_the_member_id_is_read_on_the_loop_thread_and_only_after_rebalances() -> None:
    # librdkafka's memberid() waits while the loop is inside consume(): the HTTP thread must
    # never call it, and the loop must not pay for it every turn.
    source = MemberSource({"t": [[b"%d" % i for i in range(50)]]})
    settings = secret_settings(commit={"every_records": 5})
    worker = Worker(settings, {"t": lambda m: None}, source=source, until_end=True)
    loop = threading.Thread(target=worker.run, name="loop")
    loop.start()
    loop.join(10)
    assert not loop.is_alive()
    assert worker.member_id() == "member-7"
    asked = len(source.asked_on)
    reader = threading.Thread(target=lambda: snapshot(worker, version="t"), name="http")
    reader.start()
    reader.join(5)
    assert set(source.asked_on) == {"loop"}
    assert asked == len(source.asked_on) <= 2, "once after the assignment (and once after the revoke)"


# -- the HTTP server --------------------------------------------------------------------------------


@pytest.fixture
def serving() -> Iterator[tuple[HealthServer, FakeWorker]]:
    worker = FakeWorker(secret_settings())
    worker.states["orders", 0] = state(("orders", 0), committed=5, position=8, end=9, last_ts=NOW)
    server = HealthServer(worker, MetricsSettings(port=0), 300.0)  # type: ignore[arg-type]
    server.start()
    yield server, worker
    server.stop()


def get(port: int | None, path: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_the_metrics_port_serves_the_status_page_and_its_json(
    serving: tuple[HealthServer, FakeWorker],
) -> None:
    server, _ = serving
    code, headers, page = get(server.port, "/")
    assert code == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert '<tr data-tp="orders/0">' in page
    code, headers, body = get(server.port, "/status.json")
    assert (code, headers["Content-Type"]) == (200, "application/json")
    assert json.loads(body)["partitions"][0]["committed"] == 5
    assert get(server.port, "/nowhere")[0] == 404


def test_status_page_off_leaves_only_metrics_and_health() -> None:
    worker = FakeWorker(secret_settings())
    server = HealthServer(worker, MetricsSettings(port=0, status_page=False), 300.0)  # type: ignore[arg-type]
    server.start()
    try:
        assert get(server.port, "/")[0] == 404
        assert get(server.port, "/status.json")[0] == 404
        assert get(server.port, "/healthz")[0] == 200
        assert get(server.port, "/nowhere")[2] == "try /metrics, /healthz or /readyz\n"
    finally:
        server.stop()

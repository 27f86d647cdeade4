"""Metrics, rules and dashboard against a live worker, the real broker and the dev Prometheus.

A worker process (``tests/integration/apps/metrics_app.py``) serves /metrics on a free port in
9400..9409, the ports the dev Prometheus scrapes every second (job "streamer"). The tests check
the exposition with ``promtool check metrics``, compare its values with what the test produced,
load deploy/prometheus/rules into Prometheus (POST /-/reload), and run every query of the Grafana
dashboard through Prometheus' HTTP API, each of which must return data.

The last test kills a worker with SIGKILL at a known record and restarts it with dedup on: the
restarted worker's ``streamer_reprocessed_records_total`` must equal the records it read again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_unique_name, require_service
from tests.support import wait_for
from tests.support.kafka import committed_offsets, create_topic, delete_topics, end_offsets, produce_records
from tests.unit.test_deploy_rules import (
    EXPOSED_METRICS,
    dashboard_panels,
    load_dashboard,
    load_rules,
    substitute,
)

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
APP = "tests.integration.apps.metrics_app:app"
#: The steady worker sends each record on to this topic (``<topic><suffix>``).
OUTPUT_SUFFIX = ".out"
PROMETHEUS = f"http://127.0.0.1:{os.environ.get('STREAMER_DEV_PROMETHEUS_PORT') or 9090}"
#: The ports dev/services' Prometheus scrapes.
SCRAPED_PORTS = range(9400, 9410)
START_TIMEOUT_S = 30.0
#: Scrapes and rule evaluations happen every second in the dev Prometheus.
PROMETHEUS_TIMEOUT_S = 20.0
#: The default suffix of the dead-letter topic a worker may create next to the topic it reads.
DLQ_SUFFIX = ".dlq"


# -- Prometheus ---------------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - a fixed local URL
        return json.load(resp)


def _prometheus_unavailable_reason() -> str | None:
    try:
        with urllib.request.urlopen(f"{PROMETHEUS}/-/ready", timeout=3) as resp:  # noqa: S310
            return None if resp.status == 200 else f"/-/ready answered {resp.status}"
    except OSError as exc:
        return f"/-/ready failed: {exc}"


def query(expr: str) -> list[dict[str, Any]]:
    """Evaluate ``expr`` now; the instant vector (or an error naming the query)."""
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = _get_json(url)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"Prometheus rejected {expr!r}: {exc.read().decode(errors='replace')}") from None
    assert body["status"] == "success", f"{expr!r}: {body}"
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    assert isinstance(result, list)
    return result


def values(expr: str) -> list[float]:
    """The sample values of ``expr`` now."""
    return [float(series["value"][1]) for series in query(expr)]


def loaded_rule_groups() -> dict[str, list[str]]:
    """Rule groups Prometheus has loaded from deploy/prometheus/rules: group name -> rule names."""
    groups = _get_json(f"{PROMETHEUS}/api/v1/rules")["data"]["groups"]
    return {
        g["name"]: [r["name"] for r in g["rules"]]
        for g in groups
        if Path(g["file"]).resolve().parent == RULES_DIR
    }


def expected_rule_groups() -> dict[str, list[str]]:
    """Rule groups of the files in deploy/prometheus/rules: group name -> rule names."""
    expected: dict[str, list[str]] = {}
    for rule in load_rules():
        expected.setdefault(rule.group, []).append(rule.name)
    return expected


@pytest.fixture(scope="module")
def prometheus() -> str:
    """The dev Prometheus, with this checkout's rule files (re)loaded."""
    require_service(f"Prometheus at {PROMETHEUS}", _prometheus_unavailable_reason)
    config = _get_json(f"{PROMETHEUS}/api/v1/status/config")["data"]["yaml"]
    glob = f"{RULES_DIR}/*.yml"
    if glob not in config:
        pytest.fail(
            f"the Prometheus at {PROMETHEUS} does not load {glob} (its config has no such rule_files "
            "entry; it was started from another checkout or an older dev/services). Restart it: "
            "`dev/services down && dev/services up`",
            pytrace=False,
        )
    request = urllib.request.Request(f"{PROMETHEUS}/-/reload", method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310
            pass
    except urllib.error.HTTPError as exc:
        pytest.fail(
            f"Prometheus refused to reload its configuration: {exc.read().decode(errors='replace')}"
            " (a rule file that promtool accepts but this Prometheus does not?)",
            pytrace=False,
        )
    expected = expected_rule_groups()
    wait_for(
        lambda: loaded_rule_groups() == expected,
        PROMETHEUS_TIMEOUT_S,
        interval=0.2,
        message=lambda: f"rules loaded by Prometheus {loaded_rule_groups()} != rule files {expected}",
    )
    return PROMETHEUS


# -- workers ------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_scraped_port(exclude: set[int]) -> int:
    """A port Prometheus scrapes that nothing listens on (highest first: other tests take 9400).

    Workers of other tests may hold all ten for a while: wait for one to be released.
    """
    candidates = [port for port in reversed(SCRAPED_PORTS) if port not in exclude]
    port: int = wait_for(
        lambda: next((p for p in candidates if _port_free(p)), 0),
        START_TIMEOUT_S,
        interval=0.2,
        message=f"every port Prometheus scrapes ({SCRAPED_PORTS.start}..{SCRAPED_PORTS.stop - 1}) is busy",
    )
    return port


def scrape(port: int) -> str:
    """The body of a worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
        return text


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Samples of an exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def pick(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return {lbls: v for (n, lbls), v in samples.items() if n == name and wanted <= lbls}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` with ``labels``."""
    return sum(pick(samples, name, **labels).values())


def by_partition(samples: Samples, name: str, group: str) -> dict[int, float]:
    """A per-partition gauge of ``group``: partition -> value."""
    return {int(dict(lbls)["partition"]): v for lbls, v in pick(samples, name, group=group).items()}


@dataclass
class WorkerProcess:
    """One ``streamer run`` of the metrics app, with its files and metrics port."""

    proc: subprocess.Popen[bytes]
    port: int
    group: str
    effects: Path
    blocked: Path
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        """The end of the worker's output, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def describe(self) -> str:
        """State and log tail, for failure messages."""
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"worker on port {self.port} ({state}); output tail:\n{self.log_tail()}"

    def samples(self) -> Samples:
        """This worker's metrics now."""
        return parse(scrape(self.port))

    def serving(self) -> bool:
        """Whether this worker (not another process) answers on its port."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited: {self.describe()}")
        try:
            return f'group="{self.group}"' in scrape(self.port)
        except OSError:
            return False

    def wait_metrics(self, check: Callable[[Samples], bool], what: str, timeout: float = 15.0) -> Samples:
        """Wait until ``check`` holds for this worker's metrics; return them."""
        last: list[Samples] = [{}]

        def ok() -> bool:
            last[0] = self.samples()
            return check(last[0])

        wait_for(ok, timeout, interval=0.1, message=lambda: f"{what}; {self.describe()}")
        return last[0]

    def kill(self) -> None:
        """SIGKILL the worker (if running) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


class Workers:
    """Starts metrics-app workers; kills whichever are left at exit."""

    def __init__(self, directory: Path, bootstrap: str) -> None:
        self.directory = directory
        self.bootstrap = bootstrap
        self.started: list[WorkerProcess] = []

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.started:
            worker.kill()

    def start(self, name: str, topic: str, group: str, **settings: str) -> WorkerProcess:
        """Start a worker on a free scraped port and wait until it serves /metrics."""
        busy = {w.port for w in self.started if w.proc.poll() is None}
        for _attempt in range(3):
            chosen = free_scraped_port(busy)
            worker = self._spawn(name, topic, group, chosen, settings)
            try:
                wait_for(worker.serving, START_TIMEOUT_S, interval=0.1, message=worker.describe)
            except AssertionError:
                if "cannot bind" not in worker.log_tail(200):
                    raise
                worker.kill()  # another process took the port meanwhile: take another
                busy.add(chosen)
                continue
            return worker
        pytest.fail("could not start a worker on a free scraped port three times")

    def _spawn(self, name: str, topic: str, group: str, port: int, settings: dict[str, str]) -> WorkerProcess:
        effects, blocked, log = (self.directory / f"{name}.{ext}" for ext in ("effects", "blocked", "log"))
        log.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMER_", "METRICS_APP_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.update(
            {
                "STREAMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
                "STREAMER_KAFKA__GROUP_ID": group,
                "STREAMER_METRICS__HOST": "127.0.0.1",
                "STREAMER_METRICS__PORT": str(port),
                "STREAMER_LOG_FORMAT": "json",
                "STREAMER_LOG_LEVEL": "INFO",
                "METRICS_APP_TOPIC": topic,
                "METRICS_APP_EFFECTS": str(effects),
                "METRICS_APP_BLOCKED": str(blocked),
                **settings,
            }
        )
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamer", "run", APP, "--no-progress"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        worker = WorkerProcess(proc, port, group, effects, blocked, log)
        self.started.append(worker)
        return worker


def read_effects(path: Path) -> list[tuple[int, int, int]]:
    """(partition, offset, id) of every complete effects line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n")[:-1]:
        partition, offset, record = line.split()
        out.append((int(partition), int(offset), int(record)))
    return out


# -- a steady worker that processed a known set of records --------------------------------------

RECORDS = 600
PARTITIONS = 3


@dataclass
class Steady:
    """The module's worker: it processed RECORDS records of ``topic`` and committed them all."""

    worker: WorkerProcess
    topic: str
    group: str
    ends: dict[int, int]


@pytest.fixture(scope="module")
def steady(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Steady]:
    """A worker that consumed RECORDS records, committed, and keeps running (idle, caught up)."""
    topic = make_unique_name("t", "observability")
    group = make_unique_name("g", "observability")
    create_topic(kafka_bootstrap, topic, PARTITIONS)
    create_topic(kafka_bootstrap, f"{topic}{OUTPUT_SUFFIX}", PARTITIONS)
    try:
        produce_records(kafka_bootstrap, topic, RECORDS)
        ends = end_offsets(kafka_bootstrap, topic)
        with Workers(tmp_path_factory.mktemp("observability"), kafka_bootstrap) as workers:
            worker = workers.start(
                "steady",
                topic,
                group,
                STREAMER_COMMIT__EVERY_RECORDS="100",
                STREAMER_COMMIT__EVERY_SECONDS="1",
                STREAMER_KAFKA__POLL_BATCH_SIZE="50",
                STREAMER_KAFKA__CLIENT=json.dumps({"statistics.interval.ms": 1000}),
                METRICS_APP_OUTPUT=f"{topic}{OUTPUT_SUFFIX}",
            )
            wait_for(
                lambda: len(read_effects(worker.effects)) >= RECORDS,
                START_TIMEOUT_S,
                message=lambda: f"waiting for {RECORDS} records handled; {worker.describe()}",
            )
            # Caught up, everything committed and acknowledged, lag known for every partition.
            worker.wait_metrics(
                lambda s: (
                    by_partition(s, "streamer_committed_offset", group) == ends
                    and by_partition(s, "streamer_consumer_lag_records", group) == dict.fromkeys(ends, 0)
                    and by_partition(s, "streamer_work_at_risk_records", group) == dict.fromkeys(ends, 0)
                ),
                f"waiting for committed offsets {ends}, lag 0 and no work at risk",
            )
            yield Steady(worker, topic, group, ends)
    finally:
        # Workers with a dead-letter topic configured create "<topic>.dlq": delete it too.
        delete_topics(kafka_bootstrap, [topic, f"{topic}{DLQ_SUFFIX}", f"{topic}{OUTPUT_SUFFIX}"])


def test_live_metrics_pass_promtool_check_metrics(steady: Steady) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool is not installed (Debian package 'prometheus'; dev/bootstrap installs it)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    body = scrape(steady.worker.port)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_live_metrics_match_what_the_worker_did(steady: Steady) -> None:
    group, topic, ends = steady.group, steady.topic, steady.ends
    samples = steady.worker.samples()

    names = {name for name, _ in samples}
    assert names == EXPOSED_METRICS, (
        f"the worker exposes {sorted(names - EXPOSED_METRICS)} beyond, and lacks "
        f"{sorted(EXPOSED_METRICS - names)} of, the list in tests/unit/test_deploy_rules.py"
    )
    assert total(samples, "streamer_records_total", group=group, topic=topic, outcome="ok") == RECORDS
    for outcome in ("dropped", "deduplicated", "dead_lettered", "failed"):
        assert total(samples, "streamer_records_total", group=group, topic=topic, outcome=outcome) == 0
    assert total(samples, "streamer_reprocessed_records_total", group=group, topic=topic) == 0
    assert total(samples, "streamer_handler_duration_seconds_count", group=group, topic=topic) == RECORDS
    inf = pick(samples, "streamer_handler_duration_seconds_bucket", group=group, topic=topic, le="+Inf")
    assert list(inf.values()) == [RECORDS]

    # Commits (their number depends on timing: one asynchronous commit is in flight at a time);
    # the duration histogram has one observation per acknowledged commit.
    ok_commits = total(samples, "streamer_commits_total", group=group, result="ok")
    assert ok_commits >= 1
    assert total(samples, "streamer_commits_total", group=group, result="error") == 0
    assert total(samples, "streamer_commit_duration_seconds_count", group=group) == ok_commits
    # Each record sent one output, acknowledged before its offset was committed; no transactions.
    output = f"{topic}{OUTPUT_SUFFIX}"
    assert total(samples, "streamer_outputs_total", group=group, topic=output) == RECORDS
    # Serial dispatch observes one delivery latency per flush (its outputs' upper bound).
    assert 1 <= total(samples, "streamer_output_delivery_seconds_count", group=group) <= RECORDS
    assert total(samples, "streamer_output_errors_total", group=group) == 0
    assert total(samples, "streamer_transactions_total", group=group) == 0
    assert total(samples, "streamer_commit_interval_records", group=group) == 100
    assert total(samples, "streamer_commit_interval_seconds", group=group) == 1

    # Per partition: everything committed, nothing behind, nothing at risk, nothing paused.
    assert by_partition(samples, "streamer_committed_offset", group) == ends
    assert by_partition(samples, "streamer_consumer_lag_records", group) == dict.fromkeys(ends, 0)
    assert by_partition(samples, "streamer_consumer_lag_seconds", group) == dict.fromkeys(ends, 0)
    assert by_partition(samples, "streamer_work_at_risk_records", group) == dict.fromkeys(ends, 0)
    assert by_partition(samples, "streamer_partition_paused", group) == dict.fromkeys(ends, 0)
    now = time.time()
    for partition, acked_at in by_partition(samples, "streamer_last_commit_timestamp_seconds", group).items():
        assert now - 120 < acked_at <= now + 1, f"partition {partition}: last commit at {acked_at}"
    assert now - 10 < total(samples, "streamer_last_poll_timestamp_seconds", group=group) <= now + 1

    assert total(samples, "streamer_assigned_partitions", group=group) == PARTITIONS
    assert total(samples, "streamer_group_joined", group=group) == 1
    assert total(samples, "streamer_rebalances_total", group=group, event="assigned") >= 1
    assert total(samples, "streamer_rebalances_total", group=group, event="lost") == 0
    for name in ("streamer_dedup_contested_total", "streamer_dedup_errors_total"):
        assert total(samples, name, group=group) == 0
    assert total(samples, "streamer_records_without_dedup_total", group=group) == 0
    assert total(samples, "streamer_dedup_outage", group=group) == 0
    (info,) = pick(samples, "streamer_build_info")
    assert dict(info).keys() == {"version", "confluent_kafka", "librdkafka", "python"}
    assert all(value and value != "unknown" for value in dict(info).values()), dict(info)


def test_prometheus_scrapes_the_worker_and_evaluates_the_rules(steady: Steady, prometheus: str) -> None:
    group, port = steady.group, steady.worker.port
    wait_for(
        lambda: (
            values(f'up{{job="streamer",instance="127.0.0.1:{port}"}} == 1')
            and values(f'sum(streamer_records_total{{group="{group}",outcome="ok"}})') == [RECORDS]
        ),
        PROMETHEUS_TIMEOUT_S,
        interval=0.2,
        message=f"Prometheus at {prometheus} has not scraped the worker on 127.0.0.1:{port}",
    )
    expected = {
        f'streamer:consumer_lag_records:sum{{group="{group}"}}': [0.0],
        f'streamer:consumer_lag_records:max{{group="{group}"}}': [0.0],
        f'streamer:consumer_lag_seconds:max{{group="{group}"}}': [0.0],
        f'streamer:work_at_risk_records:sum{{group="{group}"}}': [0.0],
        f'streamer:assigned_partitions:sum{{group="{group}"}}': [float(PARTITIONS)],
        f'streamer:workers_joined:sum{{group="{group}"}}': [1.0],
        f'sum(streamer:committed_offset:max{{group="{group}"}})': [float(sum(steady.ends.values()))],
    }
    wait_for(
        lambda: all(values(expr) == want for expr, want in expected.items()),
        PROMETHEUS_TIMEOUT_S,
        interval=0.2,
        message=lambda: (
            "recording rules: "
            + ", ".join(f"{expr} = {values(expr)} (want {want})" for expr, want in expected.items())
        ),
    )
    # Rules over rates have series for the group as soon as two scrapes are in their window.
    rate_rules = [
        f'{rule}{{group="{group}"}}'
        for rule in (
            "streamer:records:rate1m",
            "streamer:commits:rate1m",
            "streamer:handler_duration_seconds:p99",
        )
    ]
    wait_for(
        lambda: all(query(expr) for expr in rate_rules),
        PROMETHEUS_TIMEOUT_S,
        interval=0.2,
        message=lambda: f"no series yet: {[expr for expr in rate_rules if not query(expr)]}",
    )
    # A caught-up, committing worker sets off no alert (StreamerCommitRewind has no "for").
    assert query(f'ALERTS{{group="{group}"}}') == []


def test_every_dashboard_query_returns_data(steady: Steady, prometheus: str) -> None:
    dashboard = load_dashboard()
    variables = {
        "group": steady.group,
        "topic": steady.topic,
        "__rate_interval": "1m",
        "__interval": "15s",
        "__range": "1h",
    }
    targets = [
        (panel["title"], target.get("legendFormat", ""), substitute(target["expr"], variables))
        for panel in dashboard_panels(dashboard)
        for target in panel["targets"]
    ]

    def empty() -> list[str]:
        return [f"{title} [{legend}]: {expr}" for title, legend, expr in targets if not query(expr)]

    # Rates need two scrapes of the worker inside their window: wait, then name what is missing.
    wait_for(
        lambda: not empty(),
        PROMETHEUS_TIMEOUT_S,
        interval=0.5,
        message=lambda: "dashboard queries without data:\n  " + "\n  ".join(empty()),
    )
    # The variables offer this group and topic.
    groups = _get_json(
        f"{prometheus}/api/v1/label/group/values?"
        + urllib.parse.urlencode({"match[]": "streamer_commits_total"})
    )["data"]
    assert steady.group in groups
    match = f'streamer_records_total{{group=~"{steady.group}"}}'
    topics = _get_json(
        f"{prometheus}/api/v1/label/topic/values?" + urllib.parse.urlencode({"match[]": match})
    )["data"]
    assert topics == [steady.topic]
    # Annotation queries only have data while something fires: they must at least be valid PromQL.
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            query(substitute(annotation["expr"], variables))


# -- reprocessed records after a crash ----------------------------------------------------------


def test_reprocessed_records_after_sigkill_equal_the_records_read_again(
    kafka_bootstrap: str,
    redis_url: str,
    prometheus: str,
    topic_factory: Callable[..., str],
    group_id: str,
    tmp_path: Path,
) -> None:
    """SIGKILL a worker stuck in a handler, restart it: it counts exactly the re-read records.

    A first run handles 1200 records and stops cleanly, committing them all. The next handles
    some of 150 more (fewer than the 300 records between commits) and hangs in the handler of the
    last one; it is killed there. With one record per poll batch the processed high-water mark is saved after
    every record, so the restarted worker counts as reprocessed exactly the records the first run
    handled after its last commit. With dedup on, each of them is deduplicated (its key was marked
    done), so no side effect runs twice.
    """
    committed_records, more = 1200, 150
    records = committed_records + more
    block_id = records - 1
    topic = topic_factory(PARTITIONS)
    produce_records(kafka_bootstrap, topic, committed_records)
    namespace = f"t-obs-{uuid.uuid4().hex[:8]}"
    settings = {
        "STREAMER_DEDUP__ENABLED": "true",
        "STREAMER_DEDUP__REDIS_URL": redis_url,
        "STREAMER_DEDUP__NAMESPACE": namespace,
        "STREAMER_DEDUP__WINDOW_SECONDS": "900",  # keys expire on their own after the test
        "STREAMER_COMMIT__EVERY_RECORDS": "300",
        "STREAMER_COMMIT__EVERY_SECONDS": "0",
        "STREAMER_KAFKA__POLL_BATCH_SIZE": "1",
        # Static membership: the restarted worker takes the partitions (and its claims) back at once.
        "STREAMER_KAFKA__CLIENT": json.dumps(
            {"statistics.interval.ms": 1000, "group.instance.id": f"{group_id}-1"}
        ),
    }
    store = redis.Redis.from_url(redis_url)
    try:
        with Workers(tmp_path, kafka_bootstrap) as workers:
            # 1200 records, then a clean stop: its final commit is at the end offsets. (Commits
            # every 300 records land where the loop counts 300 finished, which need not be the end.)
            zeroth = workers.start("run0", topic, group_id, **settings)
            wait_for(
                lambda: len(read_effects(zeroth.effects)) >= committed_records,
                START_TIMEOUT_S,
                interval=0.1,
                message=lambda: f"waiting for {committed_records} records handled; {zeroth.describe()}",
            )
            zeroth.proc.send_signal(signal.SIGTERM)
            assert zeroth.proc.wait(timeout=30) == 0, zeroth.describe()
            committed = end_offsets(kafka_bootstrap, topic)
            assert committed_offsets(kafka_bootstrap, group_id, topic) == committed, zeroth.describe()
            first = workers.start("run1", topic, group_id, METRICS_APP_BLOCK_ID=str(block_id), **settings)
            produce_records(kafka_bootstrap, topic, more, start_id=committed_records)
            wait_for(
                first.blocked.exists,
                START_TIMEOUT_S,
                interval=0.01,
                message=lambda: f"the worker never reached id {block_id}; {first.describe()}",
            )
            stuck_partition, stuck_offset, _ = map(int, first.blocked.read_text().split())
            handled_first = read_effects(first.effects)
            reread = sum(1 for partition, offset, _ in handled_first if offset >= committed[partition])
            assert reread >= stuck_offset - committed[stuck_partition], "records handled out of order"

            # The worker hangs in a handler; its metrics thread still answers. Work at risk is what
            # it handled since the last commit (plus, depending on the worker's bookkeeping, the
            # record in hand: it is read again after a crash too, but was never finished).
            since_commit = dict.fromkeys(range(PARTITIONS), 0)
            for partition, offset, _ in handled_first:
                since_commit[partition] += offset >= committed[partition]
            at_risk = by_partition(first.samples(), "streamer_work_at_risk_records", group_id)
            in_hand = at_risk[stuck_partition] - since_commit[stuck_partition]
            assert in_hand in (0, 1), f"work at risk {at_risk}, handled since the commit {since_commit}"
            assert at_risk == {p: since_commit[p] + (in_hand if p == stuck_partition else 0) for p in at_risk}
            first.kill()

            second = workers.start("run2", topic, group_id, **settings)
            to_handle = more - len(handled_first)
            wait_for(
                lambda: len(read_effects(second.effects)) >= to_handle,
                START_TIMEOUT_S,
                message=lambda: f"waiting for {to_handle} records handled; {second.describe()}",
            )
            samples = second.wait_metrics(
                lambda s: (
                    total(s, "streamer_records_total", group=group_id, outcome="ok")
                    + total(s, "streamer_records_total", group=group_id, outcome="deduplicated")
                    == more
                ),
                f"waiting for the second run to read the {more} records after the last commit",
            )
            handled_second = read_effects(second.effects)

            # Every record handled exactly once over the runs; the re-read ones were deduplicated.
            ids = [record for _, _, record in read_effects(zeroth.effects) + handled_first + handled_second]
            assert sorted(ids) == list(range(records)), "a record was handled twice or never"
            assert total(samples, "streamer_records_total", group=group_id, outcome="ok") == to_handle
            assert total(samples, "streamer_records_total", group=group_id, outcome="deduplicated") == reread
            assert total(samples, "streamer_reprocessed_records_total", group=group_id, topic=topic) == reread
            # Prometheus has the restarted worker's count too.
            expr = f'sum(streamer_reprocessed_records_total{{group="{group_id}"}})'
            wait_for(
                lambda: values(expr) == [float(reread)],
                PROMETHEUS_TIMEOUT_S,
                interval=0.2,
                message=lambda: f"{expr} = {values(expr)} in {prometheus}, want {reread}",
            )
    finally:
        delete_topics(kafka_bootstrap, [f"{topic}{DLQ_SUFFIX}"])  # best effort, like topic_factory
        keys = list(store.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            store.delete(*keys)
        store.close()

"""Prometheus metrics and the health endpoints of a worker.

The loop only bumps plain counters (see ``streamer.stats``); this collector turns them into
metric families when Prometheus scrapes, so the hot path never takes a lock. Per-partition series
exist only for assigned partitions: a revoked partition's series disappear with it.
"""

from __future__ import annotations

import math
import platform
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import confluent_kafka
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamer.settings import MetricsSettings
from streamer.status import STATUS_PATHS, render_html, render_json, snapshot

if TYPE_CHECKING:
    from streamer.worker import Worker

log = structlog.get_logger("streamer.metrics")

OUTCOMES = ("ok", "dropped", "deduplicated", "dead_lettered", "failed", "skipped")


def streamer_version() -> str:
    """The installed streamer version."""
    return _package_version("streamer")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class WorkerCollector(Collector):
    """Exports one worker's counters and partition states as Prometheus metric families."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from the worker's current state."""
        w = self._worker
        stats = w.stats
        group = w.settings.kafka.group_id

        records = CounterMetricFamily(
            "streamer_records", "Records finished, by outcome.", labels=["group", "topic", "outcome"]
        )
        reprocessed = CounterMetricFamily(
            "streamer_reprocessed_records",
            "Records at offsets this group had already processed before (re-read after a crash or handover).",
            labels=["group", "topic"],
        )
        handler = HistogramMetricFamily(
            "streamer_handler_duration_seconds",
            "Time in the handler chain per record.",
            labels=["group", "topic"],
        )
        for topic, ts in list(stats.topics.items()):
            for outcome in OUTCOMES:
                records.add_metric([group, topic, outcome], getattr(ts, outcome))
            reprocessed.add_metric([group, topic], ts.reprocessed)
            handler.add_metric([group, topic], ts.handler_seconds.cumulative(), ts.handler_seconds.sum)
        overruns = CounterMetricFamily(
            "streamer_handler_overruns",
            "Attempts that ran past their timeout (blocked where it cannot interrupt them).",
            labels=["group", "topic"],
        )
        for topic, ts in list(stats.topics.items()):
            overruns.add_metric([group, topic], ts.overruns)
        yield records
        yield reprocessed
        yield overruns
        yield handler

        commits = CounterMetricFamily(
            "streamer_commits", "Offset commits, by result.", labels=["group", "result"]
        )
        commits.add_metric([group, "ok"], stats.commits)
        commits.add_metric([group, "error"], stats.commit_errors)
        yield commits
        commit_time = HistogramMetricFamily(
            "streamer_commit_duration_seconds",
            "Commit round trip, request to broker acknowledgement.",
            labels=["group", "mode"],
        )
        for mode, hist in (("steady", stats.commit_seconds_steady), ("final", stats.commit_seconds_final)):
            commit_time.add_metric([group, mode], hist.cumulative(), hist.sum)
        yield commit_time
        yield _gauge(
            "streamer_commit_interval_records",
            "Records between commits (0: not counted).",
            group,
            w.policy.every_records,
        )
        yield _gauge(
            "streamer_commit_interval_seconds",
            "Seconds between commits in effect (0: not timed).",
            group,
            w.policy.every_seconds,
        )

        yield from self._partition_families(group)

        rebalances = CounterMetricFamily(
            "streamer_rebalances", "Rebalance events, by kind.", labels=["group", "event"]
        )
        for event in ("assigned", "revoked", "lost"):
            rebalances.add_metric([group, event], getattr(stats, event))
        yield rebalances
        yield _counter(
            "streamer_dedup_contested",
            "Claims found held by another live worker.",
            group,
            stats.dedup_contested,
        )
        yield _counter("streamer_dedup_errors", "Failed calls to the dedup store.", group, stats.dedup_errors)
        yield _counter(
            "streamer_dedup_store_resets",
            "Restarts of the dedup Redis that lost its marks (records re-read after it run again).",
            group,
            stats.dedup_store_resets,
        )
        yield from self._output_families(group)

        yield _counter(
            "streamer_offset_resets",
            "Offsets found going backwards inside an assignment (a reset, a recreated topic).",
            group,
            stats.offset_resets,
        )
        yield _gauge(
            "streamer_checkpoint_blocked",
            "1 while work at risk is at its bound and no records are taken (commits not landing).",
            group,
            1.0 if stats.checkpoint_blocked else 0.0,
        )
        yield _counter(
            "streamer_records_without_dedup",
            "Records processed without dedup while the store was down (on_unavailable = proceed).",
            group,
            stats.processed_without_dedup,
        )
        yield _gauge(
            "streamer_dedup_outage",
            "1 while partitions are paused because the dedup store is down.",
            group,
            1.0 if w.paused_for_outage else 0.0,
        )
        yield _gauge(
            "streamer_last_poll_timestamp_seconds",
            "When the loop last polled Kafka (epoch seconds).",
            group,
            time.time() - (time.monotonic() - stats.last_poll),
        )
        started = w.chain_started
        yield _gauge(
            "streamer_handler_running_seconds",
            "How long the record in the handler chain has been running; 0 between records.",
            group,
            0.0 if started is None else max(time.perf_counter() - started, 0.0),
        )
        yield _gauge(
            "streamer_records_in_flight",
            "Records running now (or retrying, or finished with their offset not yet published).",
            group,
            w.records_in_flight,
        )
        yield _gauge(
            "streamer_records_waiting",
            "Records handed to the processing thread and not started: behind their key or partition "
            "(ordering), or waiting for a free slot (concurrency).",
            group,
            w.records_waiting,
        )
        yield _gauge(
            "streamer_group_joined",
            "1 once the worker has joined its consumer group.",
            group,
            1.0 if w.joined else 0.0,
        )

        info = GaugeMetricFamily(
            "streamer_build_info",
            "streamer build and runtime versions.",
            labels=["version", "confluent_kafka", "librdkafka", "python"],
        )
        info.add_metric(
            [
                streamer_version(),
                _package_version("confluent-kafka"),
                confluent_kafka.libversion()[0],
                platform.python_version(),
            ],
            1.0,
        )
        yield info

    def _partition_families(self, group: str) -> Iterator[Metric]:
        labels = ["group", "topic", "partition"]
        committed = GaugeMetricFamily(
            "streamer_committed_offset", "Committed offset (next to read).", labels=labels
        )
        last_commit = GaugeMetricFamily(
            "streamer_last_commit_timestamp_seconds",
            "When the broker last acknowledged a commit.",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "streamer_consumer_lag_records", "High watermark minus the next offset to process.", labels=labels
        )
        lag_seconds = GaugeMetricFamily(
            "streamer_consumer_lag_seconds",
            "Age of the oldest unprocessed record; 0 when caught up.",
            labels=labels,
        )
        at_risk = GaugeMetricFamily(
            "streamer_work_at_risk_records",
            "Records processed since the last commit: what a crash now would re-read.",
            labels=labels,
        )
        paused = GaugeMetricFamily(
            "streamer_partition_paused", "1 while the partition is paused.", labels=labels
        )
        map_chars = GaugeMetricFamily(
            "streamer_offset_map_chars",
            "Characters of the last commit's map of offsets finished out of order (concurrency > 1).",
            labels=labels,
        )
        now = time.time()
        partitions = self._worker.partitions()
        for (topic, partition), state in partitions:
            values = [group, topic, str(partition)]
            if state.acked_offset is not None:
                committed.add_metric(values, state.acked_offset)
            if state.acked_at is not None:
                last_commit.add_metric(values, state.acked_at)
            # Before the first commit, everything processed in this assignment would be re-read.
            at_risk.add_metric(values, state.at_risk())
            paused.add_metric(values, 1.0 if state.paused else 0.0)
            map_chars.add_metric(values, len(state.map_text))
            behind, seconds = state.lag(), state.lag_seconds(now)
            if behind is not None and seconds is not None:
                lag.add_metric(values, behind)
                lag_seconds.add_metric(values, seconds)
        yield from (committed, last_commit, lag, lag_seconds, at_risk, paused, map_chars)
        yield _gauge(
            "streamer_assigned_partitions", "Partitions assigned to this worker.", group, len(partitions)
        )

    def _output_families(self, group: str) -> Iterator[Metric]:
        stats = self._worker.stats
        outputs = CounterMetricFamily(
            "streamer_outputs", "Outputs acknowledged by the broker, by topic.", labels=["group", "topic"]
        )
        for topic, count in list(stats.outputs.items()):
            outputs.add_metric([group, topic], count)
        yield outputs
        yield _counter(
            "streamer_output_errors",
            "Outputs the broker never acknowledged (their inputs failed and were parked).",
            group,
            stats.output_errors,
        )
        yield _counter(
            "streamer_output_waits",
            "Times a handler's output waited for room in the producer (backpressure).",
            group,
            stats.output_waits,
        )
        latency = HistogramMetricFamily(
            "streamer_output_delivery_seconds", "Output produce to acknowledgement.", labels=["group"]
        )
        latency.add_metric([group], stats.output_seconds.cumulative(), stats.output_seconds.sum)
        yield latency
        transactions = CounterMetricFamily(
            "streamer_transactions", "Exactly-once transactions, by result.", labels=["group", "result"]
        )
        transactions.add_metric([group, "committed"], stats.transactions)
        transactions.add_metric([group, "aborted"], stats.transactions_aborted)
        yield transactions
        duration = HistogramMetricFamily(
            "streamer_transaction_duration_seconds",
            "Exactly-once: a transaction's life, begin to committed.",
            labels=["group"],
        )
        duration.add_metric([group], stats.transaction_seconds.cumulative(), stats.transaction_seconds.sum)
        yield duration


def _gauge(name: str, doc: str, group: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["group"])
    family.add_metric([group], value if math.isfinite(value) else 0.0)
    return family


def _counter(name: str, doc: str, group: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["group"])
    family.add_metric([group], value)
    return family


#: Headers of the status page: never cached, and nothing loaded but the page itself.
_STATUS_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
)


class HealthServer:
    """Serves /metrics, /healthz, /readyz and the status page (/, /status.json) from a daemon thread.

    /healthz is liveness, /readyz readiness; the status page is ``streamer.status``.
    """

    def __init__(self, worker: Worker, settings: MetricsSettings, max_poll_interval_s: float) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(WorkerCollector(worker))
        self._worker = worker
        self._settings = settings
        self._max_poll_interval_s = max_poll_interval_s
        self._server: ThreadingHTTPServer | None = None
        self.port: int | None = None
        self._version = streamer_version()

    def live(self) -> tuple[bool, str]:
        """Alive while the loop has polled within max.poll.interval.ms; never fails on lag or outages."""
        since = time.monotonic() - self._worker.stats.last_poll
        if since > self._max_poll_interval_s:
            return (
                False,
                f"the loop has not polled for {since:.0f} s "
                f"(max.poll.interval {self._max_poll_interval_s:.0f} s)",
            )
        return True, f"polled {since:.1f} s ago"

    def ready(self) -> tuple[bool, str]:
        """Ready once the worker has joined its consumer group."""
        if self._worker.joined and not self._worker.stop_requested:
            return True, "joined the group"
        return False, "stopping" if self._worker.stop_requested else "not yet joined the group"

    def status(self, path: str) -> tuple[bytes, str]:
        """The status page (``/``) or its JSON (``/status.json``), and its content type."""
        status = snapshot(self._worker, version=self._version)
        if path == "/status.json":
            return render_json(status).encode(), "application/json"
        return render_html(status).encode(), "text/html; charset=utf-8"

    def start(self) -> None:
        """Bind and serve; if the port is busy, log it and run on without the endpoint."""
        health = self
        hint = (
            b"try /, /metrics, /healthz or /readyz\n"
            if self._settings.status_page
            else b"try /metrics, /healthz or /readyz\n"
        )

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(
                        200, generate_latest(health.registry), "text/plain; version=0.0.4; charset=utf-8"
                    )
                elif path in ("/healthz", "/readyz"):
                    ok, why = health.live() if path == "/healthz" else health.ready()
                    self._reply(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
                elif path in STATUS_PATHS and health._settings.status_page:
                    self._reply(200, *health.status(path), headers=_STATUS_HEADERS)
                else:
                    self._reply(404, hint, "text/plain; charset=utf-8")

            def _reply(
                self, code: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
                """Scrapes are not worth a log line each."""

        try:
            self._server = ThreadingHTTPServer((self._settings.host, self._settings.port), Handler)
        except OSError as exc:
            log.error(
                "metrics endpoint disabled: cannot bind",
                host=self._settings.host,
                port=self._settings.port,
                error=str(exc),
            )
            return
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="streamer-metrics", daemon=True).start()
        log.info(
            "metrics endpoint serving",
            host=self._settings.host,
            port=self.port,
            paths=["/metrics", "/healthz", "/readyz", *(STATUS_PATHS if self._settings.status_page else ())],
        )

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

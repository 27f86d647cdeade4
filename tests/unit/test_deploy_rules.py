"""The Prometheus rules and the Grafana dashboard under deploy/: valid, tested, and in step with the
metrics streamer exposes.

``promtool`` (Debian's ``prometheus`` package, installed by ``dev/bootstrap``) checks the rule files
and runs their unit tests in ``deploy/prometheus/tests``. Without it those tests skip on a
developer's machine and fail when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "streamer.json"
GRAFANA_PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"

#: Every sample name a worker's /metrics serves (streamer.metrics.WorkerCollector): counters with
#: their _total suffix, histograms as _bucket/_sum/_count. Keep in step with the collector; the
#: observability integration test compares this with a live worker's exposition.
COUNTERS = {
    "streamer_records_total",
    "streamer_reprocessed_records_total",
    "streamer_commits_total",
    "streamer_rebalances_total",
    "streamer_dedup_contested_total",
    "streamer_dedup_errors_total",
    "streamer_dedup_store_resets_total",
    "streamer_records_without_dedup_total",
    "streamer_offset_resets_total",
    "streamer_handler_overruns_total",
    "streamer_outputs_total",
    "streamer_output_errors_total",
    "streamer_output_waits_total",
    "streamer_transactions_total",
}
HISTOGRAMS = {
    "streamer_handler_duration_seconds",
    "streamer_commit_duration_seconds",
    "streamer_output_delivery_seconds",
    "streamer_transaction_duration_seconds",
}
GAUGES = {
    "streamer_commit_interval_records",
    "streamer_commit_interval_seconds",
    "streamer_committed_offset",
    "streamer_last_commit_timestamp_seconds",
    "streamer_consumer_lag_records",
    "streamer_consumer_lag_seconds",
    "streamer_work_at_risk_records",
    "streamer_partition_paused",
    "streamer_assigned_partitions",
    "streamer_dedup_outage",
    "streamer_last_poll_timestamp_seconds",
    "streamer_group_joined",
    "streamer_handler_running_seconds",
    "streamer_build_info",
    "streamer_checkpoint_blocked",
    "streamer_records_in_flight",
    "streamer_records_waiting",
    "streamer_offset_map_chars",
}
EXPOSED_METRICS = frozenset(
    COUNTERS | GAUGES | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
_METRIC = re.compile(r"\bstreamer_[a-z_]+[a-z]\b")
_RECORDED = re.compile(r"\bstreamer:[a-z0-9_:]+[a-z0-9]\b")
_SEVERITIES = {"critical", "warning", "info"}


# -- reading the files --------------------------------------------------------------------------


@dataclass
class Rule:
    """One recording or alerting rule."""

    file: Path
    group: str
    kind: str  # "record" or "alert"
    name: str
    expr: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def load_rules(paths: list[Path] | None = None) -> list[Rule]:
    """Every rule of the given rule files (default: deploy/prometheus/rules/*.yml), in file order."""
    rules: list[Rule] = []
    for path in paths or RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                kind = "record" if "record" in rule else "alert"
                rules.append(
                    Rule(
                        path,
                        group["name"],
                        kind,
                        rule[kind],
                        str(rule["expr"]),
                        rule.get("labels") or {},
                        rule.get("annotations") or {},
                    )
                )
    return rules


def load_rule_tests() -> list[dict[str, Any]]:
    """The promtool test files, parsed."""
    return [yaml.safe_load(path.read_text()) for path in RULE_TESTS]


def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data: rows are skipped, panels inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [
        (panel.get("title", "?"), target.get("expr", ""))
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana ``$name`` / ``${name}`` variables; an unknown one is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


def metric_names(text: str) -> set[str]:
    """streamer_* metric names mentioned in ``text``."""
    return set(_METRIC.findall(text))


def recorded_names(text: str) -> set[str]:
    """streamer:* recording-rule names mentioned in ``text``."""
    return set(_RECORDED.findall(text))


# -- promtool -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    """Path of promtool; skip without it (fail in CI)."""
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool is not installed (Debian package 'prometheus'; dev/bootstrap installs it): "
            "cannot check the rules in deploy/prometheus"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    """Run a command in the repository and capture its output."""
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_the_rule_files(promtool: str) -> None:
    result = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool and these tests see the same rules.
    found = {
        Path(path).name: int(count)
        for path, count in re.findall(r"Checking (\S+)\n\s+SUCCESS: (\d+) rules found", result.stdout)
    }
    parsed: dict[str, int] = {}
    for rule in load_rules():
        parsed[rule.file.name] = parsed.get(rule.file.name, 0) + 1
    assert found == parsed, result.stdout


def test_promtool_unit_tests_of_the_rules_pass(promtool: str) -> None:
    assert RULE_TESTS, "no rule tests in deploy/prometheus/tests"
    result = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_promtool_checks_the_example_prometheus_config(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the rules ----------------------------------------------------------------------------------


def test_rule_files_define_the_main_recording_rules() -> None:
    records = {rule.name for rule in load_rules() if rule.kind == "record"}
    assert records >= {
        "streamer:records:rate1m",
        "streamer:consumer_lag_records:sum",
        "streamer:consumer_lag_records:max",
        "streamer:consumer_lag_seconds:max",
        "streamer:work_at_risk_records:sum",
        "streamer:commits:rate1m",
        "streamer:commit_duration_seconds:p99",
        "streamer:handler_duration_seconds:p99",
    }


def test_every_alert_has_a_severity_and_the_on_call_annotations() -> None:
    alerts = [rule for rule in load_rules() if rule.kind == "alert"]
    assert {rule.name for rule in alerts} >= {
        "StreamerLagGrowing",
        "StreamerTimeLagHigh",
        "StreamerStalled",
        "StreamerCommitRewind",
        "StreamerDeadLetterRate",
        "StreamerCommitErrors",
        "StreamerDedupOutage",
        "StreamerWorkerDown",
    }
    for rule in alerts:
        assert rule.labels.get("severity") in _SEVERITIES, f"{rule.name}: severity label"
        for key in ("summary", "description", "runbook"):
            assert rule.annotations.get(key), f"{rule.name}: no {key} annotation"
        assert rule.annotations["runbook"] == f"README.md#{rule.name.lower()}", f"{rule.name}: runbook anchor"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases: dict[str, set[bool]] = {}
    for suite in load_rule_tests():
        for test in suite["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for name in sorted({rule.name for rule in load_rules() if rule.kind == "alert"}):
        assert cases.get(name) == {True, False}, (
            f"{name}: deploy/prometheus/tests needs a case where it fires and one where it does not "
            f"(found: {sorted('fires' if f else 'silent' for f in cases.get(name, set()))})"
        )


def test_every_recording_rule_is_unit_tested() -> None:
    tested = {
        recorded
        for suite in load_rule_tests()
        for test in suite["tests"]
        for case in test.get("promql_expr_test", [])
        for recorded in recorded_names(case["expr"])
    }
    untested = {rule.name for rule in load_rules() if rule.kind == "record"} - tested
    assert not untested, f"recording rules without a promql_expr_test: {sorted(untested)}"


def test_rules_read_only_metrics_streamer_exposes() -> None:
    rules = load_rules()
    records = {rule.name for rule in rules if rule.kind == "record"}
    for rule in rules:
        unknown = metric_names(rule.expr) - EXPOSED_METRICS
        assert not unknown, f"{rule.name} reads metrics streamer does not expose: {sorted(unknown)}"
        undefined = recorded_names(rule.expr) - records
        assert not undefined, f"{rule.name} reads undefined recording rules: {sorted(undefined)}"


def test_rule_tests_feed_only_metrics_streamer_exposes() -> None:
    for path, suite in zip(RULE_TESTS, load_rule_tests(), strict=True):
        names = {
            re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", series["series"]).group(0)  # type: ignore[union-attr]
            for test in suite["tests"]
            for series in test["input_series"]
        }
        unknown = names - EXPOSED_METRICS - {"up"}
        assert not unknown, f"{path.name} feeds series streamer does not expose: {sorted(unknown)}"


# -- the dashboard ------------------------------------------------------------------------------


def test_dashboard_is_valid_json_with_datasource_group_and_topic_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "streamer"
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("group", "topic"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
        assert variables[name]["query"]["query"] == variables[name]["definition"]
    assert "$group" in variables["topic"]["definition"], "topic choices follow the chosen groups"


def test_every_dashboard_panel_has_a_description_and_queries() -> None:
    dashboard = load_dashboard()
    panels = list(dashboard_panels(dashboard))
    assert len(panels) >= 12
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        title = panel.get("title", "?")
        assert len(panel.get("description", "")) >= 40, (
            f"panel {title!r}: describe what it means and what to do"
        )
        targets = panel.get("targets", [])
        assert targets, f"panel {title!r} has no query"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {title!r}: a target without expr"
            assert target["datasource"]["uid"] == "${datasource}", f"panel {title!r}: datasource"
            assert "$group" in target["expr"], f"panel {title!r}: {target['expr']} ignores $group"
        assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_dashboard_reads_only_exposed_metrics_and_defined_recording_rules() -> None:
    dashboard = load_dashboard()
    records = {rule.name for rule in load_rules() if rule.kind == "record"}
    texts = [(title, expr) for title, expr in dashboard_exprs(dashboard)]
    texts += [(f"variable {v['name']}", v.get("definition", "")) for v in dashboard["templating"]["list"]]
    texts += [(f"annotation {a['name']}", a.get("expr", "")) for a in dashboard["annotations"]["list"]]
    # The descriptions name metrics and rules too: they must not send anyone looking for a ghost.
    texts += [(f"{p['title']} (description)", p["description"]) for p in dashboard_panels(dashboard)]
    for title, text in texts:
        unknown = metric_names(text) - EXPOSED_METRICS - {name.removesuffix("_total") for name in COUNTERS}
        assert not unknown, f"{title}: streamer does not expose {sorted(unknown)}"
        undefined = recorded_names(text) - records
        assert not undefined, f"{title}: recording rules not in deploy/prometheus/rules: {sorted(undefined)}"


def test_dashboard_queries_use_only_known_grafana_variables() -> None:
    known = {"group": "g", "topic": "t", "__rate_interval": "1m", "__interval": "15s", "datasource": "x"}
    for title, expr in dashboard_exprs(load_dashboard()):
        try:
            substitute(expr, known)
        except KeyError as exc:
            pytest.fail(f"panel {title!r}: {exc}")


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    provider = (GRAFANA_PROVISIONING / "dashboards" / "streamer.yml").read_text()
    assert re.search(r"^\s+type: file$", provider, re.M)
    assert re.search(r"^\s+path: /var/lib/grafana/dashboards\s*$", provider, re.M)
    datasource = (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s+type: prometheus$", datasource, re.M)
    assert re.search(r"^\s+url: http", datasource, re.M)

"""Fixtures of the chaos suite: a seed per scenario, the services outages may stop, the summary table.

``tests/conftest.py`` marks every test here ``chaos`` and (unless marked ``unit``) ``integration``.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import REPO, DevServices, delete_keys, stale_private_services
from tests.chaos.scenario import Scenario

#: The rows of the summary table, one per scenario run in this session.
_ROWS = pytest.StashKey[list[dict[str, str]]]()
#: The outcome of a test's call phase ("passed", "failed", "skipped").
_OUTCOME = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember how each chaos test's call phase ended, for the summary table."""
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures of every chaos scenario of the session as one table (no ``-s`` needed)."""
    rows = terminalreporter.config.stash.get(_ROWS, [])
    if not rows:
        return
    columns = [c for c in dict.fromkeys(key for row in rows for key in row) if c != "verdict"] + ["verdict"]
    widths = {c: max(len(c), *(len(row.get(c, "")) for row in rows)) for c in columns}
    terminalreporter.write_sep("=", "chaos figures")
    terminalreporter.write_line("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        terminalreporter.write_line("  ".join(row.get(c, "").ljust(widths[c]) for c in columns))
    terminalreporter.write_line(
        f"bounds: re-read per kill and partition <= {_bounds()}; CHAOS_SEED=<seed> replays a schedule"
    )


def _bounds() -> str:
    from tests.chaos.scenario import CONCURRENCY, DEDUP_WINDOW, EVERY_RECORDS, POLL_BATCH_SIZE, REREAD_BOUND

    return (
        f"{REREAD_BOUND} (every_records {EVERY_RECORDS} + 2 x poll_batch_size {POLL_BATCH_SIZE}), "
        f"{REREAD_BOUND + CONCURRENCY} with concurrency {CONCURRENCY} (+ the records in flight); "
        f"dedup window per kill <= {DEDUP_WINDOW}"
    )


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[Scenario]:
    """The scenario's seed (``CHAOS_SEED``, else random; printed) and its row in the summary table."""
    fixed = os.environ.get("CHAOS_SEED")
    seed = int(fixed) if fixed else random.SystemRandom().randrange(2**32)
    name = request.node.name.removeprefix("test_")
    print(f"chaos seed of {name}: {seed} (rerun with CHAOS_SEED={seed})")
    current = Scenario(name, seed)
    yield current
    outcome = request.node.stash.get(_OUTCOME, "error")
    row = {"scenario": name, "seed": str(seed)}
    if current.result is not None:
        row.update(current.result.row())
    row["notes"] = "; ".join(f"{k} {v}" for k, v in current.notes.items())
    verdict = {"passed": "PASS", "failed": "FAIL"}.get(outcome, outcome.upper())
    if current.result is None and outcome != "passed":
        verdict += " (aborted before the check)"
    elif current.violations:
        verdict += f" ({len(current.violations)} violations)"
    row["verdict"] = verdict
    request.config.stash.setdefault(_ROWS, []).append(row)


@pytest.fixture(scope="session")
def chaos_services(kafka_bootstrap: str, redis_url: str) -> Iterator[DevServices]:
    """Kafka and Redis that a scenario may stop and start, managed with ``dev/services``.

    A private pair (own directory under ``<dev dir>/chaos/``, own ports), so that an outage never
    reaches the shared services other test runs use; pairs left by killed runs are stopped first.
    ``CHAOS_SHARED_SERVICES=1`` uses the shared dev services instead. (The shared ones are required
    first all the same: the private pair reuses their Kafka jars.)
    """
    if os.environ.get("CHAOS_SHARED_SERVICES") == "1":
        yield DevServices.shared()
        return
    dev = Path(os.environ.get("STREAMER_DEV_DIR") or REPO / ".dev")
    parent = dev / "chaos"
    for stale in stale_private_services(parent):
        if (stale / "services.json").exists():
            DevServices.load_private(stale).down("kafka,redis")
        shutil.rmtree(stale, ignore_errors=True)
    services = DevServices.create_private(
        parent / f"{os.getpid()}-{uuid.uuid4().hex[:6]}", dev / "kafka-libs"
    )
    try:
        services.up("kafka,redis")
        yield services
    finally:
        services.down("kafka,redis")
        shutil.rmtree(services.root, ignore_errors=True)


@pytest.fixture
def dedup_namespace(redis_url: str, unique_name: str) -> Iterator[str]:
    """A dedup namespace of this test on the shared Redis; its keys are deleted at teardown."""
    namespace = f"chaos-{unique_name}"
    yield namespace
    delete_keys(redis_url, f"{namespace}:*")

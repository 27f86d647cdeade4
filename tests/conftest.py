"""Shared fixtures: the dev services (Kafka, Redis), unique names, throwaway topics and groups.

Integration tests use the real services from ``dev/services``. If one does not answer, the
fixture runs ``dev/services up`` once; if it still does not answer, the test is skipped, or fails
when the environment variable CI is set, so that CI never passes by skipping.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.kafka import GROUP_PROTOCOLS, create_topic, delete_topics, kafka_unavailable_reason
from tests.support.redis import redis_unavailable_reason

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SERVICES_UP_TIMEOUT_S = 900  # the first run fetches Kafka's jars with Maven

TopicFactory = Callable[..., str]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests under tests/integration/ and tests/chaos/ ``integration``, all others ``unit``.

    Tests under tests/chaos/ are also marked ``chaos``; a test marked ``unit`` or ``integration``
    explicitly keeps that mark (the chaos suite's checker tests are pure logic).
    """
    for item in items:
        chaos = item.path.is_relative_to(TESTS / "chaos")
        if chaos:
            item.add_marker(pytest.mark.chaos)
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        integration = chaos or item.path.is_relative_to(TESTS / "integration")
        item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)


# --- services -------------------------------------------------------------------------------


@functools.cache
def start_services() -> str:
    """Run ``dev/services up`` (once per session) and return a one-line account of how it went."""
    command = [sys.executable, str(REPO / "dev" / "services"), "up"]
    try:
        result = subprocess.run(
            command,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=SERVICES_UP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"`dev/services up` did not finish within {SERVICES_UP_TIMEOUT_S}s"
    if result.returncode == 0:
        return "`dev/services up` succeeded"
    tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
    return f"`dev/services up` exited {result.returncode}: {' | '.join(tail)}"


def require_service(name: str, probe: Callable[[], str | None]) -> None:
    """Return if ``probe`` finds the service answering (starting services once); else skip/fail."""
    if probe() is None:
        return
    attempt = start_services()
    reason = probe()
    if reason is None:
        return
    message = (
        f"{name} is not available ({reason}; {attempt}). "
        f"Start the dev services with `dev/services up` and check `dev/services status`."
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of the dev Kafka broker, known to answer."""
    bootstrap = f"127.0.0.1:{os.environ.get('STREAMER_DEV_KAFKA_PORT') or 9092}"
    require_service(f"Kafka at {bootstrap}", lambda: kafka_unavailable_reason(bootstrap))
    return bootstrap


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of database 0 of the dev Redis, known to answer."""
    url = f"redis://127.0.0.1:{os.environ.get('STREAMER_DEV_REDIS_PORT') or 6379}/0"
    require_service(f"Redis at {url}", lambda: redis_unavailable_reason(url))
    return url


# --- names, topics, groups ----------------------------------------------------------------------


def make_unique_name(prefix: str, test_name: str) -> str:
    """Return ``prefix-<test name>-<8 hex>``, safe as a Kafka topic, group or Redis key name."""
    sanitized = re.sub(r"[^A-Za-z0-9-]+", "-", test_name).strip("-")[:40]
    return f"{prefix}-{sanitized}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name unique to this test run, derived from the test's name."""
    return make_unique_name("t", request.node.name)


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """Create fresh topics, ready for use: ``topic_factory(partitions=3, name=None) -> name``.

    Topics created are deleted at teardown; a failed deletion does not fail the test.
    """
    created: list[str] = []

    def factory(partitions: int = 3, name: str | None = None, *, replication: int = 1) -> str:
        topic = name or make_unique_name("t", request.node.name)
        created.append(topic)
        return create_topic(kafka_bootstrap, topic, partitions, replication=replication)

    yield factory
    for failure in delete_topics(kafka_bootstrap, created):
        print(f"topic_factory: could not delete {failure}", file=sys.stderr)


@pytest.fixture
def topic(topic_factory: TopicFactory) -> str:
    """A fresh 3-partition topic."""
    return topic_factory(3)


@pytest.fixture(params=GROUP_PROTOCOLS)
def group_protocol(request: pytest.FixtureRequest) -> str:
    """``[kafka] group_protocol``: a test asking for it runs under the classic protocol and KIP-848's."""
    protocol: str = request.param
    return protocol


@pytest.fixture
def group_id(request: pytest.FixtureRequest) -> str:
    """A consumer group id unique to this test."""
    return make_unique_name("g", request.node.name)

"""The status page of a live worker: the real broker, a ``streamer run`` process, a real browser.

The worker (``tests/integration/apps/status_app.py``) runs with a SASL password in
``[kafka.client]`` and a Redis URL with a password in its settings, and reads records with a
recognisable payload; one poison record is parked. ``/status.json`` and ``/`` must show its
partitions, offsets and the parked record, and neither secret nor payload. The browser test drives
headless Chromium with selenium: the page must show the partitions and their committed offsets,
update by itself (no reload) when more records arrive, and it leaves a screenshot in
``.dev/screenshots/status-page.png`` (``docs/status-page.png`` in the README is a copy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, Producer

from tests.support import wait_for
from tests.support.kafka import end_offsets

REPO = Path(__file__).resolve().parents[2]
APP = "tests.integration.apps.status_app:app"
SCREENSHOT = REPO / ".dev" / "screenshots" / "status-page.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SASL_PASSWORD = "sasl-Pa55-d0-not-show"  # noqa: S105 - a made-up secret the page must not show
REDIS_PASSWORD = "redis-Pa55-d0-not-show"  # noqa: S105 - likewise
PAYLOAD = "PAYLOAD-4111-1111-1111-1111"
PARTITIONS = 3
EVERY_RECORDS = 10
START_TIMEOUT_S = 30.0
#: Commits land within a second (every_seconds); high watermarks arrive with statistics (1 s).
SETTLE_TIMEOUT_S = 20.0


def produce(bootstrap: str, topic: str, values: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """Write each ``(partition, value)``; return the (partition, offset) of each, in order."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    placed: list[tuple[int, int] | None] = [None] * len(values)
    errors: list[str] = []

    def report(i: int) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            partition, offset = msg.partition(), msg.offset()
            if err is not None or partition is None or offset is None:
                errors.append(str(err))
            else:
                placed[i] = (partition, offset)

        return on_delivery

    for i, (partition, value) in enumerate(values):
        producer.produce(topic, value=value, partition=partition, on_delivery=report(i))
    assert producer.flush(30) == 0, "records still undelivered after 30 s"
    assert not errors, errors
    return [p for p in placed if p is not None]


def records(n: int, start: int = 0) -> list[tuple[int, bytes]]:
    """``n`` records with the recognisable payload, round-robin over the partitions."""
    return [(i % PARTITIONS, f'{{"card": "{PAYLOAD}", "n": {i}}}'.encode()) for i in range(start, start + n)]


@dataclass
class LiveWorker:
    """A ``streamer run`` of the status app and the port it serves on."""

    proc: subprocess.Popen[bytes]
    log: Path
    topic: str
    group: str
    port: int = 0

    def describe(self) -> str:
        """State and the end of its log, for failure messages."""
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        tail = self.log.read_text(errors="replace").splitlines()[-15:] if self.log.exists() else []
        return f"worker ({state}) on port {self.port}; log tail:\n" + "\n".join(tail)

    def serving_port(self) -> int:
        """The port it logged (metrics port 0: any free one), or 0 before it did."""
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited: {self.describe()}")
        for line in self.log.read_text(errors="replace").splitlines():
            if '"metrics endpoint serving"' in line:
                return int(json.loads(line)["port"])
        return 0

    @property
    def url(self) -> str:
        """The status page."""
        return f"http://127.0.0.1:{self.port}/"

    def get(self, path: str) -> str:
        """The body of ``path`` on the metrics port."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            body: str = resp.read().decode()
            return body

    def status(self) -> dict[str, Any]:
        """``/status.json`` now."""
        body: dict[str, Any] = json.loads(self.get("/status.json"))
        return body

    def wait_status(self, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Wait until ``check`` holds for ``/status.json``; return it."""
        last: list[dict[str, Any]] = [{}]

        def ok() -> bool:
            last[0] = self.status()
            return check(last[0])

        wait_for(
            ok, SETTLE_TIMEOUT_S, interval=0.2, message=lambda: f"{what}; last {last[0]}; {self.describe()}"
        )
        return last[0]


def committed(status: dict[str, Any]) -> dict[int, int | None]:
    """Committed offset per partition, from ``/status.json``."""
    return {p["partition"]: p["committed"] for p in status["partitions"]}


def caught_up(ends: dict[int, int]) -> Callable[[dict[str, Any]], bool]:
    """Every partition assigned, committed up to ``ends`` and its end offset known."""

    def check(status: dict[str, Any]) -> bool:
        parts = status["partitions"]
        return committed(status) == ends and all(p["end"] == ends[p["partition"]] for p in parts)

    return check


@pytest.fixture
def live_worker(
    kafka_bootstrap: str, topic_factory: Callable[..., str], group_id: str, tmp_path: Path
) -> Iterator[LiveWorker]:
    """A status-app worker on a fresh topic (and its dead-letter topic), serving on a free port."""
    topic = topic_factory(PARTITIONS)
    topic_factory(PARTITIONS, name=f"{topic}.dlq")  # created here, so that teardown deletes it
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(
        {
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "STREAMER_KAFKA__GROUP_ID": group_id,
            "STREAMER_KAFKA__CLIENT": json.dumps(
                {"statistics.interval.ms": 1000, "sasl.password": SASL_PASSWORD}
            ),
            "STREAMER_DEDUP__REDIS_URL": f"redis://app:{REDIS_PASSWORD}@127.0.0.1:6379/0",
            "STREAMER_COMMIT__EVERY_RECORDS": str(EVERY_RECORDS),
            "STREAMER_COMMIT__EVERY_SECONDS": "0.5",
            "STREAMER_METRICS__HOST": "127.0.0.1",
            "STREAMER_METRICS__PORT": "0",
            "STREAMER_LOG_FORMAT": "json",
            "STATUS_APP_TOPIC": topic,
        }
    )
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", APP, "--no-progress"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    worker = LiveWorker(proc, log, topic, group_id)
    try:
        worker.port = wait_for(worker.serving_port, START_TIMEOUT_S, interval=0.1, message=worker.describe)
        yield worker
    finally:
        proc.kill()
        proc.wait(timeout=10)


def assert_shows_no_secret_or_payload(text: str) -> None:
    assert SASL_PASSWORD not in text
    assert REDIS_PASSWORD not in text
    assert PAYLOAD not in text
    assert "poison" not in text


def test_status_json_and_page_show_what_the_worker_owns_and_where_it_stands(
    live_worker: LiveWorker, kafka_bootstrap: str
) -> None:
    w = live_worker
    produce(kafka_bootstrap, w.topic, records(60))
    [(poison_partition, poison_offset)] = produce(
        kafka_bootstrap, w.topic, [(1, f"poison {PAYLOAD}".encode())]
    )
    ends = end_offsets(kafka_bootstrap, w.topic)

    status = w.wait_status(caught_up(ends), f"waiting for committed offsets and end offsets {ends}")

    assert status["group"] == w.group
    assert status["state"] == "running"
    assert status["member_id"], "the consumer's member id once in the group"
    assert status["topics"] == [w.topic]
    assert status["version"]
    assert status["uptime_seconds"] > 0
    for p in status["partitions"]:
        assert (p["lag"], p["lag_seconds"], p["at_risk"], p["in_flight"]) == (0, 0.0, 0, 0), p
        assert p["paused_for"] == [], p
    assert status["records"]["ok"] == 60
    assert status["records"]["dead_lettered"] == 1
    [parked] = status["dead_letters"]
    assert (parked["topic"], parked["partition"], parked["offset"]) == (
        w.topic,
        poison_partition,
        poison_offset,
    )
    assert parked["dead_letter_topic"] == f"{w.topic}.dlq"
    assert parked["reason"] == "PermanentError: ValueError"
    assert any(e["kind"] == "record" and e["offset"] == poison_offset for e in status["errors"])
    commit = status["commit"]
    assert (commit["policy"], commit["every_records"], commit["every_seconds"]) == (
        "interval",
        EVERY_RECORDS,
        0.5,
    )
    assert commit["commits"] >= 1
    assert commit["per_second"] > 0
    assert commit["last_at"] is not None

    page = w.get("/")
    assert f'<tr data-tp="{w.topic}/{poison_partition}">' in page
    assert status["member_id"] in page
    assert_shows_no_secret_or_payload(page)
    assert_shows_no_secret_or_payload(w.get("/status.json"))


# -- the browser ------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium under selenium; fails under CI when it is missing, else skips."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (the dev extra)")
    if missing:
        message = f"the browser test needs {', '.join(missing)} (dev/bootstrap installs them)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        # Without these Chromium keeps calling home, which this closed network refuses.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_in_a_browser_shows_the_partitions_and_updates_by_itself(
    live_worker: LiveWorker, kafka_bootstrap: str, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    w = live_worker
    produce(kafka_bootstrap, w.topic, records(90))
    produce(kafka_bootstrap, w.topic, [(2, f"poison {PAYLOAD}".encode())])
    ends = end_offsets(kafka_bootstrap, w.topic)
    w.wait_status(caught_up(ends), f"waiting for committed offsets {ends}")

    def committed_cells(driver: Any) -> dict[str, str]:
        rows = driver.find_elements(By.CSS_SELECTOR, "#partitions tr[data-tp]")
        cells = {
            r.get_attribute("data-tp"): r.find_element(By.CSS_SELECTOR, "td.committed").text for r in rows
        }
        return cells if len(cells) == PARTITIONS else {}

    browser.get(w.url)
    shown = WebDriverWait(browser, SETTLE_TIMEOUT_S).until(committed_cells)
    assert shown == {f"{w.topic}/{p}": f"{ends[p]:,}" for p in range(PARTITIONS)}
    assert w.group in browser.title
    # A reload would clear this; the page must update itself in place.
    browser.execute_script("window.statusPageNotReloaded = true;")

    produce(
        kafka_bootstrap, w.topic, [(0, f'{{"card": "{PAYLOAD}", "late": {i}}}'.encode()) for i in range(25)]
    )
    later = end_offsets(kafka_bootstrap, w.topic)
    assert later[0] == ends[0] + 25
    wait = WebDriverWait(browser, SETTLE_TIMEOUT_S)
    wait.until(lambda d: committed_cells(d).get(f"{w.topic}/0") == f"{later[0]:,}")
    assert browser.execute_script("return window.statusPageNotReloaded === true;"), "the page was reloaded"
    assert "PermanentError: ValueError" in browser.find_element(By.ID, "dead-letters").text
    assert_shows_no_secret_or_payload(browser.page_source)

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.find_element(By.TAG_NAME, "body")  # rendered
    assert browser.save_screenshot(str(SCREENSHOT)), f"could not write {SCREENSHOT}"

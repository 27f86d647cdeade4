"""``dev/services down`` with a subset stops that subset only: the outage scenarios stop Redis alone
or Kafka alone, and a Redis outage that also took Kafka away would prove nothing."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit  # no services: fake ones, processes that only sleep

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on: `down` finds the fake services' ports closed at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def services() -> Iterator[ModuleType]:
    """``dev/services`` imported as a module (it is a script without a .py suffix)."""
    name = "dev_services_under_test"
    loader = SourceFileLoader(name, str(REPO / "dev" / "services"))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def layout(services: ModuleType, root: Path, subset: str, monkeypatch: pytest.MonkeyPatch) -> object:
    """The layout ``dev/services`` builds from the environment, with free ports and ``subset``."""
    monkeypatch.setenv("STREAMER_DEV_DIR", str(root))
    monkeypatch.setenv("STREAMER_DEV_SERVICES", subset)
    monkeypatch.setenv("STREAMER_DEV_KAFKA_PORT", str(free_port()))
    monkeypatch.setenv("STREAMER_DEV_REDIS_PORT", str(free_port()))
    monkeypatch.setenv("STREAMER_DEV_PROMETHEUS_PORT", str(free_port()))
    monkeypatch.delenv("STREAMER_DEV_KAFKA_NODES", raising=False)
    monkeypatch.delenv("STREAMER_DEV_KAFKA_NODE_ID", raising=False)
    return services.layout()


def pid_files(root: Path, names: list[str]) -> None:
    (root / "run").mkdir(parents=True)
    for name in names:
        (root / "run" / f"{name}.pid").write_text("1\n")


@pytest.mark.parametrize(
    ("subset", "stopped"),
    [
        pytest.param("redis", ["redis"], id="redis"),
        pytest.param("prometheus,redis", ["redis", "prometheus"], id="redis-prometheus"),
        # With Kafka: also the nodes an earlier `up --nodes 3` left (kafka-3 here).
        pytest.param("kafka", ["kafka-1", "kafka-3"], id="kafka"),
        pytest.param("kafka,redis,prometheus", ["kafka-1", "redis", "prometheus", "kafka-3"], id="all"),
    ],
)
def test_down_selects_the_subset_and_nothing_else(
    services: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subset: str, stopped: list[str]
) -> None:
    pid_files(tmp_path, ["kafka-1", "kafka-3", "redis", "prometheus"])
    assert services.names_to_stop(layout(services, tmp_path, subset, monkeypatch)) == stopped


def test_down_with_the_redis_subset_leaves_kafka_running(
    services: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two stand-ins started as ``dev/services`` starts services (own session, pid file each)."""
    run = tmp_path / "run"
    run.mkdir()
    procs = {
        name: subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL)
        for name in ("kafka-1", "redis")
    }
    try:
        for name, proc in procs.items():
            (run / f"{name}.pid").write_text(f"{proc.pid}\n")
        assert services.cmd_down(layout(services, tmp_path, "redis", monkeypatch)) == 0
        assert procs["redis"].wait(timeout=10) == -15  # SIGTERM
        assert procs["kafka-1"].poll() is None, "down with STREAMER_DEV_SERVICES=redis stopped Kafka"
        assert (run / "kafka-1.pid").exists()
        assert not (run / "redis.pid").exists()
        assert "dev/services: stopped" in capsys.readouterr().out
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()

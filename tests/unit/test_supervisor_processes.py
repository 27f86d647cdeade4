"""The supervisor's exit code: a worker killed by a signal counts as 128 + N, and the worst code wins.

``supervise`` runs in a subprocess of its own (it installs signal handlers), over stand-in workers:
small Python scripts that behave like ``streamer run`` on SIGTERM (see ``fake_worker``). No
broker is involved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from streamer.supervisor import exit_status, worst_exit_code
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]

#: A stand-in worker. On start it writes ``<dir>/<index>.ready``; every signal it gets is appended
#: to ``<dir>/<index>.signals``. On its first SIGTERM/SIGINT it does what FAKE_ON_STOP_<index> says:
#: ``exit:N`` exits N, ``kill:SIG`` kills itself with that signal. A second signal exits 128 + N at
#: once, as streamer's runner does.
FAKE_WORKER = """
import os, signal, sys, time
from pathlib import Path

index = os.environ["STREAMER_WORKER_INDEX"]
folder = Path(sys.argv[1])
action = os.environ.get(f"FAKE_ON_STOP_{index}", "exit:0")
got = []

def on_signal(signum, _frame):
    got.append(signum)
    with open(folder / f"{index}.signals", "a") as out:
        out.write(f"{signum}\\n")
    if len(got) > 1:
        os._exit(128 + signum)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
(folder / f"{index}.ready").write_text(str(os.getpid()))
while not got:
    signal.pause()
# Give a duplicate signal, if one is coming, the time to arrive: a real worker drains meanwhile.
deadline = time.monotonic() + 0.5
while time.monotonic() < deadline:
    time.sleep(0.05)
kind, _, arg = action.partition(":")
if kind == "kill":
    os.kill(os.getpid(), getattr(signal, arg))
sys.exit(int(arg))
"""

#: Runs ``supervise`` over two fake workers; the folder is argv[1].
SUPERVISOR = """
import sys
from streamer.supervisor import supervise
fake, folder = sys.argv[1], sys.argv[2]
sys.exit(supervise([folder], 2, 0, program=[sys.executable, fake]))
"""


def start_supervisor(folder: Path, **on_stop: str) -> subprocess.Popen[bytes]:
    """Start a supervisor of two fake workers, in a process group of its own; wait until both run."""
    fake = folder / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    env = {"PYTHONPATH": str(REPO), "STREAMER_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin"}
    env.update({f"FAKE_ON_STOP_{i}": action for i, action in on_stop.items()})
    with (folder / "supervisor.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, str(fake), str(folder)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a shell job: the test signals its whole group
        )
    wait_for(
        lambda: all((folder / f"{i}.ready").exists() for i in (0, 1)) or proc.poll() is not None,
        20,
        message=lambda: f"fake workers did not start: {(folder / 'supervisor.log').read_text()}",
    )
    assert proc.poll() is None, (folder / "supervisor.log").read_text()
    return proc


def signals_seen(folder: Path, index: int) -> list[int]:
    try:
        return [int(line) for line in (folder / f"{index}.signals").read_text().split()]
    except FileNotFoundError:
        return []


def stop(proc: subprocess.Popen[bytes], folder: Path, timeout: float = 20) -> int:
    """Wait for the supervisor to exit; on timeout kill its group and fail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError((folder / "supervisor.log").read_text()) from None


# --- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "status"),
    [(0, 0), (1, 1), (2, 2), (3, 3), (143, 143), (-9, 137), (-15, 143), (-2, 130), (-6, 134)],
)
def test_exit_status_reports_a_signal_death_as_128_plus_the_signal(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


@pytest.mark.parametrize(
    ("codes", "worst"),
    [
        ([], EXIT_OK),
        ([0, 0], EXIT_OK),
        ([0, -9], 137),
        ([-9, 0], 137),
        ([1, -15, 0], 143),
        ([EXIT_USAGE, EXIT_FAILED], EXIT_USAGE),
        ([None, 0], EXIT_OK),
        ([0, 3], 3),
    ],
)
def test_the_worst_exit_status_wins_and_a_signal_death_is_never_success(
    codes: list[int | None], worst: int
) -> None:
    assert worst_exit_code(codes) == worst


# --- a real supervisor over stand-in workers -------------------------------------------------------


def test_supervisor_exits_137_when_one_worker_is_killed_by_sigkill_and_the_other_exits_0(
    tmp_path: Path,
) -> None:
    proc = start_supervisor(tmp_path, **{"0": "exit:0", "1": "kill:SIGKILL"})
    proc.send_signal(signal.SIGTERM)
    assert stop(proc, tmp_path) == 128 + signal.SIGKILL, (tmp_path / "supervisor.log").read_text()
    log = (tmp_path / "supervisor.log").read_text()
    assert '"signal": "SIGKILL"' in log, log
    assert '"exit_codes": [0, 137]' in log, log


def test_supervisor_exits_with_a_workers_failure_code_over_another_workers_0(tmp_path: Path) -> None:
    proc = start_supervisor(tmp_path, **{"0": "exit:3", "1": "exit:0"})
    proc.send_signal(signal.SIGTERM)
    assert stop(proc, tmp_path) == 3


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_pids(folder: Path) -> list[int]:
    return [int((folder / f"{i}.ready").read_text()) for i in (0, 1)]


def test_a_signal_to_the_supervisors_process_group_reaches_each_worker_once(tmp_path: Path) -> None:
    proc = start_supervisor(tmp_path)
    pids = worker_pids(tmp_path)
    assert all(os.getpgid(pid) != proc.pid for pid in pids), "workers share the supervisor's group"
    os.killpg(proc.pid, signal.SIGTERM)
    assert stop(proc, tmp_path) == 0, (tmp_path / "supervisor.log").read_text()
    assert [signals_seen(tmp_path, i) for i in (0, 1)] == [[signal.SIGTERM], [signal.SIGTERM]]


def test_a_second_signal_to_the_supervisor_is_forwarded_as_a_second_signal(tmp_path: Path) -> None:
    """Ctrl-C twice means "now": each worker sees two SIGINTs and exits 130 at once."""
    proc = start_supervisor(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: all(signals_seen(tmp_path, i) for i in (0, 1)), 10, message="first SIGINT forwarded")
    os.killpg(proc.pid, signal.SIGINT)
    assert stop(proc, tmp_path) == 128 + signal.SIGINT
    assert [signals_seen(tmp_path, i) for i in (0, 1)] == [[signal.SIGINT] * 2] * 2


def test_workers_get_sigterm_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    proc = start_supervisor(tmp_path)
    pids = worker_pids(tmp_path)
    proc.kill()
    proc.wait()
    try:
        wait_for(lambda: not any(alive(pid) for pid in pids), 10, message="workers outlived the supervisor")
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert [signals_seen(tmp_path, i) for i in (0, 1)] == [[signal.SIGTERM], [signal.SIGTERM]]

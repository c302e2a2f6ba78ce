"""DaemonLock against real processes: a live holder refuses us, a SIGKILLed one does not."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rotator.state import AlreadyRunning, DaemonLock

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import subprocess, sys, time
from pathlib import Path
from rotator.state import DaemonLock
DaemonLock(Path(sys.argv[1])).acquire()
if sys.argv[2] == "spawn":  # an instance that outlives us, given every inheritable fd
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             close_fds=False, start_new_session=True)
    print(child.pid, flush=True)
print("locked", flush=True)
time.sleep(120)
"""

Spawn = Callable[..., "tuple[subprocess.Popen[str], list[int]]"]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Spawn]:
    """Start a process that takes the lock; everything it started is killed afterwards."""
    procs: list[subprocess.Popen[str]] = []
    extra: list[int] = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    def spawn(lock: Path, mode: str = "sleep") -> tuple[subprocess.Popen[str], list[int]]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(lock), mode],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        assert proc.stdout is not None
        pids = []
        while (line := proc.stdout.readline().strip()) != "locked":
            assert line, f"holder exited {proc.wait()} before taking the lock"
            pids.append(int(line))
        extra.extend(pids)
        return proc, pids

    yield spawn
    for pid in extra:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def test_a_live_holder_refuses_us_and_a_sigkilled_one_does_not(
    tmp_path: Path, holder: Spawn
) -> None:
    path = tmp_path / "daemon.lock"
    proc, _ = holder(path)
    lock = DaemonLock(path)
    with pytest.raises(AlreadyRunning) as info:
        lock.acquire()
    assert info.value.pid == proc.pid
    assert str(info.value) == f"rotator is already running for this state_dir (pid {proc.pid})"

    kill(proc)
    assert path.read_text().strip() == str(proc.pid)  # the stale file is still there
    lock.acquire()
    try:
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert not path.exists()


def test_instances_that_outlive_the_daemon_do_not_hold_its_lock(
    tmp_path: Path, holder: Spawn
) -> None:
    path = tmp_path / "daemon.lock"
    proc, [child] = holder(path, "spawn")
    with pytest.raises(AlreadyRunning):
        DaemonLock(path).acquire()
    kill(proc)
    os.kill(child, 0)  # still alive, and started with close_fds=False
    with DaemonLock(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_a_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "daemon.lock"
    with DaemonLock(path) as first:
        assert not os.get_inheritable(first._fd or -1)
        with pytest.raises(AlreadyRunning) as info:
            DaemonLock(path).acquire()
        assert info.value.pid == os.getpid()
        with pytest.raises(RuntimeError):
            first.acquire()
    assert not path.exists()
    with DaemonLock(path):  # free again
        pass
    DaemonLock(path).release()  # never acquired: nothing to do


def test_a_holder_that_has_not_written_its_pid_yet(tmp_path: Path) -> None:
    path = tmp_path / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(AlreadyRunning) as info:
            DaemonLock(path).acquire()
        assert info.value.pid is None
        assert "(pid unknown)" in str(info.value)
    finally:
        os.close(fd)


def test_release_keeps_a_file_that_no_longer_names_us(tmp_path: Path) -> None:
    path = tmp_path / "daemon.lock"
    lock = DaemonLock(path)
    lock.acquire()
    path.write_text("1\n")
    lock.release()
    assert path.read_text() == "1\n"
    with DaemonLock(path):  # and the lock itself was released
        pass


def test_acquire_never_keeps_a_lock_on_a_file_unlinked_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holding a lock on an unlinked file would let a second daemon lock a new one."""
    path = tmp_path / "daemon.lock"
    real_open = os.open
    opened: list[int] = []

    def racing_open(file: Path, flags: int, mode: int = 0o777) -> int:
        fd = real_open(file, flags, mode)
        if not opened:
            os.unlink(file)  # the previous owner releases right after our open
        opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", racing_open)
    with DaemonLock(path) as lock:
        assert len(opened) == 2
        assert lock._fd is not None
        assert os.path.samestat(os.fstat(lock._fd), os.stat(path))

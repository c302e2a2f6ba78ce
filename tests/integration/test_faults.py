"""Faults around the daemon: starts that fail with an OSError, a state file that cannot be
written, a closed stdout, states that must not lie, messages that say what happened.

Real daemons, real instances, real sockets, the real CLI. The faults are real too: a
component's log directory replaced by a file makes its next start fail with ENOTDIR (as
root too, unlike a chmod), a directory where the state file belongs makes its writes
fail with EISDIR."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PY, cli, component, wait_until, write_config


def get(url: str, timeout: float = 10) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def pid_of(daemon: Any, name: str) -> int | None:
    active = daemon.component(name)["active"]
    return None if active is None else int(active["pid"])


def events(daemon: Any, kind: str) -> list[dict[str, Any]]:
    path = daemon.config.parent / "state" / "events.log"
    found = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in found if e["kind"] == kind]


@contextlib.contextmanager
def log_dir_replaced_by_a_file(config: Path, name: str) -> Any:
    """The component's log directory is a regular file while inside: its starts fail
    with ENOTDIR."""
    log_dir = config.parent / "state" / "logs" / name
    aside = log_dir.with_name(name + ".aside")
    log_dir.rename(aside)
    log_dir.write_text("not a directory\n")
    try:
        yield log_dir
    finally:
        log_dir.unlink()
        aside.rename(log_dir)


# -- item 3: an OSError while starting is a failed start ----------------------------------------


def test_crash_restart_failing_with_an_oserror_backs_off_and_recovers(
    tmp_path: Path, daemon_factory
) -> None:
    spec = component(
        restart_backoff="200ms", restart_backoff_max="400ms", max_restarts=20, hold_timeout="1s"
    )
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    url = daemon.url("web")
    old = pid_of(daemon, "web")
    assert old is not None
    with log_dir_replaced_by_a_file(config, "web") as path:
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: len(events(daemon, "backoff")) >= 2, timeout=10), daemon.output()
        status = daemon.component("web")
        assert status["state"] == "starting" and status["active"] is None
        assert "Not a directory" in status["last_error"] and str(path) in status["last_error"]
    assert wait_until(lambda: daemon.component("web")["state"] == "running", timeout=10)
    assert pid_of(daemon, "web") not in (None, old)
    assert get(url) == 200
    assert daemon.proc.poll() is None


def test_crash_restart_that_never_can_start_ends_failed(tmp_path: Path, daemon_factory) -> None:
    spec = component(
        restart_backoff="100ms", restart_backoff_max="200ms", max_restarts=3, hold_timeout="1s"
    )
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    old = pid_of(daemon, "web")
    assert old is not None
    with log_dir_replaced_by_a_file(config, "web"):
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: daemon.component("web")["state"] == "failed", timeout=10)
        status = daemon.component("web")
        assert status["last_error"].startswith("gave up after 3 restarts")
        assert "Not a directory" in status["last_error"]
        assert len(events(daemon, "restarting")) == 3
        assert get(daemon.url("web")) == 503
    result = cli(config, "restart", "web")  # the directory is back: a manual restart revives it
    assert result.returncode == 0, result.stderr
    assert daemon.component("web")["state"] == "running"


def test_manual_restart_failing_with_an_oserror_keeps_the_old_instance(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    old = pid_of(daemon, "web")
    with log_dir_replaced_by_a_file(config, "web") as path:
        result = cli(config, "restart", "web")
        assert result.returncode == 1
        assert result.stderr.startswith("rotator: restart failed: web: ")
        assert "Not a directory" in result.stderr and str(path) in result.stderr
        assert "Traceback" not in result.stderr and "?" not in result.stderr
        status = daemon.component("web")
        assert status["state"] == "running" and pid_of(daemon, "web") == old
        assert get(daemon.url("web")) == 200
    assert cli(config, "restart", "web").returncode == 0
    assert pid_of(daemon, "web") not in (None, old)


@pytest.mark.parametrize("where", ["state_dir", "under_a_file", "lock", "token"])
def test_up_with_an_unusable_state_dir_says_so_in_one_line(tmp_path: Path, where: str) -> None:
    # A state_dir that is not a directory is a config error (2: `rotator check` finds it
    # too); one that cannot be used (a full disk, something in the way) fails `up` (1).
    config = write_config(tmp_path, {"web": component()})
    state = tmp_path / "state"
    if where == "state_dir":
        state.write_text("a file, not a directory\n")
        culprit = state
    elif where == "under_a_file":
        (tmp_path / "file").write_text("")
        text = config.read_text().replace("state_dir: state", "state_dir: file/state")
        config.write_text(text)
        culprit = tmp_path / "file" / "state"
    else:
        state.mkdir()
        culprit = state / ("daemon.lock" if where == "lock" else "admin.token")
        culprit.mkdir()
    result = cli(config, "up", timeout=30)
    assert result.returncode == (2 if where == "state_dir" else 1), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(culprit) in result.stderr and "Traceback" not in result.stderr


# -- item 8: states that do not lie --------------------------------------------------------------


def test_a_crash_loop_polled_shows_starting_gone_and_gives_up_on_time(
    tmp_path: Path, daemon_factory
) -> None:
    from tests.integration.test_lifecycle import write_app

    app, mode = write_app(tmp_path)
    mode.write_text("crashloop")  # healthy, then exits 1 after 0.5 s
    spec = component(
        command=f"{PY} {app} {{port}}",
        max_restarts=3,
        restart_window="60s",
        restart_backoff="400ms",
        restart_backoff_max="400ms",
        hold_timeout="1s",
    )
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config, wait=False)
    seen: set[tuple[str, bool, str | None]] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            web = daemon.component("web")
            seen.add((web["state"], web["active"] is not None, web["last_stop"]))
            if web["state"] == "failed":
                break
        time.sleep(0.01)
    states = {(state, has) for state, has, _ in seen}
    assert ("failed", False) in states, daemon.output()
    assert ("running", False) not in states, seen  # docs: `starting` between attempts
    assert ("starting", False) in states
    assert ("starting", False, "gone") in seen  # a crashed instance's stop says so
    assert len(events(daemon, "restarting")) == 3
    # After the third attempt crashed, the budget is spent: failed at once, not a backoff later.
    last_exit = events(daemon, "exited")[-1]["time"]
    failed = events(daemon, "failed")[-1]["time"]
    assert 0 <= failed - last_exit < 0.2, failed - last_exit


# -- item 7: the log never takes the daemon or its state down ---------------------------------


def recorded_pid(config: Path, name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((config.parent / "state" / "state.json").read_text())
        instances = state["components"][name]["instances"]
        return int(instances[0]["pid"]) if instances else None
    return None


@pytest.mark.parametrize("log_format", ["human", "json"])
def test_up_with_its_stdout_closed_keeps_serving_and_saving(
    tmp_path: Path, log_format: str
) -> None:
    config = write_config(tmp_path, {"web": component()})
    admin = "http://" + yaml.safe_load(config.read_text())["admin"]["listen"]
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [PY, "-m", "rotator", "-c", str(config), "up", "--log-format", log_format],
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    pids: set[int] = set()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline()  # `rotator up | head -1`
        proc.stdout.close()

        def ready() -> bool:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(admin + "/v1/status", timeout=5) as resp,
            ):
                return bool(json.load(resp)["daemon"]["ready"])
            return False

        assert wait_until(ready, timeout=20), stderr.read_text()
        old = recorded_pid(config, "web")
        assert old is not None
        pids.add(old)
        result = cli(config, "restart", "web")
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: recorded_pid(config, "web") not in (None, old), timeout=10)
        pids.add(recorded_pid(config, "web") or 0)
        assert proc.poll() is None, stderr.read_text()
        # The history file still gets every event; the state file every change.
        assert "restarting" not in stderr.read_text()
        history = (tmp_path / "state" / "events.log").read_text()
        assert f"stopped pid {old}" in history
        said = stderr.read_text()
        assert said.count("\n") == 1 and "stdout" in said and "Broken pipe (EPIPE)" in said, said
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "Traceback" not in stderr.read_text() and "Exception" not in stderr.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait(5)


# -- item 5: a state file that cannot be written is not silent -----------------------------------


def test_a_state_file_that_cannot_be_written_shows_in_status_and_in_the_command(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    state_file = tmp_path / "state" / "state.json"
    assert wait_until(lambda: recorded_pid(config, "web") == pid_of(daemon, "web"))
    assert daemon.status()["daemon"]["state_file_error"] is None
    state_file.unlink()
    state_file.mkdir()  # a write (temp file, then rename onto it) now fails with EISDIR

    restart = cli(config, "restart", "web")
    assert restart.returncode == 0, restart.stderr  # the restart itself did happen
    assert "restarted 1 component(s)" in restart.stdout
    assert restart.stderr.startswith("rotator: warning: the restart is done as reported, but ")
    assert "Is a directory (EISDIR)" in restart.stderr and str(state_file) in restart.stderr
    assert restart.stderr.count("\n") == 1

    stop = cli(config, "stop", "web")  # another operation: the same warning
    assert stop.returncode == 0 and "the stop is done as reported" in stop.stderr

    unsaved = json.loads(cli(config, "status", "--json").stdout)["daemon"]["state_file_error"]
    assert "Is a directory (EISDIR)" in unsaved["message"] and unsaved["since"] <= time.time()
    table = cli(config, "status")
    assert table.returncode == 0 and "warning: since " in table.stdout
    assert f"cannot write the state file {state_file}: Is a directory (EISDIR)" in table.stdout
    assert "cannot write the state file" in daemon.output()

    state_file.rmdir()  # writes work again: the daemon's retry catches up on its own
    assert wait_until(lambda: daemon.status()["daemon"]["state_file_error"] is None, timeout=5)
    saved = json.loads(state_file.read_text())["components"]["web"]
    assert saved["stopped"] is True and saved["instances"] == []
    assert "warning" not in cli(config, "status").stdout
    assert "is written again" in daemon.output()


# -- item 11: messages that say what happened ----------------------------------------------------


@pytest.mark.parametrize("op", ["restart", "deploy"])
def test_a_daemon_killed_mid_operation_is_said_so(tmp_path: Path, daemon_factory, op: str) -> None:
    delay = tmp_path / "delay"
    delay.write_text("0")
    script = f'sleep "$(cat {delay})"; exec {PY} -m rotator.demo --port "$PORT"'
    config = write_config(tmp_path, {"web": component(command=["sh", "-c", script])})
    daemon = daemon_factory(config)
    delay.write_text("30")  # the next instance takes long to start: time to kill the daemon
    args = ["restart", "web"] if op == "restart" else ["deploy", "web", "--env", "X=1"]
    proc = subprocess.Popen(
        [PY, "-m", "rotator", "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: daemon.output().count("started pid") == 2, timeout=10)
        daemon.proc.kill()
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
        # The instance that was starting, for the fixture's cleanup.
        daemon.pids_seen.update(int(p) for p in re.findall(r"started pid (\d+)", daemon.output()))
    assert proc.returncode == 1
    assert stderr == (
        f"rotator: the daemon closed the connection before the {op} finished "
        "(did it exit? see: rotator status)\n"
    )
    status = cli(config, "status")
    assert status.returncode == 1 and status.stderr.startswith("rotator: daemon not running")


def test_a_daemon_out_of_file_descriptors_is_not_called_not_running(tmp_path: Path) -> None:
    # uvloop (libuv) closes a connection it cannot accept for want of a descriptor at once;
    # asyncio leaves it in the backlog, and the CLI would wait out its 30 s timeout.
    pytest.importorskip("uvloop")
    import resource

    config = write_config(tmp_path, {"web": component(keepalive_timeout="60s")})
    data = yaml.safe_load(config.read_text())
    admin = "http://" + data["admin"]["listen"]
    # The components' addresses are capped below the limit (max_clients): the admin
    # address, which is not, is where a flood can still use up the descriptors.
    host, port = data["admin"]["listen"].rsplit(":", 1)
    limit = 128

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    out = tmp_path / "daemon.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [PY, "-m", "rotator", "-c", str(config), "up"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=low_limit,
        )
    clients: list[socket.socket] = []
    pids: set[int] = set()
    try:

        def status() -> dict[str, Any] | None:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(admin + "/v1/status", timeout=5) as resp,
            ):
                return dict(json.load(resp))
            return None

        assert wait_until(lambda: (s := status()) is not None and s["daemon"]["ready"], 20)
        pids.update(c["active"]["pid"] for c in (status() or {})["components"] if c["active"])
        for _ in range(limit):  # idle admin connections: one descriptor each in the daemon
            clients.append(socket.create_connection((host, int(port))))
        time.sleep(0.5)
        result = cli(config, "status", timeout=20)
        assert result.returncode == 1, result.stdout
        assert result.stderr.count("\n") == 1, result.stderr
        assert "not running" not in result.stderr
        assert result.stderr.startswith(f"rotator: the daemon at {admin} ")
        assert "cannot serve" in result.stderr and "file descriptors" in result.stderr
        for client in clients:
            client.close()
        clients.clear()
        assert wait_until(lambda: cli(config, "status").returncode == 0, timeout=10)
        assert proc.poll() is None, out.read_text()
    finally:
        for client in clients:
            client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait(5)

"""`rotator up --takeover`: a new daemon takes the running one's sockets and instances
without a refused connection, a failed request or a restarted instance."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from rotator import takeover
from tests.conftest import PY, Load, RunningDaemon, alive, cli, component, wait_until, write_config


def pids(d: RunningDaemon) -> dict[str, int]:
    return {c["name"]: c["active"]["pid"] for c in d.status()["components"]}


def daemons_for(config: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "up" in cmd and str(config) in cmd:
            found.append(proc)
    return found


def successor(config: Path, n: int) -> RunningDaemon:
    """`rotator up --takeover` as a real subprocess."""
    return RunningDaemon(config, "--takeover", log_name=f"daemon-{n}.out")


def test_five_takeovers_under_load_lose_nothing(tmp_path: Path, daemon_factory: Any) -> None:
    config = write_config(tmp_path, {"web": component(), "api": component()})
    first = daemon_factory(config)
    before = pids(first)
    daemons: list[RunningDaemon] = [first]
    try:
        with Load(first.url("web")) as web, Load(first.url("api"), clients=4) as api:
            for n in range(5):
                old = daemons[-1]
                new = successor(config, n)
                daemons.append(new)
                assert wait_until(lambda d=old: d.proc.poll() is not None, timeout=30), old.output()
                assert old.proc.returncode == 0, old.output()
                assert "handed over to pid" in old.output()
                status = new.wait_running()
                assert status["daemon"]["pid"] == new.proc.pid
                time.sleep(0.3)  # traffic through the new daemon alone
        assert web.report.failed == 0, (web.report.failures, web.report.samples[:5])
        assert api.report.failed == 0, (api.report.failures, api.report.samples[:5])
        assert web.report.ok > 100
        last = daemons[-1]
        assert pids(last) == before  # no instance was restarted
        assert all(alive(pid) for pid in before.values())
        assert [p.pid for p in daemons_for(config)] == [last.proc.pid]  # exactly one daemon
        assert all(c["active"]["adopted"] for c in last.status()["components"])
        # The new daemon is a full daemon: it rotates, and the CLI's token still works.
        result = cli(config, "restart", "web")
        assert result.returncode == 0, result.stderr
        assert pids(last)["web"] != before["web"]
    finally:
        for d in daemons[1:]:
            d.stop()
            d.kill_everything()
            print(f"---- {d.log.name}:\n{d.output()}")


def test_takeover_without_a_running_daemon_fails_cleanly(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"web": component()})
    result = subprocess.run(
        [PY, "-m", "rotator", "up", "--takeover", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no running daemon to take over from" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_successor_with_a_bad_config_changes_nothing(tmp_path: Path, daemon_factory: Any) -> None:
    config = write_config(tmp_path, {"web": component()})
    d = daemon_factory(config)
    before = pids(d)
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("components:", "components:\n  oops: 1\n", 1))
    result = subprocess.run(
        [PY, "-m", "rotator", "up", "--takeover", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "bad.yaml" in result.stderr
    assert d.proc.poll() is None and pids(d) == before
    assert cli(config, "restart", "web").returncode == 0


def test_a_successor_that_vanishes_before_ready_leaves_the_old_daemon_in_charge(
    tmp_path: Path, daemon_factory: Any
) -> None:
    # Speak the protocol by hand: take the sockets, then go away without saying ready.
    config = write_config(tmp_path, {"web": component()})
    d = daemon_factory(config)
    before = pids(d)
    with Load(d.url("web"), clients=4) as load:
        state_dir = config.parent / "state"
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(str(takeover.socket_path(state_dir)))
        takeover.send(conn, {"hello": takeover.PROTOCOL, "pid": os.getpid()})
        answer, fds = takeover.receive(conn)
        assert answer["sockets"] == ["web", None] and len(fds) == 2
        assert answer["token"] == (state_dir / "admin.token").read_text().strip()
        # Meanwhile the old daemon changes nothing: the successor is adopting what runs.
        refused = cli(config, "restart", "web")
        assert refused.returncode == 1 and "taking over" in refused.stderr, refused.stderr
        for fd in fds:
            os.close(fd)
        conn.close()
        assert wait_until(lambda: "serving on" in d.output(), timeout=10), d.output()
    assert load.report.failed == 0, load.report.failures
    assert d.proc.poll() is None and pids(d) == before
    assert cli(config, "restart", "web").returncode == 0
    before = pids(d)
    # Supervision resumed: a crash of the instance is noticed and repaired.
    os.kill(before["web"], signal.SIGKILL)
    assert wait_until(
        lambda: (d.component("web")["active"] or {}).get("pid") not in (None, before["web"]), 15
    )
    state = json.loads((state_dir / "state.json").read_text())
    assert state["components"]["web"]["instances"][0]["pid"] != before["web"]  # it saves again


def test_an_unknown_protocol_is_refused(tmp_path: Path, daemon_factory: Any) -> None:
    config = write_config(tmp_path, {"web": component()})
    d = daemon_factory(config)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(str(takeover.socket_path(config.parent / "state")))
    takeover.send(conn, {"hello": 99})
    answer, fds = takeover.receive(conn)
    conn.close()
    assert "unknown takeover protocol" in answer["error"] and fds == []
    assert d.proc.poll() is None
    assert cli(config, "restart", "web").returncode == 0


def test_a_takeover_during_a_reload_is_refused_and_changes_nothing(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = write_config(tmp_path, {"web": component()})
    d = daemon_factory(config)
    data = yaml.safe_load(config.read_text())
    data["components"]["web"]["command"] += " --startup-delay 2"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    # The changed command rotates web: the reload lasts until the slow new instance is up.
    reload = subprocess.Popen(
        [PY, "-m", "rotator", "-c", str(config), "reload"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: d.component("web")["state"] == "rotating", timeout=15)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(str(takeover.socket_path(config.parent / "state")))
        takeover.send(conn, {"hello": takeover.PROTOCOL, "pid": os.getpid()})
        answer, fds = takeover.receive(conn)
        conn.close()
        _, err = reload.communicate(timeout=60)
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.wait()
    assert answer == {"error": "a reload is in progress; try again"} and fds == []
    assert reload.returncode == 0, err
    assert "is taking over" not in d.output()  # refused before anything was suspended
    assert d.proc.poll() is None
    assert cli(config, "restart", "web").returncode == 0


def test_garbage_on_the_takeover_socket_harms_nothing(tmp_path: Path, daemon_factory: Any) -> None:
    config = write_config(tmp_path, {"web": component()})
    d = daemon_factory(config)
    path = str(takeover.socket_path(config.parent / "state"))
    for junk in (b"not json\n", b'{"hello": 1, "pid": "abc"}\n', b"[1]\n", b"x" * 70000, b""):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall(junk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1024)  # the daemon answers or closes; it does not hang
        conn.close()
    assert d.proc.poll() is None
    assert cli(config, "restart", "web").returncode == 0
    assert "serving on" in d.output()

"""End to end: a real daemon, real instances, real load, the real CLI."""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import DEMO, PY, Load, alive, cli, component, wait_until, write_config


def switchable(tmp_path: Path, extra: str = "") -> tuple[str, Path]:
    """A command whose next instance behaves as the file `mode` says: ok, crash, unhealthy."""
    mode = tmp_path / "mode"
    mode.write_text("ok")
    script = tmp_path / "instance.sh"
    script.write_text(
        f"""#!/bin/sh
case "$(cat {mode})" in
  crash) echo "boom: cannot read settings.ini" >&2; exit 3 ;;
  unhealthy) exec {PY} -m rotator.demo --port "$1" --never-healthy ;;
  *) exec {PY} -m rotator.demo --port "$1" {extra} ;;
esac
"""
    )
    return f"sh {script} {{port}}", mode


def test_twenty_restarts_under_load_lose_nothing(tmp_path: Path, daemon_factory) -> None:
    # --close: the server closes every connection, leaving TIME_WAIT on each
    # port it used; a pool of 10 must still carry 20 back-to-back restarts.
    config = write_config(tmp_path, {"web": component(pool=10, command=DEMO + " --close")})
    daemon = daemon_factory(config)
    first = daemon.component("web")["active"]["pid"]
    old_pids = {first}
    with Load(daemon.url("web")) as load:
        for i in range(20):
            result = cli(config, "restart", "web")
            assert result.returncode == 0, f"restart {i}: {result.stdout}{result.stderr}"
            assert "switched" in result.stdout and "stopped pid" in result.stdout
            old_pids.add(daemon.component("web")["active"]["pid"])
    report = load.report
    assert report.failed == 0, (report.failures, report.samples[:5])
    assert report.ok > 200
    status = daemon.component("web")
    assert status["restarts"] == 20
    assert status["state"] == "running" and status["draining"] == []
    current = status["active"]["pid"]
    assert len(old_pids) == 21
    assert not [pid for pid in old_pids - {current} if alive(pid)]
    assert len(report.pids) >= 10  # traffic really moved from instance to instance


def test_restart_with_keepalive_clients_moves_them_to_the_new_instance(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component(pool=3)})
    daemon = daemon_factory(config)
    with Load(daemon.url("web"), clients=8) as load:
        for _ in range(5):
            assert cli(config, "restart", "web").returncode == 0
        before = load.report.ok
        assert wait_until(lambda: load.report.ok > before + 50)
    assert load.report.failed == 0, load.report.failures
    final = daemon.component("web")["active"]["pid"]
    assert load.report.pids[final] > 0
    # A pool of 3 wraps around: ports are reused once their instance is gone.
    assert daemon.component("web")["active"]["port"] in daemon.data["components"]["web"]["ports"]


def test_connections_to_the_new_instance_are_opened_before_the_switch(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    with Load(daemon.url("web"), clients=8) as load:
        result = cli(config, "restart", "web")
        assert result.returncode == 0, result.stderr
        new_pid = daemon.component("web")["active"]["pid"]
    assert load.report.failed == 0, load.report.failures
    events = [json.loads(line) for line in cli(config, "events", "--json").stdout.splitlines()]
    kinds = [e["kind"] for e in events if e.get("pid") == new_pid]
    assert kinds.index("warmed") < kinds.index("switched"), kinds
    warmed = next(e for e in events if e["kind"] == "warmed" and e["pid"] == new_pid)
    assert 0 < warmed["connections"] <= 32, warmed


def test_new_instance_crashing_on_start_leaves_the_old_one_serving(
    tmp_path: Path, daemon_factory
) -> None:
    command, mode = switchable(tmp_path)
    config = write_config(tmp_path, {"web": component(command=command)})
    daemon = daemon_factory(config)
    before = daemon.component("web")["active"]
    mode.write_text("crash")
    with Load(daemon.url("web"), clients=4) as load:
        result = cli(config, "restart", "web")
    assert result.returncode == 1
    assert "exited with code 3 before becoming healthy" in result.stderr
    assert "boom: cannot read settings.ini" in result.stderr  # the new instance's own log lines
    assert load.report.failed == 0
    after = daemon.component("web")
    assert after["active"]["pid"] == before["pid"] and after["state"] == "running"
    assert after["restarts"] == 0
    mode.write_text("ok")
    assert cli(config, "restart", "web").returncode == 0


def test_new_instance_never_healthy_is_killed_and_old_keeps_serving(
    tmp_path: Path, daemon_factory
) -> None:
    command, mode = switchable(tmp_path)
    spec = component(command=command, health={"start_timeout": "1500ms"})
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    before = daemon.component("web")["active"]["pid"]
    mode.write_text("unhealthy")
    with Load(daemon.url("web"), clients=4) as load:
        result = cli(config, "restart", "web")
    assert result.returncode == 1, result.stdout
    assert "not healthy within start_timeout 1.5s" in result.stderr
    assert "answered 503" in result.stderr
    assert load.report.failed == 0
    assert daemon.component("web")["active"]["pid"] == before
    spawned = [int(w) for w in result.stdout.split() if w.isdigit()]
    new_pid = next(p for p in spawned if p != before)
    assert not alive(new_pid)


def test_slow_request_in_flight_finishes_on_the_old_instance(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    old = daemon.component("web")["active"]["pid"]
    answer: dict[str, object] = {}

    def slow() -> None:
        with urllib.request.urlopen(daemon.url("web", "/slow?seconds=1.5"), timeout=10) as resp:
            answer["status"] = resp.status
            answer["pid"] = json.load(resp)["pid"]

    thread = threading.Thread(target=slow)
    thread.start()
    assert wait_until(lambda: daemon.component("web")["in_flight"] == 1)
    result = cli(config, "restart", "web")
    thread.join(10)
    assert result.returncode == 0, result.stderr
    assert answer == {"status": 200, "pid": old}
    assert "drained 1 request(s)" in result.stdout
    assert not alive(old)


def test_down_stops_every_process_of_every_tree(tmp_path: Path, daemon_factory) -> None:
    config = write_config(
        tmp_path,
        {
            "tree": component(command=DEMO + " --spawn-child"),
            "stubborn": component(command=DEMO + " --ignore-sigterm", stop_timeout="500ms"),
        },
    )
    daemon = daemon_factory(config)
    roots = [c["active"]["pid"] for c in daemon.status()["components"]]
    everyone = set(roots)
    for pid in roots:
        everyone.update(p.pid for p in psutil.Process(pid).children(recursive=True))
    assert len(everyone) >= 3  # the child of --spawn-child is there
    result = cli(config, "down")
    assert result.returncode == 0, result.stderr
    assert daemon.proc.wait(20) == 0
    assert not [pid for pid in everyone if alive(pid)]
    out = daemon.output()
    assert "(forced" in out and "(graceful" in out


def test_sigterm_to_the_daemon_is_a_graceful_down(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    pid = daemon.component("web")["active"]["pid"]
    assert daemon.stop() == 0
    assert not alive(pid)
    assert not (tmp_path / "state" / "admin.token").exists()


def test_admin_api_refuses_missing_token_and_foreign_host(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    assert (tmp_path / "state" / "admin.token").stat().st_mode & 0o077 == 0
    host, port = daemon.data["admin"]["listen"].split(":")

    def call(method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            lines = [f"{method} {path} HTTP/1.1", "Connection: close", "Content-Length: 0"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")

    here = {"Host": f"{host}:{port}"}
    restart = "/v1/components/web/restart"
    assert call("POST", restart, here)[0] == 401
    assert call("POST", restart, {**here, "Authorization": "Bearer wrong"})[0] == 401
    assert (
        call("POST", restart, {"Host": f"evil.example:{port}", "Authorization": f"Bearer {token}"})[
            0
        ]
        == 403
    )
    assert call("GET", "/v1/status", {"Host": "rebind.attacker.example"})[0] == 403
    origin = {**here, "Origin": "http://evil.example", "Authorization": f"Bearer {token}"}
    assert call("POST", "/v1/shutdown", origin)[0] == 403
    status, body = call(
        "POST", "/v1/components/nope/restart", {**here, "Authorization": f"Bearer {token}"}
    )
    assert status == 404 and "no component named 'nope'" in body
    assert call("GET", "/nowhere", here)[0] == 404
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        s.recv(100)
    pid = daemon.component("web")["active"]["pid"]
    assert daemon.proc.poll() is None
    status, _ = call("POST", restart, {**here, "Authorization": f"Bearer {token}"})
    assert status == 200
    assert daemon.component("web")["active"]["pid"] != pid


def test_port_held_by_a_stranger_is_skipped_and_an_exhausted_pool_is_reported(
    tmp_path: Path, daemon_factory
) -> None:
    spec = component(pool=3)
    a, b, c = spec["ports"]
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    assert daemon.component("web")["active"]["port"] == a
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", b))
    stranger.listen()
    try:
        assert cli(config, "restart", "web").returncode == 0
        assert daemon.component("web")["active"]["port"] == c  # b skipped
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a lingers in TIME_WAIT
        blocker.bind(("127.0.0.1", a))
        blocker.listen()
        try:
            result = cli(config, "restart", "web")
            assert result.returncode == 1
            assert "no free port in pool" in result.stderr
            active = daemon.component("web")["active"]["pid"]
            # Who holds them: this test, and the component itself, said so.
            assert f" by pid {os.getpid()} (" in result.stderr
            assert f"{c} by this component's active instance (pid {active})" in result.stderr
            assert daemon.component("web")["active"]["port"] == c  # still serving
        finally:
            blocker.close()
    finally:
        stranger.close()


def test_public_port_taken_fails_startup_cleanly(tmp_path: Path, daemon_factory) -> None:
    spec = component()
    config = write_config(tmp_path, {"web": spec, "other": component()})
    host, port = spec["listen"].split(":")
    stranger = socket.socket()
    stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stranger.bind((host, int(port)))
    stranger.listen()
    try:
        daemon = daemon_factory(config, wait=False)
        assert daemon.proc.wait(20) == 1
    finally:
        stranger.close()
    out = daemon.output()
    # The reason once, then who holds the port (this test).
    assert (
        f"components.web.listen: cannot bind {spec['listen']}: Address already in use"
        f" (held by pid {os.getpid()} ("
    ) in out
    assert out.lower().count("already in use") == 1, out
    assert "Traceback" not in out
    assert not (tmp_path / "state" / "logs").exists() or not any(
        "started pid" in line for line in out.splitlines()
    )


def test_second_daemon_for_the_same_config_is_refused(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon_factory(config)
    second = cli(config, "up", timeout=20)
    assert second.returncode == 1
    assert "rotator is already running for" in second.stderr and "pid" in second.stderr
    assert cli(config, "status").returncode == 0  # the first one's token was not replaced


def test_concurrent_restarts_of_one_component_do_not_interleave(
    tmp_path: Path, daemon_factory
) -> None:
    import subprocess

    config = write_config(tmp_path, {"web": component(pool=4)})
    daemon = daemon_factory(config)
    procs = [
        subprocess.Popen(
            [PY, "-m", "rotator", "-c", str(config), "restart", "web"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert any("waiting for the rotation in progress" in out for out in outs)
    assert daemon.component("web")["restarts"] == 2


def test_status_json_has_the_documented_shape(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component(), "api": component()})
    daemon_factory(config)
    result = cli(config, "status", "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert [c["name"] for c in data["components"]] == ["web", "api"]
    for c in data["components"]:
        assert c["state"] == "running"
        assert set(c["active"]) >= {"pid", "port", "healthy"} and c["active"]["healthy"] is True
        assert c["draining"] == [] and c["restarts"] == 0
        assert isinstance(c["listen"], str)
    table = cli(config, "status")
    assert table.returncode == 0 and "COMPONENT" in table.stdout and "web" in table.stdout


def test_cli_errors_are_one_line_with_documented_exit_codes(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"web": component()})
    down = cli(config, "status")
    assert down.returncode == 1
    assert down.stderr.startswith("rotator: daemon not running") and down.stderr.count("\n") == 1
    unknown = cli(config, "restart", "nope")
    assert unknown.returncode == 2 and "unknown component 'nope'" in unknown.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "components:\n  web:\n    listen: 127.0.0.1:1\n    ports: 10-5\n    command: x\n"
    )
    check = cli(bad, "check")
    assert check.returncode == 2
    assert f"{bad}:4: components.web.ports: 10-5 is an empty range" in check.stderr
    assert "Traceback" not in check.stderr
    up = cli(bad, "up")
    assert up.returncode == 2 and "empty range" in up.stderr
    usage = cli(config, "frobnicate")
    assert usage.returncode == 2
    missing = cli(tmp_path / "nope.yaml", "check")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_requests_before_the_first_instance_is_healthy_are_held(
    tmp_path: Path, daemon_factory
) -> None:
    spec = component(command=DEMO + " --startup-delay 1")
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config, wait=False)
    host, port = spec["listen"].split(":")
    assert wait_until(lambda: _accepts(host, int(port)), timeout=10)
    with urllib.request.urlopen(daemon.url("web"), timeout=10) as resp:
        assert resp.status == 200  # held until the instance was healthy, not refused


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_after_a_graceful_down_up_starts_everything_but_what_was_stopped_on_purpose(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component(), "api": component()})
    first = daemon_factory(config)
    assert cli(config, "stop", "api").returncode == 0
    assert first.stop() == 0
    second = daemon_factory(config)
    assert second.component("web")["state"] == "running"
    api = second.component("api")
    assert api["state"] == "stopped" and api["active"] is None
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(second.url("api"), timeout=5)
    assert refused.value.code == 503
    assert cli(config, "start", "api").returncode == 0
    assert second.component("api")["state"] == "running"


def test_a_stale_token_gets_a_clear_one_line_error(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon_factory(config)
    (tmp_path / "state" / "admin.token").write_text("stale-token-from-an-earlier-run\n")
    result = cli(config, "restart", "web")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "did not accept the token" in result.stderr

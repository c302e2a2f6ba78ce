"""Lifecycle end to end: deploy and rollback, crash supervision, stop and start, a daemon
that dies and the one that takes over its instances, dependency order, bad input.

Real daemons, real instances, real sockets, the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from rotator.state import STATE_VERSION
from tests.conftest import DEMO, PY, Load, alive, cli, component, wait_until, write_config

MARKER = "ROTATOR_INSTANCE"

# A small stdlib HTTP app whose behaviour the test chooses: argv[2], else the file `mode`
# beside it, else "ok". Every mode answers `/` with 200.
#   ok         /health 200 (500 once a file `sick-<pid>` exists beside the script)
#   flaky      /health 200 for its first 0.5 s, then 500
#   crashloop  healthy, then exits 1 after 0.5 s
APP = r"""
import os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

here = os.path.dirname(os.path.abspath(__file__))
mode_file = os.path.join(here, "mode")
if len(sys.argv) > 2:
    mode = sys.argv[2]
elif os.path.exists(mode_file):
    mode = open(mode_file).read().strip()
else:
    mode = "ok"
began = time.monotonic()


def sick():
    if mode == "flaky" and time.monotonic() - began > 0.5:
        return True
    return os.path.exists(os.path.join(here, "sick-%d" % os.getpid()))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        code = 500 if self.path == "/health" and sick() else 200
        body = ("app pid %d mode %s\n" % (os.getpid(), mode)).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if mode == "crashloop":
    def die():
        print("app pid %d: giving up (crashloop)" % os.getpid(), flush=True)
        os._exit(1)

    threading.Timer(0.5, die).start()
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
print("app pid %d mode %s listening on %s" % (os.getpid(), mode, sys.argv[1]), flush=True)
server.serve_forever()
"""

# Starts the demo server, after leaving behind a grandchild in a session of its own that
# ignores SIGTERM: outside the instance's process group and outside its psutil tree; only
# the ROTATOR_INSTANCE marker it inherited still ties it to the instance.
ESCAPE = r"""
import os, signal, sys, time

if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "escapee-%d" % os.getpid())
        with open(path, "w") as f:
            f.write("escaped")
        time.sleep(120)
    os._exit(0)
os.wait()
os.execv(sys.executable, [sys.executable, "-m", "rotator.demo", "--port", sys.argv[1]])
"""


# A child that leaves the instance's session and group and drops the marker from its
# environment, while its parent (the instance) lives on: only the parent link finds it.
DETACH = r"""
import os, signal, subprocess, sys

env = {k: v for k, v in os.environ.items() if k != "ROTATOR_INSTANCE"}
here = os.path.dirname(os.path.abspath(__file__))
child = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    f"open(os.path.join({here!r}, 'detached-%d' % os.getpid()), 'w').close()\n"
    "time.sleep(120)\n"
)
subprocess.Popen([sys.executable, "-c", child], env=env, start_new_session=True)
os.execv(sys.executable, [sys.executable, "-m", "rotator.demo", "--port", sys.argv[1]])
"""


def script_config(tmp_path: Path, name: str, text: str) -> Path:
    """A config whose one component runs the Python script `text` (given the port)."""
    script = tmp_path / name
    script.write_text(text)
    spec = component(command=f"{PY} {script} {{port}}", stop_timeout="1s")
    return write_config(tmp_path, {"web": spec})


def pids_noted(tmp_path: Path, prefix: str) -> set[int]:
    """The pids that left a `<prefix>-<pid>` file in tmp_path (processes the daemon may lose)."""
    return {int(p.name.split("-")[1]) for p in tmp_path.glob(f"{prefix}-*")}


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write_app(tmp_path: Path) -> tuple[Path, Path]:
    """The app script and its mode file (initially "ok")."""
    app = tmp_path / "app.py"
    app.write_text(APP)
    mode = tmp_path / "mode"
    mode.write_text("ok")
    return app, mode


def get(url: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def environ(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


def scope_of(pid: int) -> str:
    """The state_dir scope of the instance `pid` (the first field of its marker)."""
    return environ(pid)[MARKER].split(":")[0]


def marked(scope: str) -> dict[str, list[int]]:
    """Live processes carrying a marker of `scope`, by marker."""
    found: dict[str, list[int]] = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            marker = proc.environ().get(MARKER, "")
            if marker.startswith(scope + ":") and proc.status() != psutil.STATUS_ZOMBIE:
                found.setdefault(marker, []).append(proc.pid)
    return found


def by_component(scope: str) -> dict[str, list[str]]:
    """The markers of `scope` still carried by a live process, by component name."""
    names: dict[str, list[str]] = {}
    for marker in marked(scope):
        names.setdefault(marker.split(":")[1], []).append(marker)
    return names


def pid_of(daemon: Any, name: str) -> int | None:
    active = daemon.component(name)["active"]
    return None if active is None else int(active["pid"])


def actives(status: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["active"]["pid"] for c in status["components"] if c["active"]}


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and text.endswith("\n")


def up(daemon_factory: Any, config: Path) -> Any:
    """A daemon whose startup is over. (The fixture's wait_running counts "stopped" as
    settled, and every component is "stopped" until startup reaches it.)"""
    daemon = daemon_factory(config, wait=False)
    done = wait_until(
        lambda: "component(s) running" in daemon.output() or daemon.proc.poll() is not None,
        timeout=20,
    )
    assert done and daemon.proc.poll() is None, daemon.output()
    running = actives(daemon.status())  # records the pids for the fixture's cleanup
    # The state file is written in the background: a test that kills the daemon next
    # needs it to hold what runs (or the next daemon rightly stops what it cannot adopt).
    assert wait_until(lambda: recorded(config) == running, timeout=10), daemon.output()
    return daemon


def recorded(config: Path) -> dict[str, int]:
    """The active pids the state file holds."""
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((config.parent / "state" / "state.json").read_text())
        return {
            name: c["instances"][0]["pid"]
            for name, c in state["components"].items()
            if c["instances"]
        }
    return {}


def keep_log(daemon: Any) -> None:
    """The next daemon on this config writes daemon.out anew: keep this (ended) one's output."""
    daemon.log = daemon.log.rename(daemon.log.with_name(f"daemon-{daemon.proc.pid}.out"))


def kill_daemon_only(daemon: Any) -> None:
    """SIGKILL the daemon process itself (not its group): its instances live on."""
    daemon.proc.kill()
    daemon.proc.wait(10)
    keep_log(daemon)


# -- 1. deploy, restart, rollback --------------------------------------------------------------


def test_deploy_restart_and_rollback_under_load(tmp_path: Path, daemon_factory) -> None:
    release = tmp_path / "release"
    release.mkdir()
    script = release / "run.sh"
    script.write_text(
        f'#!/bin/sh\nexec {PY} -m rotator.demo --port "$1" --name "$GREETING@$(pwd)"\n'
    )
    config = write_config(tmp_path, {"web": component()})
    daemon = up(daemon_factory, config)
    url = daemon.url("web")

    nothing = cli(config, "rollback", "web")
    assert nothing.returncode == 2, nothing
    assert one_line(nothing.stderr) and "nothing to roll back" in nothing.stderr
    first = daemon.component("web")
    assert first["definition"]["source"] == "config"
    assert first["definition"]["can_roll_back"] is False

    with Load(url, clients=8) as load:
        # Run from inside release/ with a relative --cwd: relative to where the user is.
        overrides = ["--command", f"sh {script} {{port}}", "--env", "GREETING=hello"]
        deploy = subprocess.run(
            [PY, "-m", "rotator", "-c", str(config), "deploy", "web", "--cwd", ".", *overrides],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=release,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "web: deployed in" in deploy.stdout
        status = json.loads(cli(config, "status", "--json").stdout)["components"][0]
        deployed = status["active"]["pid"]
        assert deployed != first["active"]["pid"]
        assert status["definition"]["source"] == "deployed"
        assert status["definition"]["command"] == ["sh", str(script), "{port}"]
        assert status["definition"]["can_roll_back"] is True
        assert isinstance(status["definition"]["at"], float)
        assert environ(deployed)["GREETING"] == "hello"
        assert json.loads(get(url)[2])["name"] == f"hello@{release}"

        restart = cli(config, "restart", "web")
        assert restart.returncode == 0, restart.stderr
        restarted = daemon.component("web")
        assert restarted["active"]["pid"] != deployed
        assert restarted["definition"]["source"] == "deployed"
        assert environ(restarted["active"]["pid"])["GREETING"] == "hello"
        assert json.loads(get(url)[2])["name"] == f"hello@{release}"

        rollback = cli(config, "rollback", "web")
        assert rollback.returncode == 0, rollback.stderr
        assert "web: rolled back in" in rollback.stdout
        back = daemon.component("web")
        assert back["definition"]["source"] == "config"
        assert back["definition"]["command"][-2:] == ["--name", "{name}"]
        assert "GREETING" not in environ(back["active"]["pid"])
        assert json.loads(get(url)[2])["name"] == "web"

        # Run twice, it goes forward again.
        forward = cli(config, "rollback", "web")
        assert forward.returncode == 0, forward.stderr
        assert daemon.component("web")["definition"]["source"] == "deployed"
        assert json.loads(get(url)[2])["name"] == f"hello@{release}"
    report = load.report
    assert report.failed == 0, (report.failures, report.samples[:5])
    assert daemon.component("web")["restarts"] == 4
    assert len(report.pids) >= 4  # traffic reached every version

    # The deployed definition is kept in the state file: the next daemon starts it.
    assert cli(config, "down").returncode == 0
    assert daemon.proc.wait(20) == 0
    keep_log(daemon)
    daemon = up(daemon_factory, config)
    status = daemon.component("web")
    assert status["definition"]["source"] == "deployed"
    assert status["definition"]["can_roll_back"] is True
    assert environ(status["active"]["pid"])["GREETING"] == "hello"
    assert cli(config, "rollback", "web").returncode == 0
    assert json.loads(get(url)[2])["name"] == "web"


# -- 2. a failed deploy rolls back ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exits", "never-healthy", "fails-verify"])
def test_failed_deploy_rolls_back_under_load(tmp_path: Path, daemon_factory, kind: str) -> None:
    app, _ = write_app(tmp_path)
    health = {"interval": "200ms", "unhealthy_threshold": 2, "start_timeout": "1500ms"}
    config = write_config(tmp_path, {"web": component(verify="2s", health=health)})
    daemon = up(daemon_factory, config)
    before = daemon.component("web")["active"]["pid"]
    command, reason, log_line = {
        "exits": (
            shlex.join(["sh", "-c", "echo 'boom: missing config.toml' >&2; exit 4"]),
            "exited with code 4 before becoming healthy",
            "boom: missing config.toml",
        ),
        "never-healthy": (
            f"{PY} -m rotator.demo --port {{port}} --never-healthy",
            "not healthy within start_timeout 1.5s (last check: /health answered 503)",
            "listening on 127.0.0.1:",
        ),
        "fails-verify": (
            f"{PY} {app} {{port}} flaky",
            "failed 2 health checks in a row (/health answered 500) within verify 2s",
            "mode flaky listening on",
        ),
    }[kind]
    with Load(daemon.url("web"), clients=8) as load:
        result = cli(config, "deploy", "web", "--command", command)
        time.sleep(0.3)  # the old instance is serving again
    report = load.report
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rotator: web: deploy failed:" in result.stderr and reason in result.stderr
    assert log_line in result.stderr  # the new instance's own log lines
    assert report.failed == 0, (report.failures, report.samples[:5])
    after = daemon.component("web")
    assert after["active"]["pid"] == before and after["state"] == "running"
    assert after["definition"]["source"] == "config"
    assert after["definition"]["can_roll_back"] is False
    assert after["restarts"] == 0
    spawned = [int(w) for w in result.stdout.split() if w.isdigit() and int(w) != before]
    assert spawned
    new = spawned[0]
    assert wait_until(lambda: not alive(new), timeout=10)
    if kind == "fails-verify":
        assert f"new instance pid {new}" in result.stderr
        assert report.pids[new] > 0  # traffic did move to it, and came back
        assert "traffic back to pid" in result.stdout
    # The component still deploys fine afterwards.
    assert cli(config, "deploy", "web", "--env", "X=1").returncode == 0


# -- 3. crash supervision ---------------------------------------------------------------------------


def test_killed_instance_is_replaced_and_gets_are_held(tmp_path: Path, daemon_factory) -> None:
    spec = component(restart_backoff="100ms", hold_timeout="5s")
    config = write_config(tmp_path, {"web": spec})
    daemon = up(daemon_factory, config)
    old = daemon.component("web")["active"]["pid"]

    with Load(daemon.url("web"), clients=8) as load:
        # Past the first requests, which open the proxy's connections to the instance: a
        # request in flight on a connection that served none before is not sent again.
        assert wait_until(lambda: load.report.ok > 200)
        os.kill(old, signal.SIGKILL)
        began = time.monotonic()
        assert wait_until(lambda: pid_of(daemon, "web") not in (None, old), timeout=10)
        took = time.monotonic() - began
        served = load.report.ok
        assert wait_until(lambda: load.report.ok > served + 50)
    report = load.report
    # Refused GETs, and GETs the dying instance's kernel had accepted and then reset,
    # are held for the replacement: no error of any kind.
    assert report.failed == 0, (report.failures, report.samples[:5])
    assert took < 5, took  # restart_backoff + a start
    status = daemon.component("web")
    new = status["active"]["pid"]
    assert report.pids[new] > 0
    assert status["state"] == "running" and status["restarts"] == 1
    assert status["last_exit"] == -9
    assert f"pid {old} exited with code -9" in daemon.output()


def test_gets_sent_to_an_instance_as_it_dies_are_answered_by_the_replacement(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component(restart_backoff="100ms")})
    daemon = up(daemon_factory, config)
    old = daemon.component("web")["active"]["pid"]
    assert get(daemon.url("web"))[0] == 200  # one used connection in the proxy's pool
    answers: dict[int, tuple[int, int]] = {}

    def request(i: int) -> None:
        code, headers, _ = get(daemon.url("web", f"/?n={i}"), timeout=15)
        answers[i] = (code, int(headers.get("X-Instance-Pid", 0)))

    # Frozen, the instance answers nothing, but its kernel still completes handshakes:
    # request 0 goes out on the pooled connection, request 1 on a new one (backlog).
    os.kill(old, signal.SIGSTOP)
    threads = []
    try:
        for i in range(2):
            threads.append(threading.Thread(target=request, args=(i,)))
            threads[-1].start()
            assert wait_until(lambda n=i + 1: daemon.component("web")["in_flight"] == n)
    finally:
        os.kill(old, signal.SIGKILL)  # every connection it had, accepted or not, is reset
    for thread in threads:
        thread.join(20)
    new = pid_of(daemon, "web")
    assert new not in (None, old)
    # Nothing of a response came back, and GET is idempotent: both are sent again.
    assert answers == {0: (200, new), 1: (200, new)}


def test_children_of_a_crashed_instance_are_stopped(tmp_path: Path, daemon_factory) -> None:
    spec = component(command=DEMO + " --spawn-child", restart_backoff="100ms")
    config = write_config(tmp_path, {"web": spec})
    daemon = up(daemon_factory, config)
    old = daemon.component("web")["active"]["pid"]
    child = psutil.Process(old).children()[0].pid
    try:
        os.kill(old, signal.SIGKILL)
        assert wait_until(lambda: pid_of(daemon, "web") not in (None, old), timeout=10)
        assert daemon.component("web")["state"] == "running"
        # The crashed instance's child is in its process group and carries its marker.
        assert wait_until(lambda: not alive(child), timeout=5), "child of the crashed instance"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_first_crash_restarts_at_once_a_second_one_waits_restart_backoff(
    tmp_path: Path, daemon_factory
) -> None:
    # docs/how-it-works.md: a replacement is started at once; a crash soon after an
    # earlier one waits its backoff first.
    spec = component(restart_backoff="1500ms", restart_backoff_max="4s", hold_timeout="10s")
    config = write_config(tmp_path, {"web": spec})
    daemon = up(daemon_factory, config)

    def crash_and_time_the_restart(restarts_before: int) -> float:
        pid = pid_of(daemon, "web")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        assert wait_until(
            lambda: daemon.output().count("starting a replacement") > restarts_before, timeout=10
        )
        took = time.monotonic() - began
        assert wait_until(lambda: pid_of(daemon, "web") not in (None, pid), timeout=10)
        return took

    assert crash_and_time_the_restart(0) < 1.0
    assert crash_and_time_the_restart(1) >= 1.4
    assert daemon.component("web")["restarts"] == 2


# -- 4. a crash loop ends in failed ---------------------------------------------------------------


def test_crash_loop_ends_in_failed_and_restart_brings_it_back(
    tmp_path: Path, daemon_factory
) -> None:
    app, mode = write_app(tmp_path)
    mode.write_text("crashloop")
    spec = component(
        command=f"{PY} {app} {{port}}",
        max_restarts=2,
        restart_window="60s",
        restart_backoff="100ms",
        hold_timeout="3s",
    )
    config = write_config(tmp_path, {"web": spec})
    daemon = up(daemon_factory, config)
    assert wait_until(lambda: daemon.component("web")["state"] == "failed", timeout=15), (
        daemon.output()
    )
    status = daemon.component("web")
    assert status["active"] is None and status["restarts"] == 2
    assert status["last_error"].startswith("gave up after 2 restarts in 1m; last: pid ")
    assert "exited with code 1" in status["last_error"]
    assert status["last_exit"] == 1
    assert status["log_tail"] == []  # not without the token: an app's output may hold secrets
    with_token = json.loads(cli(config, "status", "--json").stdout)["components"][0]
    assert any("giving up (crashloop)" in line for line in with_token["log_tail"])
    began = time.monotonic()
    code, headers, _ = get(daemon.url("web"))
    assert code == 503 and headers.get("Retry-After") == "1"
    assert time.monotonic() - began < 1  # at once, not after hold_timeout
    table = cli(config, "status")
    assert table.returncode == 0 and "failed" in table.stdout

    mode.write_text("ok")
    result = cli(config, "restart", "web")
    assert result.returncode == 0, result.stderr
    code, headers, body = get(daemon.url("web"))
    assert code == 200 and b"mode ok" in body
    again = daemon.component("web")
    assert again["state"] == "running" and again["last_error"] is None


# -- 5. an unhealthy (but alive) instance is replaced --------------------------------------------


def test_unhealthy_instance_is_replaced_under_load(tmp_path: Path, daemon_factory) -> None:
    app, _ = write_app(tmp_path)
    spec = component(
        command=f"{PY} {app} {{port}}",
        health={"interval": "200ms", "unhealthy_threshold": 2},
        restart_backoff="100ms",
    )
    config = write_config(tmp_path, {"web": spec})
    daemon = up(daemon_factory, config)
    old = daemon.component("web")["active"]["pid"]
    with Load(daemon.url("web"), clients=8) as load:
        (tmp_path / f"sick-{old}").touch()
        assert wait_until(lambda: pid_of(daemon, "web") not in (None, old), timeout=10)
        served = load.report.ok
        assert wait_until(lambda: load.report.ok > served + 50)
    report = load.report
    assert report.failed == 0, (report.failures, report.samples[:5])
    status = daemon.component("web")
    assert status["restarts"] == 1 and status["state"] == "running"
    assert report.pids[status["active"]["pid"]] > 0
    assert wait_until(lambda: not alive(old))
    out = daemon.output()
    assert f"pid {old} failed check 1/2" in out
    assert f"pid {old} failed 2 health checks in a row (/health answered 500)" in out


# -- 6. stop and start ------------------------------------------------------------------------------


def test_stop_drains_then_answers_503_and_start_brings_it_back(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(
        tmp_path,
        {
            "web": component(command=DEMO + " --spawn-child", hold_timeout="3s"),
            "stubborn": component(command=DEMO + " --ignore-sigterm", stop_timeout="30s"),
        },
    )
    daemon = up(daemon_factory, config)
    pid = daemon.component("web")["active"]["pid"]
    tree = {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    assert len(tree) == 2
    answer: dict[str, Any] = {}

    def slow() -> None:
        code, _, body = get(daemon.url("web", "/slow?seconds=1.5"))
        answer.update(status=code, pid=json.loads(body)["pid"])

    thread = threading.Thread(target=slow)
    thread.start()
    assert wait_until(lambda: daemon.component("web")["in_flight"] == 1)
    stop = cli(config, "stop", "web")
    thread.join(10)
    assert stop.returncode == 0, stop.stderr
    assert "drained 1 request(s)" in stop.stdout and f"stopped pid {pid}" in stop.stdout
    assert answer == {"status": 200, "pid": pid}
    assert not [p for p in tree if alive(p)]
    status = daemon.component("web")
    assert status["state"] == "stopped" and status["active"] is None
    assert status["last_stop"] == "graceful"
    began = time.monotonic()
    code, headers, _ = get(daemon.url("web"))
    assert code == 503 and headers.get("Retry-After") == "1"
    assert time.monotonic() - began < 1  # at once: hold_timeout is 3s

    stubborn = daemon.component("stubborn")["active"]["pid"]
    began = time.monotonic()
    forced = cli(config, "stop", "stubborn", "--force")
    assert forced.returncode == 0, forced.stderr
    assert time.monotonic() - began < 5  # not stop_timeout (30s)
    assert "forced" in forced.stdout
    assert not alive(stubborn)
    assert daemon.component("stubborn")["last_stop"] == "forced"

    # Stopped on purpose: still stopped after the daemon restarts.
    assert cli(config, "down").returncode == 0
    assert daemon.proc.wait(20) == 0
    keep_log(daemon)
    daemon = up(daemon_factory, config)
    assert [c["state"] for c in daemon.status()["components"]] == ["stopped", "stopped"]
    assert "started pid" not in daemon.output()
    assert get(daemon.url("web"))[0] == 503

    start = cli(config, "start", "web")
    assert start.returncode == 0, start.stderr
    code, headers, _ = get(daemon.url("web"))
    assert code == 200 and int(headers["X-Instance-Pid"]) not in tree
    assert daemon.component("web")["state"] == "running"
    again = cli(config, "start", "web")
    assert again.returncode == 0 and "already running" in again.stdout


# -- 7. the daemon dies, its instances do not -----------------------------------------------------


def test_instances_outlive_a_killed_daemon_and_are_adopted(tmp_path: Path, daemon_factory) -> None:
    config = write_config(
        tmp_path, {"web": component(), "api": component(command=DEMO + " --spawn-child")}
    )
    first = up(daemon_factory, config)
    pids = actives(first.status())
    scope = scope_of(pids["web"])
    # Instances are children of the daemon's spawner, never of the daemon (see spawner.py).
    spawner = psutil.Process(pids["web"]).ppid()
    assert spawner != first.proc.pid and psutil.Process(spawner).ppid() == first.proc.pid
    kill_daemon_only(first)
    assert all(alive(p) for p in pids.values())
    assert wait_until(lambda: not alive(spawner), timeout=5)  # it leaves with its daemon

    second = up(daemon_factory, config)
    status = second.status()
    for c in status["components"]:
        assert c["state"] == "running" and c["restarts"] == 0, c
        assert c["active"]["pid"] == pids[c["name"]] and c["active"]["adopted"] is True
        code, headers, _ = get(second.url(c["name"]))
        assert code == 200 and int(headers["X-Instance-Pid"]) == pids[c["name"]]
    assert sorted(by_component(scope)) == ["api", "web"]
    assert all(len(markers) == 1 for markers in by_component(scope).values())
    assert f"adopted pid {pids['web']}" in second.output()

    # An adopted instance rotates like any other...
    with Load(second.url("web"), clients=8) as load:
        assert cli(config, "restart", "web").returncode == 0
    assert load.report.failed == 0, load.report.failures
    assert not alive(pids["web"])
    # ...and its exit (it is not the daemon's child) is noticed and repaired.
    os.kill(pids["api"], signal.SIGKILL)
    assert wait_until(lambda: pid_of(second, "api") not in (None, pids["api"]), timeout=10)
    api = second.component("api")
    assert api["restarts"] == 1 and api["active"]["adopted"] is False
    assert api["last_exit"] == -1  # not our child: its exit code is unknowable
    # The --spawn-child child of the dead adopted instance is stopped too.
    assert wait_until(lambda: all(len(m) == 1 for m in by_component(scope).values()), timeout=5)


def test_dead_or_unhealthy_instances_of_the_earlier_run_are_replaced(
    tmp_path: Path, daemon_factory
) -> None:
    app, _ = write_app(tmp_path)
    config = write_config(
        tmp_path,
        {
            "sick": component(command=f"{PY} {app} {{port}}"),
            "dead": component(command=DEMO + " --spawn-child"),
            "fine": component(),
        },
    )
    first = up(daemon_factory, config)
    pids = actives(first.status())
    scope = scope_of(pids["fine"])
    orphan = psutil.Process(pids["dead"]).children()[0].pid  # --spawn-child's child
    kill_daemon_only(first)
    (tmp_path / f"sick-{pids['sick']}").touch()
    os.kill(pids["dead"], signal.SIGKILL)  # its child lives on, with the marker

    second = up(daemon_factory, config)
    now = actives(second.status())
    assert now["fine"] == pids["fine"]
    assert now["sick"] != pids["sick"] and now["dead"] != pids["dead"]
    assert not alive(pids["sick"]) and not alive(orphan)
    out = second.output()
    assert (
        f"not adopting pid {pids['sick']}: not healthy within 3s (last check: /health answered 500)"
        in out
    )
    assert f"pid {pids['dead']} of the earlier run is gone" in out
    markers = by_component(scope)
    assert sorted(markers) == ["dead", "fine", "sick"]
    for name, found in markers.items():
        assert len(found) == 1, (name, found)
        assert environ(now[name])[MARKER] == found[0]
    for c in second.status()["components"]:
        assert c["state"] == "running" and c["restarts"] == 0


def test_instance_of_a_removed_component_is_stopped(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component(), "gone": component()})
    first = up(daemon_factory, config)
    pids = actives(first.status())
    scope = scope_of(pids["web"])
    kill_daemon_only(first)
    data = yaml.safe_load(config.read_text())
    del data["components"]["gone"]
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    second = up(daemon_factory, config)
    assert actives(second.status()) == {"web": pids["web"]}
    assert not alive(pids["gone"])
    assert f"gone: stopped pid {pids['gone']} of a removed component" in second.output()
    assert sorted(by_component(scope)) == ["web"]


# -- 8, 9. the state file cannot be trusted blindly ---------------------------------------------------


def test_a_recorded_pid_reused_by_a_stranger_is_not_killed(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    first = up(daemon_factory, config)
    real = first.component("web")["active"]["pid"]
    scope = scope_of(real)
    kill_daemon_only(first)
    strangers = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    try:
        path = tmp_path / "state" / "state.json"
        state = json.loads(path.read_text())
        record = state["components"]["web"]["instances"][0]
        # The pid now belongs to someone else (with another create time)...
        state["components"]["web"]["instances"] = [{**record, "pid": strangers[0].pid}]
        # ...and a draining record names a live stranger with its true create time.
        true_time = psutil.Process(strangers[1].pid).create_time()
        state["components"]["web"]["draining"] = [
            {**record, "pid": strangers[1].pid, "create_time": true_time}
        ]
        path.write_text(json.dumps(state))

        second = up(daemon_factory, config)
        assert all(alive(s.pid) for s in strangers)
        status = second.component("web")
        assert status["active"]["pid"] not in {real, *(s.pid for s in strangers)}
        assert status["active"]["adopted"] is False
        assert f"pid {strangers[0].pid} of the earlier run is gone" in second.output()
        assert not alive(real)  # found by its marker, and it was ours
        assert len(by_component(scope)["web"]) == 1
        assert cli(config, "restart", "web").returncode == 0
        assert all(alive(s.pid) for s in strangers)
    finally:
        for s in strangers:
            s.kill()
            s.wait()


def test_corrupt_state_file_is_moved_aside_and_orphans_are_swept(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component(), "api": component()})
    first = up(daemon_factory, config)
    pids = actives(first.status())
    scope = scope_of(pids["web"])
    kill_daemon_only(first)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        path = tmp_path / "state" / "state.json"
        path.write_text(
            '{"version": 1, "components": {"web": {"active": {"pid": '
            + str(stranger.pid)
            + ', "create_time": 0,'
        )
        second = up(daemon_factory, config)
        lines = [line for line in second.output().splitlines() if "corrupt" in line]
        assert len(lines) == 1, second.output()
        assert lines[0].startswith(f"rotator: state file {path} is corrupt (")
        assert "moved aside" in lines[0]
        aside = list(path.parent.glob("state.json.corrupt-*"))
        assert len(aside) == 1 and str(aside[0]) in lines[0]
        assert str(stranger.pid) in aside[0].read_text()  # kept as it was
        assert alive(stranger.pid)
        now = actives(second.status())
        assert set(now) == {"web", "api"}
        assert not [p for p in pids.values() if alive(p)]  # swept by their markers
        markers = by_component(scope)
        assert sorted(markers) == ["api", "web"]
        for name, found in markers.items():
            assert found == [environ(now[name])[MARKER]]
        assert json.loads(path.read_text())["version"] == STATE_VERSION  # fresh and valid
    finally:
        stranger.kill()
        stranger.wait()


# -- 10. dependencies -----------------------------------------------------------------------------------


def test_dependencies_start_first_and_stop_last(tmp_path: Path, daemon_factory) -> None:
    config = write_config(
        tmp_path,
        {
            "a": component(depends_on=["b"]),
            "b": component(command=DEMO + " --startup-delay 0.5"),
        },
    )
    daemon = up(daemon_factory, config)
    pids = actives(daemon.status())
    lines = daemon.output().splitlines()

    def index(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert index(f"b: pid {pids['b']} healthy") < index("a: started pid")
    down = cli(config, "down")
    assert down.returncode == 0, down.stderr
    assert daemon.proc.wait(20) == 0
    lines = daemon.output().splitlines()
    assert index(f"a: stopped pid {pids['a']}") < index(f"b: stopped pid {pids['b']}")


def test_dependent_of_a_failed_component_is_not_started(tmp_path: Path, daemon_factory) -> None:
    config = write_config(
        tmp_path,
        {
            "a": component(depends_on=["b"]),
            "b": component(command=DEMO + " --crash-on-start"),
        },
    )
    daemon = up(daemon_factory, config)
    a, b = daemon.component("a"), daemon.component("b")
    assert b["state"] == "failed" and "exited with code 3" in b["last_error"]
    assert a["state"] == "failed" and a["active"] is None
    assert "depends on is not running" in a["last_error"]
    assert "a: started pid" not in daemon.output()


def test_dependency_cycle_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "a": component(depends_on=["b"]),
            "b": component(depends_on="c"),
            "c": component(depends_on=["a"]),
        },
    )
    check = cli(config, "check")
    assert check.returncode == 2
    assert "components.a.depends_on: dependency cycle: a -> b -> c -> a" in check.stderr
    assert one_line(check.stderr), check.stderr
    up = cli(config, "up", timeout=20)
    assert up.returncode == 2 and "dependency cycle" in up.stderr


# -- 11. one daemon per config ------------------------------------------------------------------------


def test_second_up_is_refused_naming_the_first(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = up(daemon_factory, config)
    pid = daemon.component("web")["active"]["pid"]
    second = cli(config, "up", timeout=20)
    assert second.returncode == 1
    assert "already running" in second.stderr and f"pid {daemon.proc.pid}" in second.stderr
    assert one_line(second.stderr), second.stderr
    assert daemon.proc.poll() is None and daemon.component("web")["active"]["pid"] == pid
    assert cli(config, "restart", "web").returncode == 0  # the token is still the first's


# -- 12. bad input ----------------------------------------------------------------------------------------


def test_bad_admin_bodies_are_400_and_harmless(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = up(daemon_factory, config)
    pid = daemon.component("web")["active"]["pid"]
    token = (tmp_path / "state" / "admin.token").read_text().strip()

    def post(path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            daemon.admin + path,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, {"body": resp.read().decode()}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    cases = [
        ("restart", b"{nope", "not valid JSON"),
        ("restart", b"\xff\xfe", "not valid JSON"),
        ("restart", b"[1, 2]", "must be a JSON object"),
        ("restart", b'"web"', "must be a JSON object"),
        ("restart", b'{"force": true}', "unknown field 'force'"),
        ("stop", b'{"force": "yes"}', "'force' has the wrong type"),
        ("stop", b'{"force": true, "now": 1}', "unknown field 'now'"),
        ("deploy", b'{"env": "A=1"}', "'env' has the wrong type"),
        ("deploy", b'{"command": 5}', "'command' has the wrong type"),
        ("deploy", b'{"command": ""}', "command is empty"),
        ("deploy", b'{"command": "a \'b"}', "cannot be split"),
        ("deploy", b'{"cwd": "/does/not/exist"}', "/does/not/exist does not exist"),
        ("deploy", b'{"command": ["x", 1]}', ""),
        ("deploy", b'{"env": {"A": [1]}}', ""),
        ("rollback", b"{}", "nothing to roll back"),
        ("start", b"{nope", "not valid JSON"),
        ("start", b'{"x": null}', "unknown field 'x'"),
    ]
    for op, body, message in cases:
        code, answer = post(f"/v1/components/web/{op}", body)
        assert code == 400, (op, body, code, answer)
        assert message in answer["error"], (op, body, answer)
    code, answer = post("/v1/shutdown", b"[]")
    assert code == 400 and "JSON object" in answer["error"]
    code, answer = post("/v1/components/web/restart", b"{" + b" " * 70000 + b"}")
    assert code == 413 and "error" in answer
    assert daemon.proc.poll() is None
    status = daemon.component("web")
    assert status["active"]["pid"] == pid and status["restarts"] == 0
    assert status["definition"]["source"] == "config"


def test_bad_cli_input_is_a_one_line_error(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = up(daemon_factory, config)
    pid = daemon.component("web")["active"]["pid"]

    env = cli(config, "deploy", "web", "--env", "NOEQUALS")
    assert env.returncode == 2 and one_line(env.stderr), env
    assert env.stderr.startswith("rotator: ") and "NOEQUALS" in env.stderr
    cwd = cli(config, "deploy", "web", "--cwd", "/does/not/exist")
    assert cwd.returncode == 2 and one_line(cwd.stderr), cwd
    assert "/does/not/exist" in cwd.stderr
    missing = cli(config, "deploy", "web", "--command", "no-such-binary-xyz --port {port}")
    assert missing.returncode == 1, missing
    assert "rotator: web: deploy failed: command not found: no-such-binary-xyz" in missing.stderr
    assert "Traceback" not in missing.stderr
    status = daemon.component("web")
    assert status["active"]["pid"] == pid and status["state"] == "running"
    assert status["definition"]["source"] == "config" and status["restarts"] == 0
    for args in (
        ["restart", "nope"],
        ["restart", "web", "nope"],
        ["deploy", "nope", "--env", "A=1"],
        ["rollback", "nope"],
        ["start", "nope"],
        ["stop", "nope"],
        ["stop", "nope", "--force"],
    ):
        result = cli(config, *args)
        assert result.returncode == 2, (args, result)
        assert one_line(result.stderr) and "unknown component 'nope'" in result.stderr, args
    assert daemon.component("web")["active"]["pid"] == pid


# -- 13. a double fork does not escape ---------------------------------------------------------------


def test_double_forked_grandchild_is_stopped_with_its_instance(
    tmp_path: Path, daemon_factory
) -> None:
    config = script_config(tmp_path, "escape.py", ESCAPE)

    def escapees() -> set[int]:
        return pids_noted(tmp_path, "escapee")

    try:
        daemon = up(daemon_factory, config)
        first = daemon.component("web")["active"]
        assert wait_until(lambda: len(escapees()) == 1)
        (escapee,) = escapees()
        first_marker = environ(first["pid"])[MARKER]
        scope = first_marker.split(":")[0]
        assert environ(escapee)[MARKER] == first_marker
        assert os.getsid(escapee) == escapee  # out of the instance's session and group
        assert escapee not in {p.pid for p in psutil.Process(first["pid"]).children(True)}

        restart = cli(config, "restart", "web")
        assert restart.returncode == 0, restart.stderr
        assert first_marker not in marked(scope)
        assert not alive(escapee)
        assert wait_until(lambda: len(escapees()) == 2)
        down = cli(config, "down")
        assert down.returncode == 0, down.stderr
        assert daemon.proc.wait(20) == 0
        assert marked(scope) == {}
        assert not [p for p in escapees() if alive(p)]
    finally:
        kill_all(escapees())


def test_child_out_of_group_without_marker_is_stopped_as_a_descendant(
    tmp_path: Path, daemon_factory
) -> None:
    config = script_config(tmp_path, "detach.py", DETACH)

    def detached() -> set[int]:
        return pids_noted(tmp_path, "detached")

    try:
        daemon = up(daemon_factory, config)
        first = daemon.component("web")["active"]["pid"]
        assert wait_until(lambda: len(detached()) == 1)
        (child,) = detached()
        assert os.getsid(child) == child and MARKER not in environ(child)
        assert child in {p.pid for p in psutil.Process(first).children()}

        restart = cli(config, "restart", "web")
        assert restart.returncode == 0, restart.stderr
        assert wait_until(lambda: not alive(child))  # it ignored SIGTERM: killed at stop_timeout
        assert alive(daemon.component("web")["active"]["pid"])
    finally:
        kill_all(detached())


# -- the descriptor table is sized before the daemon has threads ---------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="FDSize is Linux's /proc")
def test_descriptor_table_is_reserved_before_threads_start(tmp_path: Path, daemon_factory) -> None:
    # Growing it later, with threads running, stalls every request for an RCU grace period.
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 4096 if soft == resource.RLIM_INFINITY else min(4096, soft)
    config = write_config(tmp_path, {"web": component()})
    daemon = up(daemon_factory, config)
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    size = int(next(line.split()[1] for line in status.splitlines() if line.startswith("FDSize:")))
    assert size >= expected, status
    assert not Path(f"/proc/{daemon.proc.pid}/fd/{expected - 1}").exists()  # reserved, not held

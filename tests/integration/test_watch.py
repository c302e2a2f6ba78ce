"""Restart on save end to end (issue 18's proof): a saved file rotates its component with
zero downtime; a burst of saves rotates once or twice; a broken save leaves the old
instance serving and says why; ignored files and `up --no-watch` change nothing.

Real daemons, a real Python app whose source the tests edit, real load."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import (
    PY,
    Load,
    RunningDaemon,
    alive,
    cli,
    component,
    parse_samples,
    sample,
    wait_until,
    write_config,
)

# The app under edit: a threaded stdlib server answering with its pid. VERSION changes
# with each good save, so a save always changes the file's content.
APP = r"""
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = ("%d %d\n" % (os.getpid(), VERSION)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.request_queue_size = 128
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
print("app pid %d version %d" % (os.getpid(), VERSION), flush=True)
server.serve_forever()
"""
DEBOUNCE = "100ms"
QUIET = 1.5  # long enough for a save that was going to rotate to have begun rotating


def make_app(tmp_path: Path, **watch: Any) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    save(app, 1)
    spec = component(command=f"{PY} app.py {{port}}", cwd=str(app), watch=["app.py"])
    spec |= {"watch_debounce": DEBOUNCE, **watch}
    return write_config(tmp_path, {"app": spec})


def save(app: Path, version: int, text: str | None = None) -> None:
    (app / "app.py").write_text(
        text if text is not None else APP.replace("{version}", str(version))
    )


def watching(daemon: RunningDaemon) -> RunningDaemon:
    """The daemon, once its watches are set (a save before then goes unseen)."""
    line = "rotator: restart on save: watching the files of app"
    assert wait_until(lambda: line in daemon.output()), daemon.output()
    return daemon


def active_pid(daemon: RunningDaemon) -> int:
    return int(daemon.component("app")["active"]["pid"])


def rotated_to_new_pid(daemon: RunningDaemon, old: int) -> bool:
    comp = daemon.component("app")
    return comp["state"] == "running" and comp["active"]["pid"] != old and not comp["draining"]


def watch_lines(daemon: RunningDaemon, what: str) -> list[str]:
    return [line for line in daemon.output().splitlines() if re.search(f"app: .*{what}", line)]


def test_a_save_rotates_under_load_without_a_failed_request(
    tmp_path: Path, daemon_factory: Any
) -> None:
    daemon = watching(daemon_factory(make_app(tmp_path)))
    old = active_pid(daemon)
    with Load(daemon.url("app"), clients=16) as load:
        save(tmp_path / "app", 2)
        assert wait_until(lambda: rotated_to_new_pid(daemon, old), timeout=15), daemon.output()
        time.sleep(0.3)  # requests on the new instance too
    assert load.report.failed == 0, (load.report.failures, load.report.samples[:5])
    assert load.report.ok > 100
    assert watch_lines(daemon, "app.py changed, rotating"), daemon.output()
    with urllib.request.urlopen(daemon.admin + "/metrics", timeout=5) as resp:
        samples = parse_samples(resp.read().decode())
    assert sample(samples, "rotator_rotation_reasons_total", component="app", reason="watch") == 1


def test_a_burst_of_saves_rotates_once_or_twice(tmp_path: Path, daemon_factory: Any) -> None:
    # The default debounce: a loaded machine may pause the saves past a shorter one.
    daemon = watching(daemon_factory(make_app(tmp_path, watch_debounce="300ms")))
    old = active_pid(daemon)
    for version in range(2, 12):  # ten saves, as an editor's "save all" or a formatter
        save(tmp_path / "app", version)
        time.sleep(0.02)
    assert wait_until(lambda: rotated_to_new_pid(daemon, old), timeout=15), daemon.output()
    time.sleep(QUIET)
    assert wait_until(lambda: daemon.component("app")["state"] == "running")
    rotations = watch_lines(daemon, "changed, rotating")
    assert 1 <= len(rotations) <= 2, daemon.output()


def test_a_broken_save_keeps_the_old_instance_and_the_next_good_save_rotates(
    tmp_path: Path, daemon_factory: Any
) -> None:
    daemon = watching(daemon_factory(make_app(tmp_path)))
    old = active_pid(daemon)
    save(tmp_path / "app", 2, text=APP.replace("{version}", "2 +"))  # a syntax error
    assert wait_until(lambda: watch_lines(daemon, "rotation for app.py failed"), timeout=15), (
        daemon.output()
    )
    failure = watch_lines(daemon, "rotation for app.py failed")
    assert len(failure) == 1
    assert f"pid {old} keeps serving; the next save tries again" in failure[0]
    out = daemon.output()
    # The new instance's last lines, once: the watch event says it all, no `failed` event.
    assert len(re.findall(r"^    \| SyntaxError", out, re.M)) == 1, out
    comp = daemon.component("app")
    assert comp["active"]["pid"] == old and comp["state"] == "running"
    save(tmp_path / "app", 3)
    assert wait_until(lambda: rotated_to_new_pid(daemon, old), timeout=15), daemon.output()
    assert len(watch_lines(daemon, "rotation for app.py failed")) == 1


def test_an_ignored_file_changes_nothing(tmp_path: Path, daemon_factory: Any) -> None:
    daemon = watching(daemon_factory(make_app(tmp_path, watch=["."], watch_ignore=["*.log"])))
    old = active_pid(daemon)
    app = tmp_path / "app"
    (app / "server.log").write_text("a line\n")  # the user's watch_ignore
    (app / ".app.py.swp").write_text("vim")  # the default ignores: swap files, caches, .git
    (app / "__pycache__").mkdir(exist_ok=True)
    (app / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (app / ".git").mkdir()
    (app / ".git" / "index").write_bytes(b"\0")
    time.sleep(QUIET)
    assert not watch_lines(daemon, "changed"), daemon.output()
    assert active_pid(daemon) == old
    save(app, 2)  # the watch was on all along
    assert wait_until(lambda: rotated_to_new_pid(daemon, old), timeout=15), daemon.output()


def test_no_watch_turns_it_off_and_a_stopped_component_says_why_once(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = make_app(tmp_path)
    daemon = daemon_factory(config, args=("--no-watch",))
    old = active_pid(daemon)
    save(tmp_path / "app", 2)
    time.sleep(QUIET)
    assert active_pid(daemon) == old
    assert "rotator: --no-watch: not watching the files of app" in daemon.output()
    assert not watch_lines(daemon, "changed")
    daemon.stop()
    daemon = watching(daemon_factory(config))
    assert cli(config, "stop", "app").returncode == 0
    save(tmp_path / "app", 3)
    time.sleep(QUIET)
    save(tmp_path / "app", 4)
    time.sleep(QUIET)
    held = watch_lines(daemon, "not rotating: stopped on purpose")
    assert len(held) == 1, daemon.output()
    assert daemon.component("app")["state"] == "stopped"


def test_a_reload_starts_and_stops_watching(tmp_path: Path, daemon_factory: Any) -> None:
    config = make_app(tmp_path, watch=[])
    daemon = daemon_factory(config)
    first = active_pid(daemon)
    unwatched = config.read_text()
    config.write_text(unwatched.replace("watch: []", "watch:\n    - app.py"))
    assert cli(config, "reload").returncode == 0
    watching(daemon)
    save(tmp_path / "app", 2)
    assert wait_until(lambda: rotated_to_new_pid(daemon, first), timeout=15), daemon.output()
    second = active_pid(daemon)
    config.write_text(unwatched)  # watch: [] again
    assert cli(config, "reload").returncode == 0
    save(tmp_path / "app", 3)
    time.sleep(QUIET)
    assert active_pid(daemon) == second
    assert len(watch_lines(daemon, "changed, rotating")) == 1, daemon.output()


def watcher_pid(daemon: RunningDaemon) -> int:
    [child] = [
        p
        for p in psutil.Process(daemon.proc.pid).children()
        if "rotator.watcher_process" in " ".join(p.cmdline())
    ]
    return child.pid


def test_a_watching_process_that_dies_is_reported_and_the_fleet_serves_on(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = make_app(tmp_path)
    daemon = watching(daemon_factory(config))
    os.kill(watcher_pid(daemon), signal.SIGKILL)
    stopped = "rotator: warning: restart on save stopped: the watching process (pid"
    assert wait_until(lambda: stopped in daemon.output()), daemon.output()
    old = active_pid(daemon)
    with urllib.request.urlopen(daemon.url("app"), timeout=5) as resp:
        assert resp.status == 200
    assert cli(config, "reload").returncode == 0  # a reload tries again
    assert wait_until(lambda: daemon.output().count("watching the files of app") == 2)
    save(tmp_path / "app", 2)
    assert wait_until(lambda: rotated_to_new_pid(daemon, old), timeout=15), daemon.output()


def test_the_watching_process_ends_with_a_daemon_that_was_killed(
    tmp_path: Path, daemon_factory: Any
) -> None:
    daemon = watching(daemon_factory(make_app(tmp_path)))
    pid = watcher_pid(daemon)
    os.killpg(daemon.proc.pid, signal.SIGKILL)  # no shutdown: its end of the channel closes
    assert wait_until(lambda: not alive(pid), timeout=5)


def test_check_and_up_refuse_a_watch_path_that_does_not_exist(tmp_path: Path) -> None:
    config = make_app(tmp_path, watch=["app.py", "ap.py"])
    line = config.read_text().splitlines().index("    - ap.py") + 1
    for command in ("check", "up"):
        result = cli(config, command)
        assert result.returncode == 2, result
        assert result.stderr == (
            f"{config}:{line}: components.app.watch[1]: {tmp_path}/app/ap.py does not exist\n"
        )

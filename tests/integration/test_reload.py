"""Config reload end to end: `rotator reload` and SIGHUP applying each kind of change
(added, removed, rotated, updated in place, unchanged, moved), rejecting a bad file or an
address held by someone else with nothing changed, a failed rotation that leaves the old
instance serving; and the daemon's `--log-format json` output.

Real daemons, real instances, real sockets, the real CLI."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.conftest import DEMO, Load, alive, cli, component, free_ports, wait_until, write_config

INSTANCE_EVENTS = {"spawned", "healthy", "switched", "drained", "stopped"}


def rewrite(config: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Edit the config file in place as `change` says; the new components section."""
    data = yaml.safe_load(config.read_text())
    change(data["components"])
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    components: dict[str, Any] = data["components"]
    return components


def pids(daemon: Any) -> dict[str, Any]:
    return {
        c["name"]: c["active"]["pid"] if c["active"] else None
        for c in daemon.status()["components"]
    }


def serving_pid(listen: str, path: str = "/") -> int:
    with urllib.request.urlopen(f"http://{listen}{path}", timeout=10) as resp:
        return int(resp.headers["X-Instance-Pid"])


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def released(listen: str) -> bool:
    """Nobody listens on `listen` any more: a server of ours can bind it."""
    host, port = listen.rsplit(":", 1)
    with socket.socket() as s:
        # As any server would: past the TIME_WAITs of the proxied connections.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            s.listen()
        except OSError:
            return False
    return True


@contextlib.contextmanager
def held(listen: str) -> Iterator[socket.socket]:
    """A stranger listening on `listen`."""
    host, port = listen.rsplit(":", 1)
    with socket.socket() as s:
        s.bind((host, int(port)))
        s.listen()
        yield s


def instances_on(ports: list[int]) -> list[int]:
    """Processes started with `--port P` for one of `ports`."""
    wanted = {str(p) for p in ports}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        words = proc.info["cmdline"] or []
        if any(a == "--port" and b in wanted for a, b in itertools.pairwise(words)):
            found.append(proc.pid)
    return found


def test_reload_applies_each_kind_of_change(tmp_path: Path, daemon_factory) -> None:
    config = write_config(
        tmp_path,
        {
            "keep": component(),
            "cmd": component(),
            "tune": component(),
            "gone": component(),
            "move": component(),
        },
    )
    daemon = daemon_factory(config)
    before = pids(daemon)
    old = yaml.safe_load(config.read_text())["components"]
    added = component()

    def change(components: dict[str, Any]) -> None:
        components["cmd"]["command"] = DEMO + " --close"
        components["tune"].update(read_timeout="500ms", drain_timeout="1s")
        components["move"]["listen"] = f"127.0.0.1:{free_ports(1)[0]}"
        del components["gone"]
        components["new"] = added

    new = rewrite(config, change)
    with (
        Load(daemon.url("cmd"), clients=4) as cmd_load,
        Load(daemon.url("keep"), clients=2) as keep,
    ):
        result = cli(config, "reload")
    assert result.returncode == 0, result
    for load in (cmd_load, keep):
        assert load.report.failed == 0, (load.url, load.report.failures, load.report.samples[:5])
    summary = result.stdout.splitlines()[-1]
    assert summary.startswith(f"reloaded {config} in "), result.stdout
    for part in (
        "started new",
        "removed gone",
        "moved to a new address move",
        "rotated cmd",
        "updated in place tune",
    ):
        assert part in summary, (part, summary)
    assert "keep" not in summary

    after = pids(daemon)
    assert list(after) == ["keep", "cmd", "tune", "move", "new"]
    assert after["keep"] == before["keep"] and after["tune"] == before["tune"]
    assert after["cmd"] != before["cmd"] and not alive(before["cmd"])
    assert serving_pid(new["cmd"]["listen"]) == after["cmd"]
    assert serving_pid(added["listen"]) == after["new"]
    # Removed: its instance stopped, its address free for anyone.
    assert not alive(before["gone"])
    assert released(old["gone"]["listen"])
    # Moved: the new address answers, the old one is free.
    assert serving_pid(new["move"]["listen"]) == after["move"]
    assert released(old["move"]["listen"])
    # In place: the new read_timeout already guards the running instance.
    assert status_of(f"http://{new['tune']['listen']}/slow?seconds=2") == 504
    assert daemon.component("tune")["active"]["pid"] == before["tune"]


def test_a_bad_reload_changes_nothing(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component(), "other": component()})
    good = config.read_text()
    daemon = daemon_factory(config)
    before = pids(daemon)
    extra = component()

    config.write_text(good + "  broken: [\n")
    syntax = cli(config, "reload")
    assert syntax.returncode == 2, syntax
    broken = rf"{re.escape(str(config))}:\d+: components.broken: invalid YAML"  # file:line: field
    assert re.search(broken, syntax.stderr), syntax.stderr
    # The daemon checks the file itself too (the CLI's check is a courtesy).
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    request = urllib.request.Request(
        daemon.admin + "/v1/reload", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("the daemon accepted a broken config")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        problems = json.load(exc)["problems"]
    assert re.match(broken, problems[0]), problems

    def unknown_key(components: dict[str, Any]) -> None:
        components["extra"] = extra
        components["web"]["bogus"] = 1

    config.write_text(good)
    rewrite(config, unknown_key)
    unknown = cli(config, "reload")
    assert unknown.returncode == 2, unknown
    assert re.search(r"rotator\.yaml:\d+: components\.web\.bogus: unknown key", unknown.stderr)
    assert pids(daemon) == before
    assert released(extra["listen"])

    config.write_text(good)
    stranger = component()
    rewrite(config, lambda c: c.update(extra=extra, stranger=stranger))
    with held(stranger["listen"]):
        taken = cli(config, "reload")
    assert taken.returncode == 2, taken
    assert "Traceback" not in taken.stderr
    assert f"components.stranger.listen: cannot bind {stranger['listen']}" in taken.stderr
    assert pids(daemon) == before
    # The other new component was neither started nor left holding its address.
    assert released(extra["listen"])
    assert instances_on(extra["ports"]) == []
    assert all(alive(pid) for pid in before.values())

    # Once the address is free, the same file applies: the rejection left nothing behind.
    retry = cli(config, "reload")
    assert retry.returncode == 0, retry
    assert "started extra, stranger" in retry.stdout
    assert serving_pid(stranger["listen"]) == daemon.component("stranger")["active"]["pid"]


def test_a_failed_rotation_on_reload_keeps_the_old_instance(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    before = daemon.component("web")["active"]["pid"]

    def broken(components: dict[str, Any]) -> None:
        components["web"]["command"] = DEMO + " --never-healthy"
        components["web"]["health"] = {"start_timeout": "1s"}

    spec = rewrite(config, broken)["web"]
    with Load(daemon.url("web"), clients=4) as load:
        result = cli(config, "reload")
    assert result.returncode == 1, result
    assert load.report.failed == 0, load.report.failures
    assert result.stderr.startswith("rotator: reload failed: web failed ("), result.stderr
    assert "not healthy within start_timeout 1s" in result.stderr
    assert daemon.component("web")["active"]["pid"] == before
    assert serving_pid(spec["listen"]) == before

    rewrite(config, lambda c: c["web"].update(command=DEMO + " --close"))
    fixed = cli(config, "reload")
    assert fixed.returncode == 0, fixed
    assert "rotated web" in fixed.stdout
    now = daemon.component("web")["active"]["pid"]
    assert now != before and serving_pid(spec["listen"]) == now
    assert wait_until(lambda: not alive(before))


def test_sighup_reloads_and_the_json_log_is_all_json(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    good = config.read_text()
    daemon = daemon_factory(config, args=("--log-format", "json"))
    pid = json.loads(cli(config, "status", "--json").stdout)["daemon"]["pid"]
    before = pids(daemon)

    rewrite(config, lambda c: c["web"].update(bogus=1))
    os.kill(pid, signal.SIGHUP)
    assert wait_until(lambda: "components.web.bogus: unknown key" in daemon.output(), timeout=20)
    assert daemon.proc.poll() is None
    assert pids(daemon) == before

    config.write_text(good)
    extra = component()
    rewrite(config, lambda c: c.update(extra=extra))
    os.kill(pid, signal.SIGHUP)
    assert wait_until(lambda: "extra" in pids(daemon), timeout=20), daemon.output()
    assert wait_until(lambda: daemon.component("extra")["state"] == "running", timeout=20)
    assert serving_pid(extra["listen"]) == daemon.component("extra")["active"]["pid"]
    assert pids(daemon)["web"] == before["web"]
    assert cli(config, "restart", "web").returncode == 0
    assert daemon.stop() == 0

    records = [json.loads(line) for line in daemon.output().splitlines()]
    assert records and all(isinstance(r, dict) and "time" in r for r in records)
    said = [r["message"] for r in records if r.get("component") is None]
    assert any("reload rejected" in line for line in said), said
    assert any("reload ok: started extra" in line for line in said), said
    happened = [r for r in records if "kind" in r]
    assert all(isinstance(r["component"], str) for r in happened if r["kind"] != "daemon")
    assert all(r["component"] is None for r in happened if r["kind"] == "daemon")
    instance = [r for r in happened if r["kind"] in INSTANCE_EVENTS]
    assert {r["kind"] for r in instance} == INSTANCE_EVENTS
    assert all(isinstance(r["pid"], int) for r in instance), instance
    assert {r["component"] for r in instance} == {"web", "extra"}

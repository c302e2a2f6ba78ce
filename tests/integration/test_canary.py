"""Canary deploys with real processes, the real CLI and clients that never retry: a broken
canary rolled back with only its share of requests failed, a good one promoted, the
header that picks a side, promote and rollback by hand, too little traffic, replicas,
and a daemon killed while a canary runs."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import PY, Load, alive, cli, component, wait_until, write_config

NEW = f"{PY} -m rotator.demo --port {{port}} --name v2"
BROKEN = f"{PY} -m rotator.demo --port {{port}} --name broken --fail-every 5"


def get(url: str, side: str | None = None, path: str = "/") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url.rstrip("/") + path)
    if side is not None:
        request.add_header("X-Rotator-Canary", side)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return int(resp.headers["X-Instance-Pid"]), json.load(resp)


def up(tmp_path: Path, daemon_factory: Any, **extra: Any) -> tuple[Path, Any]:
    config = write_config(tmp_path, {"web": component(**extra)})
    return config, daemon_factory(config)


def canary_pids(daemon: Any) -> list[int]:
    canary = daemon.component("web")["canary"]
    return [] if canary is None else [i["pid"] for i in canary["instances"]]


def start_canary(config: Path, daemon: Any, *args: str) -> list[int]:
    """`deploy --canary ... --no-wait`, and the canary's pids once it serves."""
    result = cli(config, "deploy", "web", "--no-wait", *args)
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: canary_pids(daemon), timeout=15), daemon.output()
    return canary_pids(daemon)


def test_a_broken_canary_is_rolled_back_and_only_its_share_fails(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config, daemon = up(tmp_path, daemon_factory)
    stable = daemon.component("web")["active"]["pid"]
    with Load(daemon.url("web"), clients=16) as load:
        result = cli(config, "deploy", "web", "--canary", "20", "--for", "20s", "--command", BROKEN)
    assert result.returncode == 1, result.stdout
    assert "canary rolled back: canary error rate" in result.stderr
    assert "| demo broken pid" in result.stderr  # the canary's last log lines
    assert daemon.component("web")["active"]["pid"] == stable
    assert daemon.component("web")["canary"] is None
    report = load.report
    # Every failure is one of the canary's own 500s: 20% of the requests for a few
    # seconds, one in five of those; never a request of the stable side's.
    assert set(report.failures) <= {"status 500"}, report.failures
    assert all('"broken"' not in s and '"error": "--fail-every"' in s for s in report.samples)
    assert report.failed <= 0.08 * (report.ok + report.failed), (report.failed, report.ok)
    assert report.pids[stable] > 0.7 * report.ok
    broken = [p for p in report.pids if p != stable]
    assert broken and not any(alive(p) for p in broken)  # the canary is gone
    assert "rolled back" in result.stdout


def test_a_good_canary_is_promoted_and_then_serves_every_request(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config, daemon = up(tmp_path, daemon_factory)
    stable = daemon.component("web")["active"]["pid"]
    with Load(daemon.url("web"), clients=16) as load:
        args = ("--canary", "30", "--for", "2s", "--min-requests", "5", "--command", NEW)
        result = cli(config, "deploy", "web", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "web: canary web 30%: " in result.stdout  # the running comparison
    assert "canary promoted:" in result.stdout and "within the rule" in result.stdout
    assert load.report.failed == 0, load.report.failures
    web = daemon.component("web")
    assert web["definition"]["source"] == "deployed" and web["canary"] is None
    assert {get(daemon.url("web"))[1]["name"] for _ in range(20)} == {"v2"}
    assert not alive(stable)
    assert cli(config, "rollback", "web").returncode == 0  # as after any deploy
    assert {get(daemon.url("web"))[1]["name"] for _ in range(10)} == {"web"}


def test_the_header_picks_a_side_never_reaches_the_app_and_promote_ends_early(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config, daemon = up(tmp_path, daemon_factory)
    stable = daemon.component("web")["active"]["pid"]
    (canary,) = start_canary(config, daemon, "--canary", "10", "--for", "60s", "--command", NEW)
    url = daemon.url("web")
    assert {get(url, "always")[0] for _ in range(10)} == {canary}
    assert {get(url, "never")[0] for _ in range(10)} == {stable}
    _, seen = get(url, "always", "/headers")
    assert not [k for k, _ in seen["headers"] if k.lower() == "x-rotator-canary"]
    # Nothing else may change what runs meanwhile.
    for args in (("restart", "web"), ("scale", "web", "2"), ("deploy", "web")):
        refused = cli(config, *args)
        assert refused.returncode == 1 and "a canary is running (10%" in refused.stderr, args
    table = cli(config, "status").stdout
    assert f"web: canary 10% (pid {canary}, " in table
    promoted = cli(config, "promote", "web")
    assert promoted.returncode == 0, promoted.stderr
    assert daemon.component("web")["active"]["pid"] == canary
    assert not alive(stable)


def test_rollback_during_a_canary_and_too_little_traffic(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config, daemon = up(tmp_path, daemon_factory)
    stable = daemon.component("web")["active"]["pid"]
    (canary,) = start_canary(config, daemon, "--canary", "10", "--for", "60s", "--command", NEW)
    aborted = cli(config, "rollback", "web")
    assert aborted.returncode == 0, aborted.stderr
    assert daemon.component("web")["canary"] is None and not alive(canary)
    assert daemon.component("web")["active"]["pid"] == stable
    began = time.monotonic()
    idle = cli(config, "deploy", "web", "--canary", "10", "--for", "1s", "--command", NEW)
    assert idle.returncode == 1
    assert "not enough traffic (0 of 20 requests)" in idle.stderr
    assert time.monotonic() - began < 10
    assert daemon.component("web")["active"]["pid"] == stable


def test_a_canary_of_replicas_is_promoted_replica_by_replica(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config, daemon = up(tmp_path, daemon_factory, pool=4, replicas=2)
    before = {i["pid"] for i in daemon.component("web")["instances"]}
    with Load(daemon.url("web"), clients=16) as load:
        args = ("--canary", "50", "--for", "2s", "--min-requests", "5", "--command", NEW)
        result = cli(config, "deploy", "web", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.report.failed == 0, load.report.failures
    web = daemon.component("web")
    assert len(web["instances"]) == 2 and not before & {i["pid"] for i in web["instances"]}
    assert {get(daemon.url("web"))[1]["name"] for _ in range(20)} == {"v2"}


def test_a_daemon_killed_during_a_canary_comes_back_on_the_stable_definition(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config, daemon = up(tmp_path, daemon_factory)
    stable = daemon.component("web")["active"]["pid"]
    (canary,) = start_canary(config, daemon, "--canary", "10", "--for", "60s", "--command", NEW)
    daemon.proc.kill()
    daemon.proc.wait(10)
    daemon.log.rename(daemon.log.with_name("daemon-first.out"))
    again = daemon_factory(config)
    assert f"web: a canary (pid {canary}) was on trial when the earlier daemon died" in (
        again.output()
    )
    web = again.component("web")
    assert web["active"]["pid"] == stable and web["active"]["adopted"] and web["canary"] is None
    assert wait_until(lambda: not alive(canary), timeout=10)
    assert {get(again.url("web"))[1]["name"] for _ in range(10)} == {"web"}

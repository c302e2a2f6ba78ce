"""Fleet operations end to end: `restart --all` / `--parallel` in dependency order under
load, stopping at the first failure, stopped components left alone, usage errors, the
LAST STOP column, and the event history (`rotator events`, state_dir/events.log).

Real daemons, real instances, real sockets, the real CLI."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shlex
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import DEMO, PY, Load, alive, cli, component, write_config

# b and c depend on a, d on b: the order is a, b, c, d, and b and c may rotate together.
DEPENDS = {"a": [], "b": ["a"], "c": ["a"], "d": ["b"]}
EVENT_KEYS = {"time", "component", "kind", "message"}


def fleet(tmp_path: Path, **commands: str) -> Path:
    """A config of the DEPENDS components, with a command of the test's choosing for some."""
    return write_config(
        tmp_path,
        {
            name: component(command=commands.get(name, DEMO), depends_on=deps)
            for name, deps in DEPENDS.items()
        },
    )


def pids(daemon: Any) -> dict[str, Any]:
    return {
        c["name"]: c["active"]["pid"] if c["active"] else None
        for c in daemon.status()["components"]
    }


def serving_pid(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return int(resp.headers["X-Instance-Pid"])


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and "Traceback" not in text


def events(config: Path, *args: str) -> list[dict[str, Any]]:
    result = cli(config, "events", "--json", *args)
    assert result.returncode == 0, result
    return [json.loads(line) for line in result.stdout.splitlines()]


def since(config: Path, began: float) -> list[dict[str, Any]]:
    return [e for e in events(config, "-n", "1000") if e["time"] >= began]


def positions(history: list[dict[str, Any]], kind: str) -> dict[str, int]:
    """Where in `history` each component's (last) event of `kind` is."""
    return {e["component"]: i for i, e in enumerate(history) if e["kind"] == kind}


def assert_dependency_order(history: list[dict[str, Any]], names: set[str]) -> None:
    spawned, rotated = positions(history, "spawned"), positions(history, "rotated")
    assert set(spawned) == set(rotated) == names, history
    assert all(e["outcome"] == "ok" for e in history if e["kind"] == "rotated")
    for name in names:
        for dep in DEPENDS[name]:
            assert rotated[dep] < spawned[name], (name, dep, history)


def test_restart_all_rolls_through_dependencies_under_load(tmp_path: Path, daemon_factory) -> None:
    config = fleet(tmp_path)
    daemon = daemon_factory(config)
    first = pids(daemon)
    with contextlib.ExitStack() as stack:
        loads = [stack.enter_context(Load(daemon.url(name), clients=2)) for name in DEPENDS]
        began = time.time()
        serial = cli(config, "restart", "--all")
        assert serial.returncode == 0, serial
        serial_history = since(config, began)
        second = pids(daemon)
        began = time.time()
        parallel = cli(config, "restart", "--all", "--parallel", "2")
        assert parallel.returncode == 0, parallel
        parallel_history = since(config, began)
    for load in loads:
        assert load.report.failed == 0, (load.url, load.report.failures, load.report.samples[:5])
        assert load.report.ok > 20
    third = pids(daemon)

    assert serial.stdout.splitlines()[-1].startswith("restarted 4 component(s) in ")
    assert serial.stdout.splitlines()[-1].endswith(": a, b, c, d")
    assert_dependency_order(serial_history, set(DEPENDS))
    # One at a time: each is begun only once the one before has finished.
    spawned, rotated = positions(serial_history, "spawned"), positions(serial_history, "rotated")
    assert rotated["b"] < spawned["c"] and rotated["c"] < spawned["d"]

    summary = parallel.stdout.splitlines()[-1]
    assert summary.startswith("restarted 4 component(s) in "), parallel.stdout
    assert set(summary.split(": ", 1)[1].split(", ")) == set(DEPENDS)
    assert_dependency_order(parallel_history, set(DEPENDS))
    # Two at once: b and c, both free once a is done, overlap.
    spawned, rotated = (
        positions(parallel_history, "spawned"),
        positions(parallel_history, "rotated"),
    )
    assert spawned["c"] < rotated["b"] and spawned["b"] < rotated["c"], parallel_history

    for name in DEPENDS:
        assert len({first[name], second[name], third[name]}) == 3, name
        assert not alive(first[name]) and not alive(second[name])
    table = cli(config, "status").stdout.splitlines()
    assert table[0].split()[-2:] == ["LAST", "STOP"]
    assert [row.split()[-1] for row in table[1:5]] == ["graceful"] * 4


def test_restart_all_stops_at_the_first_failure(tmp_path: Path, daemon_factory) -> None:
    flag = tmp_path / "b-may-start"
    flag.touch()
    # b's next instance exits at once (code 1) once the flag is gone.
    fragile = f"sh -c {shlex.quote(f'test -f {flag} && exec {DEMO}')}"
    config = fleet(tmp_path, b=fragile)
    daemon = daemon_factory(config)
    before = pids(daemon)
    flag.unlink()
    with Load(daemon.url("b"), clients=4) as load:
        result = cli(config, "restart", "--all")
    assert result.returncode == 1, result
    assert load.report.failed == 0, load.report.failures
    lines = result.stderr.splitlines()
    assert lines[0].startswith("rotator: restart failed: b: "), result.stderr
    assert "exited with code 1 before becoming healthy" in lines[0]
    assert "restarted: a" in lines and "not restarted: c, d" in lines, result.stderr
    assert "Traceback" not in result.stderr
    after = pids(daemon)
    assert after["a"] != before["a"]
    assert {n: after[n] for n in "bcd"} == {n: before[n] for n in "bcd"}
    assert daemon.component("b")["state"] == "running"
    assert serving_pid(daemon.url("b")) == before["b"]


def test_restart_usage_errors_are_one_line(tmp_path: Path) -> None:
    # Caught before the daemon is asked: none is running, and none needs to be.
    config = write_config(tmp_path, {"a": component(pool=1)})
    for args, says in (
        ((), "--all"),
        (("--all", "a"), "--all"),
        (("--all", "--parallel", "0"), "--parallel"),
        (("nope",), "unknown component 'nope'"),
    ):
        result = cli(config, "restart", *args)
        assert result.returncode == 2, (args, result)
        assert one_line(result.stderr) and says in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("rotator"), (args, result.stderr)


def test_restart_all_leaves_stopped_ones_stopped_and_shows_last_stop(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(
        tmp_path,
        {
            "a": component(),
            "b": component(),
            "stubborn": component(command=DEMO + " --ignore-sigterm", stop_timeout="500ms"),
        },
    )
    daemon = daemon_factory(config)
    assert cli(config, "stop", "b").returncode == 0
    result = cli(config, "restart", "--all")
    assert result.returncode == 0, result
    assert "not restarted (stopped on purpose): b" in result.stdout
    assert result.stdout.splitlines()[-1].endswith(": a, stubborn"), result.stdout
    b = daemon.component("b")
    assert b["state"] == "stopped" and b["active"] is None
    table = cli(config, "status").stdout
    last_stop = {row.split()[0]: row.split()[-1] for row in table.splitlines()[1:4]}
    assert last_stop == {"a": "graceful", "b": "graceful", "stubborn": "forced"}, table
    assert "stubborn: its last instance ignored its stop signal" in table


class Follower:
    """`rotator events -f` as a subprocess; its lines arrive on a queue."""

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "rotator", "-c", str(config), "events", "-f", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next(self, timeout: float = 15) -> str:
        return self.lines.get(timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_events_filter_follow_and_outlive_the_daemon(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"a": component(), "b": component()})
    daemon = daemon_factory(config)
    first_daemon = daemon.status()["daemon"]["pid"]

    five = cli(config, "events", "-n", "5")
    assert five.returncode == 0 and len(five.stdout.splitlines()) == 5, five
    only_a = cli(config, "events", "--component", "a").stdout.splitlines()
    assert only_a and all(re.match(r"\S+ \S+ a: ", line) for line in only_a), only_a
    records = events(config, "--component", "a")
    assert records and {e["component"] for e in records} == {"a"}
    assert all(set(e) >= EVENT_KEYS for e in events(config))
    bad = cli(config, "events", "-n", "abc")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad

    follower = Follower(config, "--json", "--component", "b", "-n", "1")
    try:
        follower.next()  # the past event: the stream is open, new events will follow
        restart = cli(config, "restart", "b")
        assert restart.returncode == 0, restart
        new_pid = daemon.component("b")["active"]["pid"]
        followed = [json.loads(follower.next())]
        while followed[-1]["kind"] != "rotated":
            followed.append(json.loads(follower.next()))
    finally:
        follower.stop()
    assert {e["component"] for e in followed} == {"b"}
    assert {"spawned", "switched", "stopped"} <= {e["kind"] for e in followed}
    assert any(e["kind"] == "spawned" and e["pid"] == new_pid for e in followed), followed

    on_disk = [json.loads(line) for line in (tmp_path / "state" / "events.log").open()]
    assert all(set(e) >= EVENT_KEYS for e in on_disk)
    assert any(e["kind"] == "switched" and e.get("pid") == new_pid for e in on_disk)
    # The default format is for people: no JSON records in the daemon's output.
    assert not [line for line in daemon.output().splitlines() if line.startswith("{")]

    assert cli(config, "down").returncode == 0
    assert daemon.proc.wait(20) == 0
    orphaned = cli(config, "events")
    assert orphaned.returncode == 1 and one_line(orphaned.stderr), orphaned
    assert orphaned.stderr.startswith("rotator: ")

    daemon_factory(config)
    history = events(config, "-n", "1000")
    assert any(e["kind"] == "spawned" and e.get("pid") == new_pid for e in history)
    assert any(e["kind"] == "daemon" and e.get("pid") == first_daemon for e in history)

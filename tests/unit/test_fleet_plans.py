"""Fleet plans (pure): what a reload changes, the order of a rolling restart; and the
event history file (a real file in tmp_path)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from rotator.config import apply_definition, definition_of
from rotator.configfile import parse
from rotator.events import Event
from rotator.fleet import (
    in_dependency_order,
    keep_daemon_settings,
    plan_reload,
    reload_summary,
    replicas_changed,
    rolling_order,
)
from rotator.history import EventLog

BASE: dict[str, Any] = {
    "admin": {"listen": "127.0.0.1:9900"},
    "components": {
        "a": {"listen": "127.0.0.1:8001", "ports": "18001-18002", "command": "run a"},
        "b": {
            "listen": "127.0.0.1:8002",
            "ports": "18010-18011",
            "command": "run b",
            "depends_on": ["a"],
        },
        "c": {"listen": "127.0.0.1:8003", "ports": "18005-18006", "command": "run c"},
    },
}


def config(tmp_path: Path, data: dict[str, Any]) -> Any:
    path = tmp_path / "rotator.yaml"
    text = yaml.safe_dump(data)
    path.write_text(text)
    return parse(text, path)


def changed(**edits: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    for name, fields in edits.items():
        if fields is None:
            del data["components"][name]
        else:
            data["components"].setdefault(name, {}).update(fields)
    return data


def test_nothing_changed(tmp_path: Path) -> None:
    plan = plan_reload(config(tmp_path, BASE), config(tmp_path, BASE))
    assert plan.unchanged == ("a", "b", "c") and not plan.ignored
    assert plan.added == plan.removed == plan.rebound == plan.rotated == plan.updated == ()


@pytest.mark.parametrize(
    ("edit", "group"),
    [
        ({"command": "run a --v2"}, "rotated"),
        ({"env": {"X": "1"}}, "rotated"),
        ({"ports": "18001-18004"}, "rotated"),
        ({"health": {"path": "/ready"}}, "rotated"),
        ({"drain_timeout": "5s"}, "updated"),
        ({"read_timeout": "5s", "max_connections": 10}, "updated"),
        ({"stop_signal": "INT"}, "updated"),
        ({"canary": {"duration": "2m", "max_error_rate": "0.5%"}}, "updated"),
        ({"listen": "127.0.0.1:8009"}, "rebound"),
    ],
)
def test_each_kind_of_change(tmp_path: Path, edit: dict[str, Any], group: str) -> None:
    plan = plan_reload(config(tmp_path, BASE), config(tmp_path, changed(a=edit)))
    assert getattr(plan, group) == ("a",)
    assert plan.unchanged == ("b", "c")


def test_a_canary_rule_change_is_applied_in_place(tmp_path: Path) -> None:
    # Not an instance field: no rotation. The component takes the new spec, and a deployed
    # definition is put on top of it (component._rebase) without losing the new rule.
    before = config(tmp_path, BASE)
    after = config(tmp_path, changed(a={"canary": {"min_requests": 0}}))
    assert plan_reload(before, after).updated == ("a",)
    deployed = dataclasses.replace(before.component("a"), command=("run", "a", "--v2"))
    rebased = apply_definition(after.component("a"), definition_of(deployed))
    assert rebased.canary.min_requests == 0 and rebased.command == ("run", "a", "--v2")


# Pools wide enough for 3 replicas (a count of 2 or 3 needs 3 or 4 ports).
WIDE = {"a": "18001-18004", "b": "18010-18013", "c": "18005-18008"}


def wide(**edits: dict[str, Any]) -> dict[str, Any]:
    return changed(**{name: {"ports": WIDE[name], **edits.get(name, {})} for name in WIDE})


@pytest.mark.parametrize(
    ("old", "new", "group"),
    [
        ({}, {"replicas": 2}, "updated"),  # a count alone starts or stops replicas
        ({"replicas": 2}, {"replicas": 1}, "updated"),
        ({"replicas": 2}, {"replicas": "auto"}, "updated"),
        ({}, {"replicas": 3, "command": "run a --v2"}, "rotated"),
        ({}, {"replicas": 3, "read_timeout": "5s"}, "updated"),
    ],
)
def test_a_replicas_change_is_a_scale(
    tmp_path: Path, old: dict[str, Any], new: dict[str, Any], group: str
) -> None:
    before, after = config(tmp_path, wide(a=old)), config(tmp_path, wide(a=new))
    plan = plan_reload(before, after)
    assert getattr(plan, group) == ("a",) and plan.scaled == ("a",)
    assert plan.unchanged == ("b", "c")
    assert replicas_changed(before.component("a"), after.component("a"))


def test_what_is_not_a_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    auto = config(tmp_path, wide(a={"replicas": "auto"}))
    two = config(tmp_path, wide(a={"replicas": 2}))
    a = auto.component("a")
    # Written out, the count auto came to is another setting: the reload applies it (over
    # one `rotator scale` set meanwhile), though it starts nothing here.
    assert a.replicas == two.component("a").replicas == 2
    assert replicas_changed(a, two.component("a"))
    assert not replicas_changed(a, a)
    assert not replicas_changed(a, dataclasses.replace(a, command=("other",)))
    plan = plan_reload(auto, config(tmp_path, wide(a={"replicas": "auto", "command": "v2"})))
    assert plan.rotated == ("a",) and plan.scaled == ()
    # Added or moved components start afresh with their count: nothing to scale.
    moved = wide(a={"replicas": 3, "listen": "127.0.0.1:8009"})
    moved["components"]["d"] = {
        "listen": "127.0.0.1:8004",
        "ports": "18020-18029",
        "command": "d",
        "replicas": 4,
    }
    plan = plan_reload(config(tmp_path, wide()), config(tmp_path, moved))
    assert (plan.rebound, plan.added, plan.scaled) == (("a",), ("d",), ())


def test_scaled_ones_follow_the_dependency_order(tmp_path: Path) -> None:
    # b, first in the file, depends on a: a is scaled first.
    data = wide()
    data["components"] = {n: data["components"][n] for n in ("b", "c", "a")}
    new = json.loads(json.dumps(data))
    for name, fields in {"a": {"replicas": 2}, "b": {"replicas": 3, "command": "b2"}}.items():
        new["components"][name].update(fields)
    plan = plan_reload(config(tmp_path, data), config(tmp_path, new))
    assert plan.scaled == ("a", "b") and plan.rotated == ("b",) and plan.updated == ("a",)
    assert reload_summary({"rotated": ["b"], "scaled": ["a", "b"]}) == "rotated b; scaled a, b"


def test_added_and_removed_in_dependency_order(tmp_path: Path) -> None:
    new = changed(
        c=None,
        d={"listen": "127.0.0.1:8004", "ports": [18007], "command": "d", "depends_on": ["e"]},
        e={"listen": "127.0.0.1:8005", "ports": [18008], "command": "e"},
    )
    plan = plan_reload(config(tmp_path, BASE), config(tmp_path, new))
    assert plan.added == ("e", "d")  # d depends on e: e starts first
    assert plan.removed == ("c",)


def test_removed_in_reverse_dependency_order(tmp_path: Path) -> None:
    plan = plan_reload(config(tmp_path, BASE), config(tmp_path, changed(a=None, b=None)))
    assert plan.removed == ("b", "a")  # b depends on a: b goes first


def test_daemon_settings_are_reported_and_kept(tmp_path: Path) -> None:
    old = config(tmp_path, BASE)
    new_data = changed()
    new_data["admin"] = {"listen": "127.0.0.1:9901"}
    new_data["state_dir"] = "elsewhere"
    new = config(tmp_path, new_data)
    plan = plan_reload(old, new)
    assert len(plan.ignored) == 2 and "9901" in plan.ignored[0] and "state_dir" in plan.ignored[1]
    kept = keep_daemon_settings(old, new)
    assert kept.admin == old.admin and kept.state_dir == old.state_dir


def test_rolling_order_follows_dependencies(tmp_path: Path) -> None:
    cfg = config(tmp_path, BASE)
    assert rolling_order(cfg, ["c", "b", "a"]) == ["a", "b", "c"]
    assert rolling_order(cfg, ["b"]) == ["b"]


# -- the event history file --------------------------------------------------------
def event(i: int, component: str = "web") -> Event:
    return Event(component, "switched", f"event {i}", {"pid": 100 + i}, time=1000.0 + i)


def test_history_round_trip(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.log")
    for i in range(5):
        log.append(event(i))
    log.close()
    back = EventLog(tmp_path / "events.log").load(3)
    assert [e.message for e in back] == ["event 2", "event 3", "event 4"]
    assert back[0] == event(2)
    assert (tmp_path / "events.log").stat().st_mode & 0o777 == 0o600


def test_history_rotates_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    log = EventLog(path, max_bytes=1000)
    for i in range(100):
        log.append(event(i))
    log.close()
    old = path.with_name("events.log.1")
    assert path.stat().st_size <= 1000 and old.stat().st_size <= 1000
    back = EventLog(path, max_bytes=1000).load(1000)
    assert back[-1].message == "event 99"
    numbers = [int(e.message.split()[1]) for e in back]
    assert numbers == sorted(numbers) and len(numbers) > 10  # both files, oldest first


def test_history_skips_damaged_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    good = json.dumps(event(1).to_json())
    path.write_text(f'{good}\n{{"time": 1, "comp\nnot json\n[1, 2]\n{{"time": 2}}\n{good}')
    assert [e.message for e in EventLog(path).load(10)] == ["event 1", "event 1"]


def test_history_survives_an_unwritable_file(tmp_path: Path) -> None:
    directory = tmp_path / "gone"
    log = EventLog(directory / "events.log")
    log.append(event(1))  # the directory does not exist: nothing written, nothing raised
    directory.mkdir()
    log.append(event(2))
    log.close()
    assert [e.message for e in EventLog(directory / "events.log").load(5)] == ["event 2"]


# -- the one dependency-order scheduler ------------------------------------------------


def _schedule(
    deps: dict[str, tuple[str, ...]],
    fails: set[str] = frozenset(),  # type: ignore[assignment]
    raises: set[str] = frozenset(),  # type: ignore[assignment]
    parallel: int = 0,
) -> tuple[dict[str, bool], list[tuple[str, str, bool]], int]:
    """Run the scheduler over `deps` with actions that record when they begin and end."""
    log: list[tuple[str, str, bool]] = []
    running = peak = 0

    async def action(name: str, ok: bool) -> bool:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        log.append(("begin", name, ok))
        await asyncio.sleep(0.01)
        running -= 1
        log.append(("end", name, ok))
        if name in raises:
            raise RuntimeError(name)
        return name not in fails

    async def main() -> dict[str, bool]:
        return await in_dependency_order(list(deps), lambda n: deps[n], action, parallel=parallel)

    try:
        result = asyncio.run(main())
    except RuntimeError:
        result = {}
    return result, log, peak


def test_each_runs_after_what_it_follows_and_independent_ones_together() -> None:
    result, log, peak = _schedule({"db": (), "cache": (), "api": ("db", "cache"), "web": ("api",)})
    assert result == {"db": True, "cache": True, "api": True, "web": True}
    order = [name for kind, name, _ in log if kind == "begin"]
    ends = [name for kind, name, _ in log if kind == "end"]
    assert set(order[:2]) == {"db", "cache"} and peak == 2  # no dependency: at once
    assert order.index("api") > max(ends.index("db"), ends.index("cache"))
    assert order.index("web") > ends.index("api")


def test_a_failure_is_passed_on_to_what_follows_it_only() -> None:
    result, log, _ = _schedule({"db": (), "api": ("db",), "other": ()}, fails={"db"})
    assert result == {"db": False, "api": True, "other": True}
    begun = {name: ok for kind, name, ok in log if kind == "begin"}
    assert begun == {"db": True, "api": False, "other": True}  # api is told, and decides


def test_parallel_bounds_the_actions_at_once() -> None:
    _, _, peak = _schedule({n: () for n in "abcdef"}, parallel=2)
    assert peak == 2
    _, _, peak = _schedule({n: () for n in "abcdef"}, parallel=1)
    assert peak == 1


def test_an_action_that_raises_leaves_nothing_waiting_for_it() -> None:
    # Without marking it done, "api" would wait for "db" for ever: the run would hang.
    result, log, _ = _schedule({"db": (), "api": ("db",)}, raises={"db"})
    assert result == {}  # the exception reached the caller...
    assert ("end", "api", False) in log  # ...once api, told db failed, had ended too

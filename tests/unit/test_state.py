"""StateFile: round trip, atomic save, and strict load that moves untrusted files aside."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from rotator.state import (
    STATE_VERSION,
    ComponentRecord,
    InstanceRecord,
    State,
    StateError,
    StateFile,
    StateTooNew,
)

A = InstanceRecord(pid=4242, create_time=1700000000.25, port=20001, marker="web-7", started=1.5)
B = InstanceRecord(pid=4243, create_time=1700000001.0, port=20002, marker="web-8", started=2.0)
C = InstanceRecord(4244, 1700000001.5, None, "web-9", 2.5, socket="/run/web.1.sock", replica=1)
DEFINITION = {"command": ["python", "-m", "app"], "cwd": "/srv/app", "env": {"DEBUG": "1"}}


def full_state() -> State:
    return State(
        components={
            "web": ComponentRecord(
                name="web",
                instances=(A, C),
                draining=(B,),
                definition=DEFINITION,
                definition_source="deployed",
                deployed_at=1700000002.5,
                previous_definition={"command": ["python", "-m", "old"], "cwd": None, "env": {}},
            ),
            "api": ComponentRecord(name="api", stopped=True, replicas=3),
        },
        daemon_pid=99,
        written_at=1700000003.0,
    )


def good_doc() -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "daemon_pid": 99,
        "written_at": 1.0,
        "components": {
            "web": {
                "instances": [
                    {
                        "pid": 10,
                        "create_time": 1.0,
                        "port": 20001,
                        "socket": None,
                        "marker": "m",
                        "started": 2,
                        "replica": 0,
                    }
                ],
                "draining": [],
                "definition": None,
                "definition_source": "config",
                "deployed_at": None,
                "previous_definition": None,
                "stopped": False,
                "replicas": None,
                "replicas_config": None,
                "canary": [],
            }
        },
    }


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.json"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def leftovers(path: Path) -> list[str]:
    if not path.parent.exists():  # nothing was ever written there
        return []
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_round_trip_of_a_full_state(path: Path) -> None:
    state = full_state()
    StateFile(path).save(state)
    assert StateFile(path).load() == state


def test_file_is_readable_sorted_json(path: Path) -> None:
    StateFile(path).save(full_state())
    text = path.read_text()
    doc = json.loads(text)
    assert doc["version"] == STATE_VERSION
    assert list(doc) == sorted(doc)
    assert "\n  " in text  # indented
    assert "name" not in doc["components"]["web"]  # the key is the name


def test_missing_file_is_an_empty_state(path: Path) -> None:
    assert StateFile(path).load() == State(components={})


def test_save_fills_in_written_at_and_accepts_read_only_mappings(path: Path) -> None:
    record = ComponentRecord(
        "web", (A,), definition=MappingProxyType({"env": MappingProxyType({"A": "1"})})
    )
    StateFile(path).save(State(components=MappingProxyType({"web": record})))
    loaded = StateFile(path).load()
    assert loaded.written_at is not None and loaded.written_at > 1e9
    assert loaded.components["web"].definition == {"env": {"A": "1"}}


def test_save_rejects_a_record_filed_under_another_name(path: Path) -> None:
    with pytest.raises(ValueError, match="filed under"):
        StateFile(path).save(State(components={"web": ComponentRecord("api")}))


def test_save_is_atomic_0600_and_leaves_no_temp_files(path: Path) -> None:
    sf = StateFile(path)
    sf.save(full_state())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert leftovers(path) == []
    inode = path.stat().st_ino
    sf.save(State(components={}, daemon_pid=1))
    assert sf.load().components == {}
    assert path.stat().st_ino != inode  # replaced whole, not rewritten in place
    assert leftovers(path) == []


def test_a_failed_save_leaves_the_old_file_intact(path: Path) -> None:
    sf = StateFile(path)
    sf.save(full_state())
    before = path.read_bytes()
    broken = ComponentRecord("web", (A,), definition={"command": ["x"], "oops": object()})
    with pytest.raises(TypeError):
        sf.save(State(components={"web": broken}))
    assert path.read_bytes() == before
    assert leftovers(path) == []
    assert sf.load() == full_state()


def test_a_non_finite_number_is_refused_at_save_not_at_load(path: Path) -> None:
    sf = StateFile(path)
    bad = InstanceRecord(pid=1, create_time=float("nan"), port=1, marker="m", started=0.0)
    with pytest.raises(ValueError):
        sf.save(State(components={"web": ComponentRecord("web", (bad,))}))
    assert not path.exists() and leftovers(path) == []


def assert_moved_aside(path: Path, error: StateError, *fragments: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "its pids are not trusted" in message
    assert not path.exists()
    aside = [p for p in path.parent.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    assert error.moved_to == aside[0]
    assert str(aside[0]) in message


def test_corrupt_json_is_moved_aside(path: Path) -> None:
    write(path, '{\n  "version": 1,\n  "components": {,\n}')
    with pytest.raises(StateError) as info:
        StateFile(path).load()
    assert_moved_aside(path, info.value, "is corrupt (line 3:", "moved aside to")
    assert StateFile(path).load() == State(components={})  # the next start begins empty


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "line 1:"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"components": {}}', "version"),
        ('{"version": "1"}', "version"),
        ('{"version": true}', "version"),
        ("[" * 100_000, "corrupt ("),
        ('{"version": 1, "n": ' + "9" * 5000 + "}", "corrupt ("),
    ],
)
def test_garbage_is_corrupt(path: Path, text: str, fragment: str) -> None:
    write(path, text)
    with pytest.raises(StateError) as info:
        StateFile(path).load()
    assert_moved_aside(path, info.value, fragment)


def test_binary_garbage_is_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StateError) as info:
        StateFile(path).load()
    assert_moved_aside(path, info.value, "not UTF-8")


def web(doc: dict[str, Any]) -> dict[str, Any]:
    component: dict[str, Any] = doc["components"]["web"]
    return component


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (
            lambda d: web(d)["instances"][0].update(pid="10"),
            "components.web.instances[0].pid: expected pid, got str",
        ),
        (
            lambda d: web(d)["instances"][0].update(pid=True),
            "components.web.instances[0].pid: expected pid, got bool",
        ),
        (
            lambda d: web(d)["instances"][0].update(pid=0),
            "components.web.instances[0].pid: 0 is out of range",
        ),
        (lambda d: web(d)["instances"][0].update(pid=-1), "out of range"),
        (
            lambda d: web(d)["instances"][0].update(port=70000),
            "components.web.instances[0].port: 70000",
        ),
        (lambda d: web(d)["instances"][0].update(create_time="x"), "create_time: expected number"),
        (
            lambda d: web(d)["instances"][0].pop("marker"),
            "components.web.instances[0]: missing key 'marker'",
        ),
        (lambda d: web(d)["instances"][0].update(extra=1), "unexpected key 'extra'"),
        (lambda d: web(d)["instances"][0].update(socket="/s"), "needs exactly one of port and"),
        (lambda d: web(d)["instances"][0].update(port=None), "needs exactly one of port and"),
        (lambda d: web(d)["instances"][0].update(replica=-1), "instances[0].replica: expected a"),
        (lambda d: web(d).update(replicas=0), "components.web.replicas: expected a replica count"),
        (lambda d: web(d).update(active=None), "components.web: unexpected key 'active'"),
        (lambda d: web(d).pop("stopped"), "components.web: missing key 'stopped'"),
        (lambda d: web(d).update(stopped=0), "components.web.stopped: expected bool, got int"),
        (lambda d: web(d).update(draining={}), "components.web.draining: expected list"),
        (lambda d: web(d).update(draining=[{"pid": 1}]), "components.web.draining[0]: missing key"),
        (lambda d: web(d).update(definition_source="git"), "unknown value 'git'"),
        (lambda d: web(d).update(definition=["x"]), "components.web.definition: expected object"),
        (lambda d: web(d).update(definition={"command": "x"}), "definition.command: expected list"),
        (lambda d: web(d).update(definition={"env": {"A": 1}}), "definition.env.A: expected str"),
        (lambda d: web(d).update(deployed_at="now"), "deployed_at: expected number"),
        (lambda d: d.update(components=[]), "components: expected object, got list"),
        (lambda d: d.update(daemon_pid="1"), "daemon_pid: expected pid, got str"),
        (lambda d: d.pop("written_at"), "top level: missing key 'written_at'"),
        (lambda d: d.update(extra=1), "top level: unexpected key 'extra'"),
        (lambda d: d["components"].update({"a\nb": 1}), "components.a\\nb: expected object"),
    ],
)
def test_wrong_shape_is_corrupt(path: Path, mutate: Any, fragment: str) -> None:
    doc = good_doc()
    write(path, json.dumps(doc))
    assert StateFile(path).load().components["web"].active is not None  # the base is good
    mutate(doc)
    write(path, json.dumps(doc))
    with pytest.raises(StateError) as info:
        StateFile(path).load()
    assert_moved_aside(path, info.value, "is corrupt (", fragment)


def test_integers_are_accepted_where_floats_are_expected(path: Path) -> None:
    write(path, json.dumps(good_doc()))
    active = StateFile(path).load().components["web"].active
    assert active is not None and active.started == 2.0 and isinstance(active.started, float)


def test_format_1_is_still_read(path: Path) -> None:
    """Before format 2, a component had one `active` instance, always on a port."""
    doc = good_doc()
    doc["version"] = 1
    web(doc)["active"] = {
        k: v for k, v in web(doc).pop("instances")[0].items() if k not in ("socket", "replica")
    }
    web(doc).pop("replicas")
    web(doc).pop("canary")
    web(doc).pop("replicas_config")
    write(path, json.dumps(doc))
    record = StateFile(path).load().components["web"]
    assert record.instances == (InstanceRecord(10, 1.0, 20001, "m", 2.0),)
    assert record.replicas is None and record.active == record.instances[0]
    web(doc)["active"]["socket"] = "/s"  # format 1 never had one
    write(path, json.dumps(doc))
    with pytest.raises(StateError) as info:
        StateFile(path).load()
    assert_moved_aside(path, info.value, "components.web.active: unexpected key 'socket'")


def test_older_version_is_moved_aside(path: Path) -> None:
    write(path, json.dumps({"version": 0, "whatever": []}))
    with pytest.raises(StateError) as info:
        StateFile(path).load()
    assert not isinstance(info.value, StateTooNew)
    assert_moved_aside(path, info.value, "written by an older rotator (format 0)")


def test_newer_version_is_left_in_place(path: Path) -> None:
    text = json.dumps({"version": STATE_VERSION + 1, "shape": "unknown"})
    write(path, text)
    with pytest.raises(StateTooNew) as info:
        StateFile(path).load()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert f"newer rotator (format {STATE_VERSION + 1}" in message and "upgrade" in message
    assert info.value.moved_to is None
    assert path.read_text() == text
    assert leftovers(path) == []


def test_two_corrupt_files_in_one_second_are_both_kept(path: Path) -> None:
    for text in ("{", "["):
        write(path, text)
        with pytest.raises(StateError):
            StateFile(path).load()
    aside = sorted(p.read_text() for p in path.parent.iterdir())
    assert aside == ["[", "{"]


def test_unreadable_state_is_an_error_left_in_place(tmp_path: Path) -> None:
    directory = tmp_path / "state.json"
    directory.mkdir()  # reading a directory fails with an OSError
    with pytest.raises(StateError, match="cannot be read") as info:
        StateFile(directory).load()
    assert info.value.moved_to is None and directory.is_dir()
    assert os.listdir(tmp_path) == ["state.json"]

"""rotator.configfile and rotator.config: parsing, validation messages (path, text, line), rendering. No processes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shlex
import signal
import textwrap
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from rotator import printer
from rotator.config import (
    Address,
    AdminSpec,
    ComponentSpec,
    Config,
    ConfigError,
    HealthSpec,
    Problem,
    ProxySpec,
    apply_definition,
    definition_of,
    split_words,
    with_overrides,
)
from rotator.configfile import (
    HINT_BUDGET,
    default_path,
    load,
    parse,
    parse_duration,
    parse_env_assignments,
    parse_size,
)

# One valid component; cases append keys to it or replace it. Line 2 is `hermes:`.
HERMES = """\
components:
  hermes:
    listen: 127.0.0.1:8001
    ports: 18001-18010
    command: run --port {port}
"""

# A second component whose pool overlaps hermes' pool on 18005-18006 (lines 6-9).
OVERLAP = (
    HERMES
    + """\
  b:
    listen: 127.0.0.1:8002
    ports: 18005-18006
    command: run
"""
)


def problems_of(text: str, path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), path)
    return info.value.problems


def parse_ok(text: str, path: Path) -> Config:
    return parse(textwrap.dedent(text), path)


# (yaml text, field path, message fragment, line)
CASES = [
    # unknown keys at every level, with did-you-mean
    ("state_dirr: x\n" + HERMES, "state_dirr", "unknown key (did you mean 'state_dir'?)", 1),
    ("admin:\n  lisen: 127.0.0.1:1\n" + HERMES, "admin.lisen", "did you mean 'listen'?", 2),
    (
        "defaults:\n  drain_timout: 1s\n" + HERMES,
        "defaults.drain_timout",
        "did you mean 'drain_timeout'?",
        2,
    ),
    (
        "defaults:\n  health:\n    intervall: 1s\n" + HERMES,
        "defaults.health.intervall",
        "did you mean 'interval'?",
        3,
    ),
    (
        HERMES + "    comand: x\n",
        "components.hermes.comand",
        "unknown key (did you mean 'command'?)",
        6,
    ),
    (
        HERMES + "    health:\n      paht: /x\n",
        "components.hermes.health.paht",
        "did you mean 'path'?",
        7,
    ),
    (HERMES + "    zzz: 1\n", "components.hermes.zzz", "unknown key (expected one of: listen,", 6),
    (
        "defaults:\n  listen: 127.0.0.1:1\n" + HERMES,
        "defaults.listen",
        "can only be set per component",
        2,
    ),
    # duplicate keys (PyYAML would keep the last silently)
    (
        HERMES + "    ports: 18020\n",
        "components.hermes.ports",
        "duplicate key (first set on line 4)",
        6,
    ),
    (HERMES + "  hermes: {}\n", "components.hermes", "duplicate key (first set on line 2)", 6),
    # durations
    (
        HERMES + "    drain_timeout: 5 parsecs\n",
        "components.hermes.drain_timeout",
        "'5 parsecs' is not a duration (use 250ms, 2s, 1m or a number of seconds)",
        6,
    ),
    (HERMES + "    stop_timeout: -1s\n", "components.hermes.stop_timeout", "is negative", 6),
    (
        HERMES + "    stop_timeout: 0\n",
        "components.hermes.stop_timeout",
        "must be greater than 0",
        6,
    ),
    (
        HERMES + "    hold_timeout: 0s\n",
        "components.hermes.hold_timeout",
        "must be greater than 0",
        6,
    ),
    (
        HERMES + "    health: {timeout: 0}\n",
        "components.hermes.health.timeout",
        "must be greater than 0",
        6,
    ),
    (
        HERMES + "    health: {start_timeout: soon}\n",
        "components.hermes.health.start_timeout",
        "'soon' is not a duration",
        6,
    ),
    (
        HERMES + "    drain_timeout: [1]\n",
        "components.hermes.drain_timeout",
        "must be a single value, not a list",
        6,
    ),
    (
        HERMES + "    drain_timeout: !weird 1\n",
        "components.hermes.drain_timeout",
        "invalid value",
        6,
    ),
    # port pools
    (
        HERMES.replace("18001-18010", "18010-18001"),
        "components.hermes.ports",
        "18010-18001 is an empty range",
        4,
    ),
    (
        HERMES.replace("18001-18010", "18001-70000"),
        "components.hermes.ports",
        "70000 is not a port (1-65535)",
        4,
    ),
    (HERMES.replace("18001-18010", "0"), "components.hermes.ports", "0 is not a port (1-65535)", 4),
    (
        HERMES.replace("18001-18010", "abc"),
        "components.hermes.ports",
        "'abc' is not a port or range (use 18001, 18001-18010 or a list of them)",
        4,
    ),
    (
        HERMES.replace("18001-18010", "\n      - 18001\n      - x"),
        "components.hermes.ports",
        "'x' is not a port or range",
        6,
    ),
    (
        HERMES.replace("18001-18010", "[[18001]]"),
        "components.hermes.ports",
        "must be a single value, not a list",
        4,
    ),
    (HERMES.replace("18001-18010", "[]"), "components.hermes.ports", "the pool is empty", 4),
    (HERMES.replace("18001-18010", ""), "components.hermes.ports", "needs a value", 4),
    (
        OVERLAP,
        "components.b.ports",
        "ports 18005-18006 are also in the pool of component 'hermes'",
        8,
    ),
    (
        OVERLAP.replace("18005-18006", "[18005, 18030]"),
        "components.b.ports",
        "port 18005 is also in the pool of component 'hermes'",
        8,
    ),
    (
        OVERLAP.replace("18005-18006", "[18030, 8001]"),
        "components.b.ports",
        "port 8001 is the listen port of component 'hermes'",
        8,
    ),
    (
        OVERLAP.replace("18005-18006", "18030").replace("18001-18010", "8000-8002"),
        "components.hermes.ports",
        "port 8002 is the listen port of component 'b'",
        4,
    ),
    (
        HERMES.replace("18001-18010", "9899-9901"),
        "components.hermes.ports",
        "port 9900 is the listen port of the admin API",
        4,
    ),
    # command
    (
        HERMES.replace("    command: run --port {port}\n", ""),
        "components.hermes.command",
        "missing (the command that starts an instance)",
        2,
    ),
    (HERMES.replace("run --port {port}", "''"), "components.hermes.command", "is empty", 5),
    (HERMES.replace("run --port {port}", "[]"), "components.hermes.command", "is empty", 5),
    (
        HERMES.replace("run --port {port}", "\n      - run\n      - 4"),
        "components.hermes.command",
        "list items must be strings, not '4' (quote it)",
        7,
    ),
    (
        HERMES.replace("run --port {port}", "[run, [x]]"),
        "components.hermes.command",
        "list items must be strings, not a list",
        5,
    ),
    (
        HERMES.replace("run --port {port}", "{run: x}"),
        "components.hermes.command",
        "must be a string or a list of strings",
        5,
    ),
    (
        HERMES.replace("run --port {port}", "run 'oops"),
        "components.hermes.command",
        "cannot be split into words",
        5,
    ),
    # stop_signal
    (
        HERMES + "    stop_signal: FOO\n",
        "components.hermes.stop_signal",
        "'FOO' is not a signal (use e.g. TERM, INT, HUP",
        6,
    ),
    (HERMES + "    stop_signal: 15\n", "components.hermes.stop_signal", "15 is not a signal", 6),
    # listen addresses
    (
        HERMES.replace("    listen: 127.0.0.1:8001\n", ""),
        "components.hermes.listen",
        "missing (the public host:port)",
        2,
    ),
    (
        HERMES.replace("127.0.0.1:8001", "localhost"),
        "components.hermes.listen",
        "'localhost' is not host:port (e.g. 127.0.0.1:8001 or [::1]:8001)",
        3,
    ),
    (HERMES.replace("127.0.0.1:8001", "8001"), "components.hermes.listen", "is not host:port", 3),
    (
        HERMES.replace("127.0.0.1:8001", "'::1:8001'"),
        "components.hermes.listen",
        "is not host:port",
        3,
    ),
    (
        HERMES.replace("127.0.0.1:8001", "127.0.0.1:99999"),
        "components.hermes.listen",
        "99999 is not a port (1-65535)",
        3,
    ),
    (
        HERMES.replace("127.0.0.1:8001", "127.0.0.1:http"),
        "components.hermes.listen",
        "is not host:port",
        3,
    ),
    (
        OVERLAP.replace("8002", "8001").replace("18005-18006", "18030"),
        "components.b.listen",
        "127.0.0.1:8001 is also the listen address of component 'hermes'",
        7,
    ),
    (
        OVERLAP.replace("127.0.0.1:8002", "0.0.0.0:8001").replace("18005-18006", "18030"),
        "components.b.listen",
        "0.0.0.0:8001 overlaps 127.0.0.1:8001, the listen address of component 'hermes'",
        7,
    ),
    (
        OVERLAP.replace("127.0.0.1:8002", "'[::]:8001'").replace("18005-18006", "18030"),
        "components.b.listen",
        "[::]:8001 overlaps 127.0.0.1:8001",
        7,
    ),
    (
        HERMES.replace("8001", "9900"),
        "components.hermes.listen",
        "127.0.0.1:9900 is also the listen address of the admin API",
        3,
    ),
    (
        "admin:\n  listen: 0.0.0.0:8001\n" + HERMES,
        "components.hermes.listen",
        "127.0.0.1:8001 overlaps 0.0.0.0:8001, the listen address of the admin API",
        5,
    ),
    ("admin:\n  listen: nope\n" + HERMES, "admin.listen", "'nope' is not host:port", 2),
    # components and names
    (HERMES.replace("hermes:", "'bad name':"), "components.bad name", "is not a valid name", 2),
    (HERMES.replace("hermes:", ".hidden:"), "components..hidden", "is not a valid name", 2),
    (HERMES.replace("hermes:", "a/b:"), "components.a/b", "is not a valid name", 2),
    ("components: {}\n", "components", "must list at least one component", 1),
    ("components:\n", "components", "must list at least one component", 1),
    ("components: [a]\n", "components", "must be a mapping, not a list", 1),
    ("components:\n  hermes: 5\n", "components.hermes", "must be a mapping, not a single value", 2),
    ("admin: {}\n", "components", "missing (at least one component is required)", 1),
    ("- 1\n", "(top level)", "must be a mapping, not a list", 1),
    # health
    (
        HERMES + "    health:\n      path: health\n",
        "components.hermes.health.path",
        "'health' must start with '/'",
        7,
    ),
    (
        "defaults:\n  health: {path: ready}\n" + HERMES,
        "defaults.health.path",
        "'ready' must start with '/'",
        2,
    ),
    (HERMES + "    health: 5\n", "components.hermes.health", "must be a mapping", 6),
    # env
    (
        HERMES + "    env:\n      A: {b: 1}\n",
        "components.hermes.env.A",
        "must be a single value, not a mapping",
        7,
    ),
    (
        HERMES + "    env:\n      A: [1]\n",
        "components.hermes.env.A",
        "must be a single value, not a list",
        7,
    ),
    (
        HERMES + "    env:\n      1: x\n",
        "components.hermes.env.1",
        "is not a valid variable name",
        7,
    ),
    (HERMES + "    env: [A]\n", "components.hermes.env", "must be a mapping, not a list", 6),
]


@pytest.mark.parametrize(("text", "path", "fragment", "line"), CASES)
def test_rule(text: str, path: str, fragment: str, line: int | None, tmp_path: Path) -> None:
    problems = problems_of(text, tmp_path / "rotator.yaml")
    assert any(p.path == path and fragment in p.message and p.line == line for p in problems), (
        "\n".join(map(str, problems))
    )


def test_full_example(tmp_path: Path) -> None:
    (tmp_path / "hermes").mkdir()
    (tmp_path / "shared").mkdir()
    config = parse_ok(
        """\
        admin:
          listen: 127.0.0.1:9901
        state_dir: state
        defaults:
          health: {path: /health, interval: 500ms, timeout: 2s, start_timeout: 1m}
          drain_timeout: 20s
          stop_signal: INT
          stop_timeout: 5
          hold_timeout: 1.5s
          cwd: shared
          env: {LOG_LEVEL: info, WORKERS: 2}
        components:
          hermes:
            listen: 127.0.0.1:8001
            ports: 18001-18003
            command: python -m myapp --port {port}
            cwd: ./hermes
            env: {LOG_LEVEL: debug, DEBUG: true, RATIO: 1.50, EMPTY: ~}
            health: {path: /ready}
            drain_timeout: 0
          zeus:
            listen: "[::1]:8002"
            ports: [18010, "18012-18013", 18010, 18011]
            command: [awk, "{print $1}", --name, "{name}"]
            stop_signal: SIGUSR1
        """,
        tmp_path / "rotator.yaml",
    )
    assert config.path == tmp_path / "rotator.yaml"
    assert config.admin == AdminSpec(Address("127.0.0.1", 9901))
    assert config.state_dir == (tmp_path / "state").resolve()
    assert config.names == ("hermes", "zeus")
    hermes = ComponentSpec(
        name="hermes",
        listen=Address("127.0.0.1", 8001),
        ports=(18001, 18002, 18003),
        command=("python", "-m", "myapp", "--port", "{port}"),
        cwd=(tmp_path / "hermes").resolve(),
        env={"LOG_LEVEL": "debug", "WORKERS": "2", "DEBUG": "true", "RATIO": "1.50", "EMPTY": ""},
        health=HealthSpec(path="/ready", interval=0.5, timeout=2.0, start_timeout=60.0),
        drain_timeout=0.0,
        stop_signal=signal.SIGINT,
        stop_timeout=5.0,
        proxy=ProxySpec(hold_timeout=1.5),
    )
    zeus = ComponentSpec(
        name="zeus",
        listen=Address("::1", 8002),
        ports=(18010, 18012, 18013, 18011),
        command=("awk", "{print $1}", "--name", "{name}"),
        cwd=(tmp_path / "shared").resolve(),
        env={"LOG_LEVEL": "info", "WORKERS": "2"},
        health=HealthSpec(path="/health", interval=0.5, timeout=2.0, start_timeout=60.0),
        drain_timeout=20.0,
        stop_signal=signal.SIGUSR1,
        stop_timeout=5.0,
        proxy=ProxySpec(hold_timeout=1.5),
    )
    assert config.components == (hermes, zeus)
    assert config.component("zeus") == zeus
    assert all(isinstance(v, str) for c in config.components for v in c.env.values())
    assert str(config.component("zeus").listen) == "[::1]:8002"


def test_defaults_when_omitted(tmp_path: Path) -> None:
    config = parse_ok(HERMES, tmp_path / "rotator.yaml")
    spec = config.component("hermes")
    assert config.admin == AdminSpec(Address("127.0.0.1", 9900))
    assert config.state_dir == (tmp_path / ".rotator").resolve()
    assert spec.cwd == tmp_path.resolve()
    assert spec.health == HealthSpec()
    assert (spec.drain_timeout, spec.stop_timeout, spec.proxy.hold_timeout) == (30.0, 10.0, 5.0)
    assert spec.stop_signal is signal.SIGTERM
    assert dict(spec.env) == {}
    assert spec.ports == tuple(range(18001, 18011))
    with pytest.raises(KeyError):
        config.component("nope")


def test_relative_config_path_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "app").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = parse_ok(HERMES + "    cwd: ~/app\nstate_dir: ~/st\n", Path("rotator.yaml"))
    assert config.path == tmp_path / "rotator.yaml"
    assert config.component("hermes").cwd == (tmp_path / "app").resolve()
    assert config.state_dir == (tmp_path / "st").resolve()


@pytest.mark.parametrize(
    "name", ["TERM", "SIGTERM", "term", "INT", "HUP", "QUIT", "KILL", "USR1", "USR2"]
)
def test_signal_names(name: str, tmp_path: Path) -> None:
    spec = parse_ok(HERMES + f"    stop_signal: {name}\n", tmp_path / "r.yaml").components[0]
    expected = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    assert spec.stop_signal is signal.Signals[expected]


def test_cwd_must_be_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    problems = problems_of(
        HERMES + "    cwd: ./missing\n" + "defaults:\n  cwd: file\n", tmp_path / "rotator.yaml"
    )
    assert [(p.path, p.line, p.message) for p in problems] == [
        ("components.hermes.cwd", 6, f"{(tmp_path / 'missing').resolve()} does not exist"),
        ("defaults.cwd", 8, f"{(tmp_path / 'file').resolve()} is not a directory"),
    ]


def test_state_dir_must_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "st").write_text("")
    problems = problems_of("state_dir: st\n" + HERMES, tmp_path / "rotator.yaml")
    assert [(p.path, p.line) for p in problems] == [("state_dir", 1)]
    assert "is not a directory" in problems[0].message


def test_a_bad_default_is_reported_once(tmp_path: Path) -> None:
    text = "defaults:\n  stop_timeout: forever\n" + OVERLAP.replace("18005-18006", "18030")
    problems = problems_of(text, tmp_path / "rotator.yaml")
    assert [(p.path, p.line) for p in problems] == [("defaults.stop_timeout", 2)]


def test_health_and_env_merge_field_by_field(tmp_path: Path) -> None:
    text = "defaults:\n  health: {interval: 3s, path: /h}\n  env: {A: a, B: b}\n" + HERMES
    text += "    health: {timeout: 4s}\n    env: {B: own, C: c}\n"
    spec = parse_ok(text, tmp_path / "rotator.yaml").components[0]
    assert spec.health == HealthSpec(path="/h", interval=3.0, timeout=4.0, start_timeout=30.0)
    assert dict(spec.env) == {"A": "a", "B": "own", "C": "c"}


def test_render_substitutes_placeholders(tmp_path: Path) -> None:
    text = (
        HERMES.replace(
            "run --port {port}",
            """["sh", "-c", "serve {host}:{port} | awk '{print $1}' {other} {{port}}"]""",
        )
        + "    env: {URL: 'http://{host}:{port}/{name}', PORT: '1', KEEP: '{x}'}\n"
    )
    spec = parse_ok(text, tmp_path / "rotator.yaml").components[0]
    argv, env = spec.render(18005)
    assert argv == ["sh", "-c", "serve 127.0.0.1:18005 | awk '{print $1}' {other} {18005}"]
    assert env == {
        "URL": "http://127.0.0.1:18005/hermes",
        "PORT": "18005",
        "KEEP": "{x}",
        "HOST": "127.0.0.1",
        "ROTATOR_REPLICA": "0",
    }
    argv, env = spec.render(18006, host="::1")
    assert argv[2].startswith("serve ::1:18006")
    assert (env["PORT"], env["HOST"]) == ("18006", "::1")
    assert spec.command[2].startswith("serve {host}:{port}")  # the template is untouched


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1.5s", 1.5),
        ("1h", 3600.0),
        (".5s", 0.5),
        ("30", 30.0),
        (" 3 s ", 3.0),
        (5, 5.0),
        (0.25, 0.25),
        (0, 0.0),
        ("0ms", 0.0),
        ("1m30s", 90.0),  # as rotator prints durations; nginx reads them so too
        ("2h 05m", 7500.0),
        ("1h1m1s1ms", 3661.001),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("5 parsecs", "'5 parsecs' is not a duration (use 250ms, 2s, 1m or a number of seconds)"),
        ("1d", "is not a duration"),
        ("", "is not a duration"),
        ("s", "is not a duration"),
        (True, "is not a duration"),
        (None, "is not a duration"),
        ([1], "is not a duration"),
        (float("inf"), "is not a duration"),
        (float("nan"), "is not a duration"),
        (10**400, "is not a duration"),
        (-1, "-1 is negative"),
        ("-2s", "'-2s' is negative"),
        ("1s1m", "is not a duration"),  # the largest unit first
        ("1m1m", "is not a duration"),
        ("1m 30", "is not a duration"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert fragment in str(info.value)


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml")
    [problem] = info.value.problems
    assert (problem.line, problem.path) == (None, "")
    assert (
        str(info.value)
        == f"{tmp_path / 'nope.yaml'}: cannot read the config file: No such file or directory"
    )


def test_load_reads_the_file(tmp_path: Path) -> None:
    (tmp_path / "rotator.yaml").write_text(HERMES)
    assert load(str(tmp_path / "rotator.yaml")).names == ("hermes",)


def test_yaml_syntax_error_has_its_line_and_field(tmp_path: Path) -> None:
    problems = problems_of(HERMES + "    env: {A: [\n", tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(7, "components.hermes.env.A")]
    assert problems[0].message.startswith("invalid YAML: ")
    problems = problems_of("components:\n  a: 1\n   b: 2\n", tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(3, "components")]
    assert str(problems[0]).startswith(f"{tmp_path / 'r.yaml'}:3: components: invalid YAML: ")
    problems = problems_of("a: b: c\n", tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(1, "(top level)")]


DEEP = 1000  # levels: PyYAML's recursive composer raised RecursionError here


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        ("components: " + "[" * DEEP + "]" * DEEP + "\n", "components", 1),
        ("components: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n", "components.a.a.a.…", 1),
        (
            "components:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(DEEP)),
            "components.k0.k1.k2.…",
            100,
        ),
        ("- " * DEEP + "x\n", "(top level)", 1),
    ],
)
def test_deep_nesting_is_one_problem(text: str, path: str, line: int, tmp_path: Path) -> None:
    problems = problems_of(text, tmp_path / "r.yaml")
    assert [(p.line, p.path, p.message) for p in problems] == [
        (line, path, "nested more than 100 levels deep")
    ]


def test_nesting_up_to_the_limit_is_read(tmp_path: Path) -> None:
    # The 96th list in env.A is the 100th level (the file's mapping is the first): read,
    # and refused for its shape; one more list is one level too many.
    text = HERMES + "    env: {A: " + "[" * 96 + "]" * 96 + "}\n"
    [problem] = problems_of(text, tmp_path / "r.yaml")
    assert problem.message == "must be a single value, not a list"
    [problem] = problems_of(text.replace("[]", "[[]]"), tmp_path / "r.yaml")
    assert problem.message == "nested more than 100 levels deep"


NUL_CASES = [
    ('state_dir: "x\\0y"\n' + HERMES, "state_dir", 1),
    (HERMES + '    cwd: "x\\0y"\n', "components.hermes.cwd", 6),
    (HERMES.replace("run --port", '"run\\0 --port') + '"', "components.hermes.command", 5),
    (HERMES.replace("run --port {port}", '[run, "a\\0"]'), "components.hermes.command", 5),
    (HERMES + '    env: {A: "x\\0"}\n', "components.hermes.env.A", 6),
    (HERMES.replace("127.0.0.1:8001", '"127.0.0.1\\0:8001"'), "components.hermes.listen", 3),
    (HERMES + '    health: {path: "/\\0"}\n', "components.hermes.health.path", 6),
]


@pytest.mark.parametrize(("text", "path", "line"), NUL_CASES)
def test_a_nul_character_is_refused(text: str, path: str, line: int, tmp_path: Path) -> None:
    # Path.resolve() raised ValueError on it; a command or env value would fail only at exec.
    problems = problems_of(text, tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(line, path)]
    assert problems[0].message.startswith("contains a NUL character")


def test_a_nul_in_a_variable_name_is_refused(tmp_path: Path) -> None:
    problems = problems_of(HERMES + '    env: {"A\\0": x}\n', tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(6, "components.hermes.env.A\0")]
    assert "\\x00" in str(problems[0]) and "\0" not in str(problems[0])  # printed escaped


def test_a_raw_control_character_names_its_line(tmp_path: Path) -> None:
    problems = problems_of(HERMES + "    env: {A: x\0}\n", tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(6, "components.hermes.env")]
    assert problems[0].message == "invalid YAML: #x0000 is not allowed in a YAML file"


def test_a_problem_is_printed_on_one_line() -> None:
    problem = Problem("r.yaml", 2, "components.a\nb", "'a\\nb' is not\u2028valid")
    assert str(problem) == "r.yaml:2: components.a\\nb: 'a\\nb' is not\\u2028valid"


def test_bytes_that_are_not_utf8_name_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(HERMES.replace("run --port", "r\xe9n --port").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:5: components.hermes.command: byte 0xe9 at column 15 is not UTF-8"
        " (the file must be)"
    ]
    # Read on past it: the other problems come in the same pass.
    path.write_bytes(b"# \xff\n" + HERMES.replace("18001-18010", "x").encode())
    with pytest.raises(ConfigError) as info:
        load(path)
    assert [(p.line, p.path) for p in info.value.problems] == [
        (1, "(top level)"),
        (5, "components.hermes.ports"),
    ]


def test_a_config_that_is_not_a_mapping_names_the_top_level(tmp_path: Path) -> None:
    assert [str(p) for p in problems_of("just text\n", tmp_path / "r.yaml")] == [
        f"{tmp_path / 'r.yaml'}:1: (top level): must be a mapping, not a single value"
    ]
    assert [str(p) for p in problems_of("# nothing yet\n", tmp_path / "r.yaml")] == [
        f"{tmp_path / 'r.yaml'}:1: components: missing (at least one component is required)"
    ]


def test_a_path_that_cannot_be_resolved_is_a_problem(tmp_path: Path) -> None:
    problems = problems_of(HERMES + "    cwd: ~nosuchuser-rotator/x\n", tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(6, "components.hermes.cwd")]
    assert "is not a usable path" in problems[0].message


def test_all_problems_reported_at_once_in_file_order(tmp_path: Path) -> None:
    text = """\
        admin:
          listen: 127.0.0.1:9900
        components:
          b:
            listen: nope
            ports: 18010-18001
            stop_signal: BOGUS
            command: run
          a:
            comand: x
        """
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), tmp_path / "r.yaml")
    got = [(p.line, p.path) for p in info.value.problems]
    assert got == [
        (5, "components.b.listen"),
        (6, "components.b.ports"),
        (7, "components.b.stop_signal"),
        (9, "components.a.listen"),
        (9, "components.a.ports"),
        (9, "components.a.command"),
        (10, "components.a.comand"),
    ]
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]
    assert len(str(info.value).splitlines()) == 7


def test_problem_str() -> None:
    assert str(Problem("r.yaml", 3, "a.b", "bad")) == "r.yaml:3: a.b: bad"
    assert str(Problem("r.yaml", None, "a.b", "bad")) == "r.yaml: a.b: bad"
    assert str(Problem("r.yaml", 3, "", "bad")) == "r.yaml:3: bad"


def test_specs_are_frozen_and_hashable(tmp_path: Path) -> None:
    config = parse_ok(HERMES + "    env: {A: b}\n", tmp_path / "rotator.yaml")
    spec = config.components[0]
    for obj, attr in [
        (config, "path"),
        (config.admin, "listen"),
        (spec, "ports"),
        (spec.health, "path"),
        (spec.listen, "port"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, None)
    with pytest.raises(TypeError):
        spec.env["A"] = "c"  # type: ignore[index]
    assert hash(config) == hash(parse_ok(HERMES + "    env: {A: b}\n", tmp_path / "rotator.yaml"))


def test_address_str() -> None:
    assert str(Address("127.0.0.1", 8001)) == "127.0.0.1:8001"
    assert str(Address("::1", 8001)) == "[::1]:8001"


def test_default_path() -> None:
    assert default_path({"ROTATOR_CONFIG": "/etc/r.yaml"}) == Path("/etc/r.yaml")
    assert default_path({}) == Path("rotator.yaml")
    assert default_path({"ROTATOR_CONFIG": ""}) == Path("rotator.yaml")


# -- lifecycle keys: depends_on, verify, crash restarts ------------------------------------------


def graph(**deps: str) -> str:
    """Components in keyword order, each 5 lines with `depends_on: <value>` on its second:
    component i (from 0) is on line 2 + 5i, its depends_on on line 3 + 5i."""
    text = "components:\n"
    for i, (name, value) in enumerate(deps.items()):
        text += (
            f"  {name}:\n    depends_on: {value}\n    listen: 127.0.0.1:{8001 + i}\n"
            f"    ports: {18001 + 10 * i}\n    command: run\n"
        )
    return text


# (yaml text, field path, exact message, line): each is the only problem of its text.
LIFECYCLE_CASES = [
    # depends_on
    (
        graph(a="[bb]", b="[]"),
        "components.a.depends_on",
        "unknown component 'bb' (did you mean 'b'?)",
        3,
    ),
    (
        graph(a="[zzz]", b="[]", c="[]"),
        "components.a.depends_on",
        "unknown component 'zzz' (expected one of: b, c)",
        3,
    ),
    (
        graph(a="[b]"),
        "components.a.depends_on",
        "unknown component 'b' (there is no other component)",
        3,
    ),
    (graph(a="[a]"), "components.a.depends_on", "'a' cannot depend on itself", 3),
    (graph(a="[b, b]", b="[]"), "components.a.depends_on", "'b' is listed twice", 3),
    (
        graph(a="[b]", b="[c]", c="[a]"),
        "components.a.depends_on",
        "dependency cycle: a -> b -> c -> a",
        3,
    ),
    (
        graph(a="[]", b="[c]", c="[b]"),
        "components.b.depends_on",
        "dependency cycle: b -> c -> b",
        8,
    ),
    (
        # one strongly connected a, b, c: one problem, its shortest cycle from a
        graph(a="[c, b]", b="[c, a]", c="[a]"),
        "components.a.depends_on",
        "dependency cycle: a -> c -> a",
        3,
    ),
    (
        # the line is that of the list item starting the cycle
        graph(a="\n      - c\n      - b", b="[a]", c="[]"),
        "components.a.depends_on",
        "dependency cycle: a -> b -> a",
        5,
    ),
    (
        graph(a="[[b]]", b="[]"),
        "components.a.depends_on",
        "must be a single value, not a list",
        3,
    ),
    (graph(a="", b="[]"), "components.a.depends_on", "needs a value", 3),
    (graph(a="{b: 1}"), "components.a.depends_on", "must be a single value, not a mapping", 3),
    (
        "defaults:\n  depends_on: [a]\n" + HERMES,
        "defaults.depends_on",
        "can only be set per component",
        2,
    ),
    # health.unhealthy_threshold
    (
        HERMES + "    health: {unhealthy_threshold: 0}\n",
        "components.hermes.health.unhealthy_threshold",
        "must be 1 or more, not 0",
        6,
    ),
    (
        HERMES + "    health: {unhealthy_threshold: 1.5}\n",
        "components.hermes.health.unhealthy_threshold",
        "1.5 is not a whole number",
        6,
    ),
    (
        "defaults:\n  health:\n    unhealthy_threshold: many\n" + HERMES,
        "defaults.health.unhealthy_threshold",
        "'many' is not a whole number",
        3,
    ),
    (
        HERMES + "    health: {unhealthy_treshold: 2}\n",
        "components.hermes.health.unhealthy_treshold",
        "unknown key (did you mean 'unhealthy_threshold'?)",
        6,
    ),
    # verify
    (
        HERMES + "    verify: -1s\n",
        "components.hermes.verify",
        "'-1s' is negative (a duration must be 0 or more)",
        6,
    ),
    (
        "defaults:\n  verify: a while\n" + HERMES,
        "defaults.verify",
        "'a while' is not a duration (use 250ms, 2s, 1m or a number of seconds)",
        2,
    ),
    # max_restarts, restart_window
    (
        HERMES + "    max_restarts: -1\n",
        "components.hermes.max_restarts",
        "must be 0 or more, not -1",
        6,
    ),
    (
        HERMES + "    max_restarts: true\n",
        "components.hermes.max_restarts",
        "True is not a whole number",
        6,
    ),
    (
        HERMES + "    max_restarts: [1]\n",
        "components.hermes.max_restarts",
        "must be a single value, not a list",
        6,
    ),
    (
        HERMES + "    max_restart: 3\n",
        "components.hermes.max_restart",
        "unknown key (did you mean 'max_restarts'?)",
        6,
    ),
    (
        HERMES + "    restart_window: 0\n",
        "components.hermes.restart_window",
        "must be greater than 0",
        6,
    ),
    # restart_backoff, restart_backoff_max
    (
        HERMES + "    restart_backoff: 0ms\n",
        "components.hermes.restart_backoff",
        "must be greater than 0",
        6,
    ),
    (
        HERMES + "    restart_backoff_max: 100ms\n",
        "components.hermes.restart_backoff_max",
        "100ms is less than restart_backoff (500ms)",
        6,
    ),
    (
        HERMES + "    restart_backoff: 1m\n",
        "components.hermes.restart_backoff",
        "1m is more than restart_backoff_max (30s)",
        6,
    ),
    (
        HERMES + "    restart_backoff: 2s\n    restart_backoff_max: 1.5s\n",
        "components.hermes.restart_backoff_max",
        "1.5s is less than restart_backoff (2s)",
        7,
    ),
    (
        "defaults:\n  restart_backoff_max: 250ms\n" + HERMES,
        "defaults.restart_backoff_max",
        "250ms is less than restart_backoff (500ms)",
        2,
    ),
    (
        # the component's own value against the merged default
        "defaults:\n  restart_backoff_max: 1s\n" + HERMES + "    restart_backoff: 2s\n",
        "components.hermes.restart_backoff",
        "2s is more than restart_backoff_max (1s)",
        8,
    ),
    (
        # an invalid value is reported once, not compared as well
        HERMES + "    restart_backoff: 1m\n    restart_backoff_max: soon\n",
        "components.hermes.restart_backoff_max",
        "'soon' is not a duration (use 250ms, 2s, 1m or a number of seconds)",
        7,
    ),
]


@pytest.mark.parametrize(("text", "path", "message", "line"), LIFECYCLE_CASES)
def test_lifecycle_rule(text: str, path: str, message: str, line: int, tmp_path: Path) -> None:
    problems = problems_of(text, tmp_path / "rotator.yaml")
    assert [(p.path, p.message, p.line) for p in problems] == [(path, message, line)]


def test_each_cycle_is_one_problem_and_other_errors_do_not_hide_it(tmp_path: Path) -> None:
    text = graph(a="[b]", b="[a]", c="[d]", d="[c]").replace("127.0.0.1:8001", "nope")
    problems = problems_of(text, tmp_path / "rotator.yaml")
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'rotator.yaml'}:3: components.a.depends_on: dependency cycle: a -> b -> a",
        f"{tmp_path / 'rotator.yaml'}:4: components.a.listen: 'nope' is not host:port"
        " (e.g. 127.0.0.1:8001 or [::1]:8001)",
        f"{tmp_path / 'rotator.yaml'}:13: components.c.depends_on: dependency cycle: c -> d -> c",
    ]


def test_lifecycle_keys_parse_and_merge(tmp_path: Path) -> None:
    config = parse_ok(
        """\
        defaults:
          health: {unhealthy_threshold: 2, interval: 3s}
          verify: 10s
          max_restarts: 0
          restart_window: 2m
          restart_backoff: 1s
          restart_backoff_max: 1m
        components:
          db:
            listen: 127.0.0.1:8001
            ports: 18001
            command: run
            health: {timeout: 1s}
            verify: 0
            max_restarts: "7"
            restart_backoff: 250ms
          api:
            listen: 127.0.0.1:8002
            ports: 18002
            command: run
            depends_on: db
            health: {unhealthy_threshold: 1}
            restart_backoff_max: 1s
          web:
            listen: 127.0.0.1:8003
            ports: 18003
            command: run
            depends_on: [api, db]
        """,
        tmp_path / "rotator.yaml",
    )
    db, api, web = config.components
    assert db.health == HealthSpec(interval=3.0, timeout=1.0, unhealthy_threshold=2)
    assert (db.verify, db.restart.max_restarts, db.restart.restart_window) == (0.0, 7, 120.0)
    assert (db.restart.restart_backoff, db.restart.restart_backoff_max, db.depends_on) == (
        0.25,
        60.0,
        (),
    )
    assert api.health == HealthSpec(interval=3.0, unhealthy_threshold=1)
    assert (api.verify, api.restart.max_restarts, api.depends_on) == (10.0, 0, ("db",))
    assert (api.restart.restart_backoff, api.restart.restart_backoff_max) == (
        1.0,
        1.0,
    )  # equal is fine
    assert web.depends_on == ("api", "db")
    assert config.start_order() == ("db", "api", "web")


def test_lifecycle_defaults_when_omitted(tmp_path: Path) -> None:
    spec = parse_ok(HERMES, tmp_path / "rotator.yaml").component("hermes")
    assert spec.health.unhealthy_threshold == 3
    assert (
        spec.depends_on,
        spec.verify,
        spec.restart.max_restarts,
        spec.restart.restart_window,
    ) == (
        (),
        0.0,
        5,
        60.0,
    )
    assert (spec.restart.restart_backoff, spec.restart.restart_backoff_max) == (0.5, 30.0)
    built = ComponentSpec(
        name="hermes",
        listen=spec.listen,
        ports=spec.ports,
        command=spec.command,
        cwd=spec.cwd,
        env={},
        health=HealthSpec(),
    )
    assert spec == built  # the constructor's defaults are the file's defaults
    assert parse_ok(graph(a="[]"), tmp_path / "r.yaml").component("a").depends_on == ()


# (depends_on per component, in file order; expected start order)
START_ORDERS = [
    ({"a": "[]", "b": "[]", "c": "[]"}, ("a", "b", "c")),
    ({"web": "[api]", "api": "[db]", "db": "[]"}, ("db", "api", "web")),
    ({"a": "[c]", "b": "[]", "c": "[]"}, ("b", "c", "a")),  # each step: first ready in file order
    ({"a": "[b, c]", "b": "[c]", "c": "[]"}, ("c", "b", "a")),
    ({"a": "c", "b": "[a]", "c": "[]", "d": "[]"}, ("c", "a", "b", "d")),
    ({"x": "[z]", "y": "[z]", "z": "[]"}, ("z", "x", "y")),
]


@pytest.mark.parametrize(("deps", "order"), START_ORDERS)
def test_start_order(deps: dict[str, str], order: tuple[str, ...], tmp_path: Path) -> None:
    config = parse_ok(graph(**deps), tmp_path / "rotator.yaml")
    assert config.start_order() == order
    position = {name: i for i, name in enumerate(order)}
    for spec in config.components:
        assert all(position[dep] < position[spec.name] for dep in spec.depends_on)


def test_start_order_of_a_hand_built_config(tmp_path: Path) -> None:
    spec = parse_ok(HERMES, tmp_path / "rotator.yaml").component("hermes")
    a = dataclasses.replace(spec, name="a", depends_on=("b", "elsewhere"))
    b = dataclasses.replace(spec, name="b")
    config = Config(tmp_path / "r.yaml", AdminSpec(), tmp_path, (a, b))
    assert config.start_order() == ("b", "a")  # names that are not components are ignored
    looped = dataclasses.replace(config, components=(a, dataclasses.replace(b, depends_on=("a",))))
    with pytest.raises(ValueError, match="dependency cycle among components a, b"):
        looped.start_order()


# -- proxy keys: timeouts, forwarded headers, request-head limits ---------------------------------


# (yaml text, field path, exact message, line): each is the only problem of its text.
PROXY_CASES = [
    # timeouts: durations, > 0 except request_timeout (0 = no limit)
    (
        HERMES + "    connect_timeout: 0\n",
        "components.hermes.connect_timeout",
        "must be greater than 0",
        6,
    ),
    (
        HERMES + "    read_timeout: 0s\n",
        "components.hermes.read_timeout",
        "must be greater than 0",
        6,
    ),
    (
        HERMES + "    keepalive_timeout: 0ms\n",
        "components.hermes.keepalive_timeout",
        "must be greater than 0",
        6,
    ),
    (
        HERMES + "    request_timeout: -1s\n",
        "components.hermes.request_timeout",
        "'-1s' is negative (a duration must be 0 or more)",
        6,
    ),
    (
        "defaults:\n  read_timeout: a minute\n" + HERMES,
        "defaults.read_timeout",
        "'a minute' is not a duration (use 250ms, 2s, 1m or a number of seconds)",
        2,
    ),
    (
        HERMES + "    connect_timeout: [1s]\n",
        "components.hermes.connect_timeout",
        "must be a single value, not a list",
        6,
    ),
    (
        HERMES + "    conect_timeout: 1s\n",
        "components.hermes.conect_timeout",
        "unknown key (did you mean 'connect_timeout'?)",
        6,
    ),
    # trust_forwarded: true or false only, the value named as written
    (
        HERMES + "    trust_forwarded: yes\n",
        "components.hermes.trust_forwarded",
        "'yes' is not a boolean (use true or false)",
        6,
    ),
    (
        HERMES + "    trust_forwarded: on\n",
        "components.hermes.trust_forwarded",
        "'on' is not a boolean (use true or false)",
        6,
    ),
    (
        "defaults:\n  trust_forwarded: 1\n" + HERMES,
        "defaults.trust_forwarded",
        "'1' is not a boolean (use true or false)",
        2,
    ),
    (
        HERMES + "    trust_forwarded: maybe\n",
        "components.hermes.trust_forwarded",
        "'maybe' is not a boolean (use true or false)",
        6,
    ),
    (
        HERMES + "    trust_forwarded: ''\n",
        "components.hermes.trust_forwarded",
        "'' is not a boolean (use true or false)",
        6,
    ),
    (
        HERMES + "    trust_forwarded:\n",
        "components.hermes.trust_forwarded",
        "needs a value",
        6,
    ),
    (
        HERMES + "    trust_forwarded: {a: 1}\n",
        "components.hermes.trust_forwarded",
        "must be a single value, not a mapping",
        6,
    ),
    (
        HERMES + "    trust_forwared: true\n",
        "components.hermes.trust_forwared",
        "unknown key (did you mean 'trust_forwarded'?)",
        6,
    ),
    # max_header_size: a size, at least 1KiB
    (
        HERMES + "    max_header_size: 64KB\n",
        "components.hermes.max_header_size",
        "'64KB' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)",
        6,
    ),
    (
        HERMES + "    max_header_size: 1.5\n",
        "components.hermes.max_header_size",
        "1.5 is not a size (use 512B, 64KiB, 1MiB or a number of bytes)",
        6,
    ),
    (
        HERMES + "    max_header_size: true\n",
        "components.hermes.max_header_size",
        "True is not a size (use 512B, 64KiB, 1MiB or a number of bytes)",
        6,
    ),
    (
        HERMES + "    max_header_size: 512\n",
        "components.hermes.max_header_size",
        "must be 1KiB or more, not 512B",
        6,
    ),
    (
        "defaults:\n  max_header_size: 1023B\n" + HERMES,
        "defaults.max_header_size",
        "must be 1KiB or more, not 1023B",
        2,
    ),
    (
        HERMES + "    max_header_size: -1KiB\n",
        "components.hermes.max_header_size",
        "'-1KiB' is negative (a size must be 0 or more)",
        6,
    ),
    (
        HERMES + "    max_header_sise: 8KiB\n",
        "components.hermes.max_header_sise",
        "unknown key (did you mean 'max_header_size'?)",
        6,
    ),
    # max_headers: a whole number, at least 1
    (
        HERMES + "    max_headers: 0\n",
        "components.hermes.max_headers",
        "must be 1 or more, not 0",
        6,
    ),
    (
        "defaults:\n  max_headers: lots\n" + HERMES,
        "defaults.max_headers",
        "'lots' is not a whole number",
        2,
    ),
    (
        HERMES + "    max_header: 50\n",
        "components.hermes.max_header",
        "unknown key (did you mean 'max_headers'?)",
        6,
    ),
]


@pytest.mark.parametrize(("text", "path", "message", "line"), PROXY_CASES)
def test_proxy_rule(text: str, path: str, message: str, line: int, tmp_path: Path) -> None:
    problems = problems_of(text, tmp_path / "rotator.yaml")
    assert [(p.path, p.message, p.line) for p in problems] == [(path, message, line)]


def test_proxy_keys_parse_and_merge(tmp_path: Path) -> None:
    config = parse_ok(
        """\
        defaults:
          connect_timeout: 2s
          read_timeout: 30s
          request_timeout: 2m
          keepalive_timeout: 15s
          header_timeout: 3s
          trust_forwarded: true
          max_header_size: 16KiB
          max_headers: 50
        components:
          a:
            listen: 127.0.0.1:8001
            ports: 18001
            command: run
          b:
            listen: 127.0.0.1:8002
            ports: 18002
            command: run
            connect_timeout: 250ms
            read_timeout: 5
            request_timeout: 0
            keepalive_timeout: "1m"
            header_timeout: 500ms
            trust_forwarded: false
            max_header_size: 1MiB
            max_headers: "200"
          c:
            listen: 127.0.0.1:8003
            ports: 18003
            command: run
            max_header_size: 4096
            trust_forwarded: False
        """,
        tmp_path / "rotator.yaml",
    )
    a, b, c = config.components
    assert (
        a.proxy.connect_timeout,
        a.proxy.read_timeout,
        a.proxy.request_timeout,
        a.proxy.keepalive_timeout,
    ) == (
        2.0,
        30.0,
        120.0,
        15.0,
    )
    assert (a.proxy.trust_forwarded, a.proxy.max_header_size, a.proxy.max_headers) == (
        True,
        16384,
        50,
    )
    assert (a.proxy.header_timeout, b.proxy.header_timeout, c.proxy.header_timeout) == (
        3.0,
        0.5,
        3.0,
    )
    assert (
        b.proxy.connect_timeout,
        b.proxy.read_timeout,
        b.proxy.request_timeout,
        b.proxy.keepalive_timeout,
    ) == (
        0.25,
        5.0,
        0.0,
        60.0,
    )
    assert (b.proxy.trust_forwarded, b.proxy.max_header_size, b.proxy.max_headers) == (
        False,
        1048576,
        200,
    )
    # each key is merged on its own: c sets two and inherits the rest from defaults
    assert (c.proxy.connect_timeout, c.proxy.request_timeout, c.proxy.max_headers) == (
        2.0,
        120.0,
        50,
    )
    assert (c.proxy.trust_forwarded, c.proxy.max_header_size) == (False, 4096)
    assert isinstance(a.proxy.max_header_size, int) and isinstance(a.proxy.trust_forwarded, bool)


def test_proxy_defaults_when_omitted(tmp_path: Path) -> None:
    spec = parse_ok(HERMES, tmp_path / "rotator.yaml").component("hermes")
    assert (spec.proxy.connect_timeout, spec.proxy.read_timeout, spec.proxy.request_timeout) == (
        5.0,
        60.0,
        0.0,
    )
    assert (spec.proxy.keepalive_timeout, spec.proxy.header_timeout) == (60.0, 10.0)
    assert (spec.proxy.trust_forwarded, spec.proxy.max_header_size, spec.proxy.max_headers) == (
        False,
        65536,
        100,
    )
    built = ComponentSpec(
        name="hermes",
        listen=spec.listen,
        ports=spec.ports,
        command=spec.command,
        cwd=spec.cwd,
        env={},
        health=HealthSpec(),
    )
    assert spec == built  # the constructor's defaults are the file's defaults
    tuned = dataclasses.replace(
        built, proxy=dataclasses.replace(built.proxy, trust_forwarded=True, max_headers=10)
    )
    assert (tuned.proxy.trust_forwarded, tuned.proxy.max_headers, tuned.proxy.read_timeout) == (
        True,
        10,
        60.0,
    )
    assert hash(tuned) != hash(built)


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("true", True),
        ("false", False),
        ("True", True),
        ("FALSE", False),
        ('"true"', True),
        ("'false'", False),
    ],
)
def test_trust_forwarded_values(written: str, value: bool, tmp_path: Path) -> None:
    text = HERMES + f"    trust_forwarded: {written}\n"
    assert (
        parse_ok(text, tmp_path / "rotator.yaml").component("hermes").proxy.trust_forwarded is value
    )


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (65536, 65536),
        ("65536", 65536),
        ("512B", 512),
        ("64KiB", 65536),
        ("1KiB", 1024),
        ("1MiB", 1048576),
        ("2 MiB", 2097152),
        (" 8 KiB ", 8192),
        ("+4KiB", 4096),
        (0, 0),
        ("0B", 0),
        (10**12, 10**12),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size
    assert isinstance(parse_size(value), int)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("64KB", "'64KB' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ("1MB", "'1MB' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ("64kib", "'64kib' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ("1.5KiB", "'1.5KiB' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ("1GiB", "'1GiB' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ("KiB", "'KiB' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ("", "'' is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        (1.5, "1.5 is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        (True, "True is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        (None, "None is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ([1], "[1] is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        ("9" * 5000, "is not a size (use 512B, 64KiB, 1MiB or a number of bytes)"),
        (-1, "-1 is negative (a size must be 0 or more)"),
        ("-2KiB", "'-2KiB' is negative (a size must be 0 or more)"),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value).endswith(message)


# -- deploy: --env, overrides and stored definitions ---------------------------------------------


def test_parse_env_assignments() -> None:
    assert parse_env_assignments([]) == {}
    assert parse_env_assignments(["A=1", "B=", "C=x=y", "A=2"]) == {
        "A": "2",
        "B": "",
        "C": "x=y",
    }


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("A", "--env 'A' is not NAME=VALUE (no '=')"),
        ("", "--env '' is not NAME=VALUE (no '=')"),
        ("=1", "--env '=1' has an empty name (use NAME=VALUE)"),
    ],
)
def test_parse_env_assignments_rejects(item: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_env_assignments(["OK=1", item])
    assert str(info.value) == message


@pytest.fixture
def spec(tmp_path: Path) -> ComponentSpec:
    text = HERMES + "    env: {A: a, B: b}\n    depends_on: []\n    verify: 5s\n"
    return parse_ok(text, tmp_path / "rotator.yaml").component("hermes")


def test_with_overrides(
    spec: ComponentSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "v2").mkdir()
    command = "serve --port {port} 'two words'"
    new = with_overrides(spec, command=command, cwd="v2", env={"B": "new", "C": "c"}, base=tmp_path)
    assert new.command == ("serve", "--port", "{port}", "two words")
    assert new.cwd == (tmp_path / "v2").resolve()
    assert dict(new.env) == {"A": "a", "B": "new", "C": "c"}
    assert isinstance(new.env, MappingProxyType)
    assert dataclasses.replace(new, command=spec.command, cwd=spec.cwd, env=spec.env) == spec
    assert dict(spec.env) == {"A": "a", "B": "b"}  # the original is untouched
    assert new.render(18001)[0] == ["serve", "--port", "18001", "two words"]
    # a list is used as is; None keeps a field; cwd defaults to the current directory
    monkeypatch.chdir(tmp_path / "v2")
    other = with_overrides(spec, command=["a b", "{port}"], cwd=".")
    assert (other.command, other.cwd, other.env) == (("a b", "{port}"), new.cwd, spec.env)
    assert with_overrides(spec) == spec
    home = with_overrides(spec, cwd=str(tmp_path / "v2"), base=Path("/nonexistent"))
    assert home.cwd == new.cwd  # an absolute cwd ignores base


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"command": ""}, "command is empty"),
        ({"command": "   "}, "command is empty"),
        ({"command": []}, "command is empty"),
        (
            {"command": "run 'oops"},
            """command "run 'oops" cannot be split into words: No closing quotation""",
        ),
        ({"command": ["run", 4]}, "command[1] must be a string, not int"),
        ({"cwd": ""}, "cwd is empty"),
        ({"cwd": "missing"}, "cwd {tmp}/missing does not exist"),
        ({"cwd": "file"}, "cwd {tmp}/file is not a directory"),
        ({"env": {"A=B": "x"}}, "env: 'A=B' is not a variable name (a string without '=')"),
        ({"env": {"": "x"}}, "env: '' is not a variable name (a string without '=')"),
        ({"env": {"A": 1}}, "env.A must be a string, not int"),
        ({"env": ["A=1"]}, "env must be a mapping, not list"),
    ],
)
def test_with_overrides_rejects(
    kwargs: dict[str, Any], message: str, spec: ComponentSpec, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError) as info:
        with_overrides(spec, base=tmp_path, **kwargs)
    assert str(info.value) == message.format(tmp=tmp_path.resolve())


def test_definition_round_trips_through_json(spec: ComponentSpec, tmp_path: Path) -> None:
    assert definition_of(spec) == {
        "command": ["run", "--port", "{port}"],
        "cwd": str(tmp_path.resolve()),
        "env": {"A": "a", "B": "b"},
    }
    (tmp_path / "v2").mkdir()
    deployed = with_overrides(spec, command="v2 {port}", cwd="v2", env={"C": "c"}, base=tmp_path)
    stored = json.loads(json.dumps(definition_of(deployed)))
    again = apply_definition(spec, stored)
    assert again == deployed
    assert dict(again.env) == {"A": "a", "B": "b", "C": "c"}
    assert isinstance(again.env, MappingProxyType)
    assert hash(again) == hash(deployed)
    # the definition replaces env as a whole; missing keys and a null cwd keep the spec's
    assert dict(apply_definition(spec, {"env": {"Z": "z"}}).env) == {"Z": "z"}
    assert apply_definition(spec, {}) == spec
    assert apply_definition(spec, {"cwd": None, "command": ("x",)}).cwd == spec.cwd
    # the cwd is not checked on disk (it may have gone since)
    assert apply_definition(spec, {"cwd": "/gone/away"}).cwd == Path("/gone/away")


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        (["run"], "definition must be a mapping, not list"),
        ({"cmd": ["x"]}, "definition: unknown key 'cmd' (expected command, cwd, env)"),
        ({"command": "run x"}, "definition.command must be a list of strings, not str"),
        ({"command": None}, "definition.command must be a list of strings, not NoneType"),
        ({"command": []}, "definition.command is empty"),
        ({"command": ["x", None]}, "definition.command[1] must be a string, not NoneType"),
        ({"cwd": "relative/dir"}, "definition.cwd must be an absolute path, not 'relative/dir'"),
        ({"cwd": 5}, "definition.cwd must be an absolute path, not 5"),
        ({"env": None}, "definition.env must be a mapping, not NoneType"),
        ({"env": {"A": 1}}, "definition.env.A must be a string, not int"),
        (
            {"env": {"A=": "1"}},
            "definition.env: 'A=' is not a variable name (a string without '=')",
        ),
    ],
)
def test_apply_definition_rejects(definition: Any, message: str, spec: ComponentSpec) -> None:
    with pytest.raises(ValueError) as info:
        apply_definition(spec, definition)
    assert str(info.value) == message


# -- transport: unix, sockets, max_connections ------------------------------------------------

# A unix component: no ports, a socket placeholder. Line 2 is `web:`.
WEB_UNIX = """\
components:
  web:
    listen: 127.0.0.1:8001
    transport: unix
    command: run --unix {socket}
"""

# (yaml text, field path, exact message, line): each is the only problem of its text.
UNIX_CASES = [
    (
        WEB_UNIX + "    ports: 18001-18002\n",
        "components.web.ports",
        "ports is not used with transport: unix (instances listen on Unix sockets)",
        6,
    ),
    (
        "defaults:\n  transport: unix\n" + HERMES.replace(" --port {port}", ""),
        "components.hermes.ports",
        "ports is not used with transport: unix (instances listen on Unix sockets)",
        6,
    ),
    (
        HERMES + "    transport: udp\n",
        "components.hermes.transport",
        "'udp' is not a transport (use tcp or unix)",
        6,
    ),
    (
        "defaults:\n  transport: [unix]\n" + HERMES,
        "defaults.transport",
        "must be a single value, not a list",
        2,
    ),
    (
        HERMES + "    sockets: 8\n",
        "components.hermes.sockets",
        "is only used with transport: unix",
        6,
    ),
    (
        WEB_UNIX + "    sockets: 1\n",
        "components.web.sockets",
        "must be 2 or more, not 1",
        6,
    ),
    (  # a pool of socket paths is built when the file is read: 10**9 of them would not fit
        WEB_UNIX + "    sockets: 1000000000\n",
        "components.web.sockets",
        "must be 1000 or less, not 1000000000",
        6,
    ),
    (
        WEB_UNIX + "    sockets: " + "9" * 5000 + "\n",
        "components.web.sockets",
        "invalid value: Exceeds the limit (4300 digits) for integer string conversion",
        6,
    ),
    (
        "defaults:\n  sockets: many\n" + WEB_UNIX,
        "defaults.sockets",
        "'many' is not a whole number",
        2,
    ),
    (
        WEB_UNIX.replace("{socket}", "{port}"),
        "components.web.command",
        "{port} has no value with transport: unix (use {socket})",
        5,
    ),
    (
        HERMES.replace("{port}", "{socket}"),
        "components.hermes.command",
        "{socket} has no value with transport: tcp (use {port})",
        5,
    ),
    (
        HERMES + "    max_connections: -1\n",
        "components.hermes.max_connections",
        "must be 0 or more, not -1",
        6,
    ),
    (
        "defaults:\n  max_connections: 1.5\n" + HERMES,
        "defaults.max_connections",
        "1.5 is not a whole number",
        2,
    ),
    (
        HERMES + "    max_conections: 10\n",
        "components.hermes.max_conections",
        "unknown key (did you mean 'max_connections'?)",
        6,
    ),
]


@pytest.mark.parametrize(("text", "path", "message", "line"), UNIX_CASES)
def test_unix_rule(text: str, path: str, message: str, line: int, tmp_path: Path) -> None:
    problems = problems_of(text, tmp_path / "rotator.yaml")
    assert [(p.path, p.message, p.line) for p in problems] == [(path, message, line)]


def test_unix_component_gets_a_pool_of_socket_paths(tmp_path: Path) -> None:
    config = parse_ok(
        """\
        state_dir: st
        defaults:
          sockets: 3
        components:
          web:
            listen: 127.0.0.1:8001
            transport: unix
            command: run --unix {socket} --name {name}
            env: {ADDR: "unix:{socket}", P: "{port}"}
          api:
            listen: 127.0.0.1:8002
            transport: UNIX
            sockets: 2
            command: [run, "{socket}"]
          tcp:
            listen: 127.0.0.1:8003
            ports: 18001-18002
            command: run {port}
        """,
        tmp_path / "rotator.yaml",
    )
    web, api, tcp = config.components
    sockets = tmp_path.resolve() / "st" / "sockets"
    assert (web.transport, web.ports) == ("unix", ())
    assert web.sockets == tuple(str(sockets / f"web.{n}.sock") for n in range(3))
    assert api.unix and api.sockets == (str(sockets / "api.0.sock"), str(sockets / "api.1.sock"))
    assert (tcp.transport, tcp.sockets, tcp.unix) == ("tcp", (), False)
    argv, env = web.render(0, "127.0.0.1", web.sockets[1])
    assert argv == ["run", "--unix", web.sockets[1], "--name", "web"]
    # {port} has no value here: left as written; PORT and HOST are not set
    assert env == {
        "ADDR": f"unix:{web.sockets[1]}",
        "P": "{port}",
        "ROTATOR_SOCKET": web.sockets[1],
        "ROTATOR_REPLICA": "0",
    }
    assert tcp.render(18001)[1] == {"PORT": "18001", "HOST": "127.0.0.1", "ROTATOR_REPLICA": "0"}


def test_unix_socket_paths_must_fit_a_sockaddr(tmp_path: Path) -> None:
    deep = "d" * 80
    problems = problems_of(f"state_dir: {deep}\n" + WEB_UNIX, tmp_path / "rotator.yaml")
    longest = tmp_path.resolve() / deep / "sockets" / "web.3.sock"
    size = len(str(longest).encode())
    assert [(p.path, p.line) for p in problems] == [("components.web.transport", 5)]
    assert problems[0].message == (
        f"socket path {longest} is {size} bytes, more than the 103 a Unix socket path may "
        "have; choose a shorter state_dir"
    )
    # From defaults, the problem is at the component
    text = f"state_dir: {deep}\ndefaults:\n  transport: unix\n" + WEB_UNIX.replace(
        "    transport: unix\n", ""
    )
    problems = problems_of(text, tmp_path / "rotator.yaml")
    assert [(p.path, p.line) for p in problems] == [("components.web.transport", 5)]


def test_max_connections_parses_and_merges(tmp_path: Path) -> None:
    text = (
        "defaults:\n  max_connections: 100\n"
        + HERMES
        + OVERLAP[len(HERMES) :].replace("18005-18006", "18020")
        + "    max_connections: 0\n"
    )
    hermes, b = parse_ok(text, tmp_path / "rotator.yaml").components
    assert (hermes.proxy.max_connections, b.proxy.max_connections) == (100, 0)
    assert parse_ok(HERMES, tmp_path / "rotator.yaml").components[0].proxy.max_connections == 0


def test_deploy_keeps_placeholders_to_the_transport(tmp_path: Path) -> None:
    web = parse_ok(WEB_UNIX, tmp_path / "rotator.yaml").component("web")
    assert with_overrides(web, command="serve {socket}").command == ("serve", "{socket}")
    with pytest.raises(ValueError) as info:
        with_overrides(web, command="serve --port {port}")
    assert str(info.value) == "command: {port} has no value with transport: unix (use {socket})"


def test_many_clashing_components_take_linear_time(tmp_path: Path) -> None:
    # Every component is the same (an alias), so each clashes with every other: the checks
    # compared all pairs and reported each (n^2 problems; 20,000 components took minutes).
    # Now each is reported once, against the first; and did-you-mean guesses stop.
    n = 4000
    text = "components:\n  c0: &c {listen: 127.0.0.1:8001, ports: 18001, command: run,"
    text += " depends_on: c}\n" + "".join(f"  c{i}: *c\n" for i in range(1, n))
    began = time.monotonic()
    problems = problems_of(text, tmp_path / "r.yaml")
    took = time.monotonic() - began
    assert len(problems) == n + 2 * (n - 1)  # unknown dependency; listen and pool clashes
    assert {p.message for p in problems if "c0" in p.message} == {
        "127.0.0.1:8001 is also the listen address of component 'c0'",
        "port 18001 is also in the pool of component 'c0'",
    }
    hinted = [p for p in problems if "did you mean" in p.message or "expected" in p.message]
    assert 0 < len(hinted) <= HINT_BUDGET // n + 1
    assert took < 10, f"{n} components took {took:.1f}s: quadratic again?"  # ~0.5 s


def test_a_long_dependency_cycle_is_one_problem(tmp_path: Path) -> None:
    # Longer than Python's recursion limit: the cycle search must not recurse.
    n = 1500
    text = "components:\n" + "".join(
        f"  c{i}: {{listen: 127.0.0.1:{10000 + i}, ports: {20000 + i}, command: run,"
        f" depends_on: c{(i + 1) % n}}}\n"
        for i in range(n)
    )
    [problem] = problems_of(text, tmp_path / "r.yaml")
    assert problem.path == "components.c0.depends_on"
    assert problem.message == "dependency cycle: " + " -> ".join(
        [*(f"c{i}" for i in range(n)), "c0"]
    )


SHELL_PIECES = ["a", "b", " ", "\t", "\n", "\r", "'", '"', "\\", "\x0b", "é", "x y", "$"]


def test_split_words_is_shlex_split() -> None:
    rnd = random.Random(14)
    for _ in range(20000):
        text = "".join(rnd.choice(SHELL_PIECES) for _ in range(rnd.randint(0, 12)))
        try:
            want: object = shlex.split(text)
        except ValueError:
            want = ValueError
        try:
            got: object = split_words(text)
        except ValueError:
            got = ValueError
        assert got == want, repr(text)


@pytest.mark.parametrize(
    "text",
    [
        "x" * 2**20,  # shlex.split took 8 s for this one word: it grows a word by +=
        "'" + "x" * 2**20 + "'",
        '"' + 'x\\"' * 2**18 + '"',
        "\\x" * 2**19,
        '"' + "x" * 2**20,  # unclosed: the error must not take long either
    ],
)
def test_split_words_takes_linear_time(text: str) -> None:
    began = time.monotonic()
    with contextlib.suppress(ValueError):
        split_words(text)
    assert time.monotonic() - began < 3  # well under 1 s; shlex: 8 s or more


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0004, "0ms"),
        (0.5482, "548ms"),
        (0.9996, "1s"),  # not "1000ms"
        (1.0, "1s"),
        (2.634, "2.63s"),
        (30.0, "30s"),
        (59.996, "1m"),
        (90.0, "1m30s"),
        (125.4, "2m05s"),
        (3600.0, "1h"),
        (7500.0, "2h05m"),
        (200000.0, "55h33m"),
    ],
)
def test_one_duration_format_that_the_config_reads_back(seconds: float, text: str) -> None:
    assert printer.duration(seconds) == text
    # Rounded to 10 ms under a minute, to the second under an hour, then to the minute.
    margin = 0.005 if seconds < 60 else 0.5 if seconds < 3600 else 30
    assert parse_duration(text) == pytest.approx(seconds, abs=margin)

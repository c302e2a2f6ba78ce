"""rotator.config: parsing, validation messages (path, text, line), rendering. No processes."""

from __future__ import annotations

import dataclasses
import signal
import textwrap
from pathlib import Path

import pytest

from rotator.config import (
    Address,
    AdminSpec,
    ComponentSpec,
    Config,
    ConfigError,
    HealthSpec,
    Problem,
    default_path,
    load,
    parse,
    parse_duration,
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
    ("admin: {}\n", "components", "missing (at least one component is required)", None),
    ("- 1\n", "", "must be a mapping, not a list", 1),
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
        hold_timeout=1.5,
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
        hold_timeout=1.5,
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
    assert (spec.drain_timeout, spec.stop_timeout, spec.hold_timeout) == (30.0, 10.0, 5.0)
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


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    problems = problems_of(HERMES + "    env: {A: [\n", tmp_path / "r.yaml")
    assert len(problems) == 1
    assert problems[0].message.startswith("invalid YAML: ")
    problems = problems_of("components:\n  a: 1\n   b: 2\n", tmp_path / "r.yaml")
    assert [(p.line, p.path) for p in problems] == [(3, "")]
    assert str(problems[0]).startswith(f"{tmp_path / 'r.yaml'}:3: invalid YAML: ")


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

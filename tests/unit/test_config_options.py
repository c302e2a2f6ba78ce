"""Issue 20's config features as the file states them: env files (dotenv syntax, errors
at the env file's line), health checks that are not HTTP GET, and `logs` rotation
settings; issue 16's `replicas`, `{replica}` and ROTATOR_REPLICA; and issue 17's `canary:`
block. Real files in tmp_path; no processes."""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from pathlib import Path

import pytest

from rotator import envfile
from rotator.config import (
    CanarySpec,
    ConfigError,
    Problem,
    apply_definition,
    definition_of,
    with_overrides,
)
from rotator.configfile import MAX_REPLICAS, parse
from tests.unit.test_config import HERMES

# Line 2 is `hermes:`; cases append keys to it (line 6 on).


ZEUS = """\
  zeus:
    listen: 127.0.0.1:8002
    ports: 18011-18020
    command: run
"""


def problems_of(text: str, path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), path / "rotator.yaml")
    return info.value.problems


def one_problem(text: str, path: Path) -> Problem:
    [problem] = problems_of(text, path)
    return problem


# -- the dotenv syntax --------------------------------------------------------------------

DOTENV = """\
# a comment, then a blank line

PLAIN=value
SPACED = spaced value   # an inline comment
export EXPORTED=yes
EMPTY=
HASH=a#b
SINGLE='literal $HOME \\n # not a comment'
DOUBLE="tab\\there \\"quoted\\" \\\\ \\$HOME # kept"
MULTI="first
second"
DOTTED.NAME-1=ok
PLAIN=later wins
"""


def test_dotenv_syntax() -> None:
    assert envfile.parse(DOTENV, ".env") == {
        "PLAIN": "later wins",
        "SPACED": "spaced value",
        "EXPORTED": "yes",
        "EMPTY": "",
        "HASH": "a#b",
        "SINGLE": "literal $HOME \\n # not a comment",
        "DOUBLE": 'tab\there "quoted" \\ $HOME # kept',
        "MULTI": "first\nsecond",
        "DOTTED.NAME-1": "ok",
    }
    assert envfile.parse("A=1\r\nB='x'\r\n", "f") == {"A": "1", "B": "x"}  # CRLF


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("A=1\nNOT AN ASSIGNMENT\n", 2, "'NOT AN ASSIGNMENT' is not NAME=VALUE"),
        ("A=1\n\nJUSTANAME\n", 3, "'JUSTANAME' is not NAME=VALUE"),
        ("=value\n", 1, "'' is not a variable name"),
        ("1ABC=x\n", 1, "'1ABC' is not a variable name"),
        ('A=1\nB="never closed\nC=3\n', 2, 'the " that opens this value is never closed'),
        ("A='x' trailing\n", 1, "unexpected 'trailing' after the closing quote"),
        ('A="one\ntwo" extra\n', 2, "unexpected 'extra' after the closing quote"),
    ],
)
def test_dotenv_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(envfile.EnvFileError) as info:
        envfile.parse(text, ".env")
    assert info.value.line == line
    assert message in str(info.value) and str(info.value).startswith(f".env:{line}: ")


def test_read_refuses_what_is_not_a_text_file(tmp_path: Path) -> None:
    (tmp_path / "bin.env").write_bytes(b"A=\xff\xfe\n")
    with pytest.raises(envfile.EnvFileError, match="cannot read the env file"):
        envfile.read(tmp_path / "bin.env")
    with pytest.raises(envfile.EnvFileError, match="cannot read the env file"):
        envfile.read(tmp_path)  # a directory
    with pytest.raises(FileNotFoundError):
        envfile.read(tmp_path / "missing.env")
    (tmp_path / "bom.env").write_bytes("\ufeffA=1\n".encode())
    assert envfile.read(tmp_path / "bom.env") == {"A": "1"}


# -- env_file in the config ---------------------------------------------------------------


def test_env_files_merge_in_order_under_env(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=file\nB=file\nC=file\nD=file\n")
    (tmp_path / ".env.local").write_text("B=local\n")
    (tmp_path / "other.env").write_text("A=other\n")
    config = parse(
        textwrap.dedent(
            """\
            defaults:
              env_file: [.env, .env.local]
              env: {C: defaults}
            components:
              hermes:
                listen: 127.0.0.1:8001
                ports: 18001-18010
                command: run
                env: {D: own}
              zeus:
                listen: 127.0.0.1:8002
                ports: 18011-18020
                command: run
                env_file:
                  - other.env
                  - {path: missing.env, required: false}
            """
        ),
        tmp_path / "rotator.yaml",
    )
    hermes, zeus = config.components
    # Later files win over earlier ones; env (the default's, then the component's) over files.
    assert dict(hermes.env) == {"A": "file", "B": "local", "C": "defaults", "D": "own"}
    assert hermes.env_files == (tmp_path / ".env", tmp_path / ".env.local")
    # A component's env_file replaces the default's, as a whole.
    assert dict(zeus.env) == {"A": "other", "C": "defaults"}
    assert zeus.env_files == (tmp_path / "other.env",)


def test_env_file_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.env").write_text("OK=1\n\nBROKEN LINE\n")
    problems = problems_of(
        HERMES
        + """\
    env_file:
      - missing.env
      - bad.env
      - {path: gone.env, required: maybe}
      - {required: false}
      - {path: x.env, optional: true}
""",
        tmp_path,
    )
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'bad.env'}:3: components.hermes.env_file[1]: 'BROKEN LINE' is not NAME=VALUE",
        f"{tmp_path / 'rotator.yaml'}:7: components.hermes.env_file[0]: {tmp_path / 'missing.env'}"
        " does not exist (give it as {path: ..., required: false} if it may be missing)",
        f"{tmp_path / 'rotator.yaml'}:9: components.hermes.env_file[2].required: 'maybe' is not"
        " a boolean (use true or false)",
        f"{tmp_path / 'rotator.yaml'}:10: components.hermes.env_file[3].path: missing (the env file)",
        f"{tmp_path / 'rotator.yaml'}:11: components.hermes.env_file[4].optional: unknown key"
        " (expected one of: path, required)",
        f"{tmp_path / 'rotator.yaml'}:11: components.hermes.env_file[4]: {tmp_path / 'x.env'}"
        " does not exist (give it as {path: ..., required: false} if it may be missing)",
    ]


def test_a_bad_default_env_file_is_reported_once(tmp_path: Path) -> None:
    problem = one_problem(
        "defaults:\n  env_file: nope.env\n" + HERMES + ZEUS,
        tmp_path,
    )
    assert (problem.line, problem.path) == (2, "defaults.env_file")


# -- health: tcp and exec -----------------------------------------------------------------


def test_health_kinds(tmp_path: Path) -> None:
    config = parse(
        textwrap.dedent(
            """\
            defaults:
              health: {exec: "check --port {port}", timeout: 3s}
            components:
              a:
                listen: 127.0.0.1:8001
                ports: 18001-18010
                command: run
              b:
                listen: 127.0.0.1:8002
                ports: 18011-18020
                command: run
                health: {tcp: true}
              c:
                listen: 127.0.0.1:8003
                ports: 18021-18030
                command: run
                health: {path: /ready, interval: 2s}
              d:
                listen: 127.0.0.1:8004
                transport: unix
                command: run
                health: {exec: [probe, "{socket}"]}
            """
        ),
        tmp_path / "rotator.yaml",
    )
    a, b, c, d = (spec.health for spec in config.components)
    assert (a.kind, a.exec, a.timeout) == ("exec", ("check", "--port", "{port}"), 3.0)
    # A component that chooses a kind replaces the default's kind; the rest still merges.
    assert (b.kind, b.tcp, b.exec, b.timeout) == ("tcp", True, (), 3.0)
    assert (c.kind, c.path, c.exec, c.interval) == ("http", "/ready", (), 2.0)
    assert (d.kind, d.exec) == ("exec", ("probe", "{socket}"))


@pytest.mark.parametrize(
    ("health", "path", "message"),
    [
        ("{tcp: true, path: /x}", "tcp", "cannot be set with path: a check is an HTTP GET"),
        ("{path: /x, exec: run}", "exec", "cannot be set with path"),
        ("{tcp: true, exec: run}", "exec", "cannot be set with tcp"),
        ("{tcp: yes}", "tcp", "'yes' is not a boolean (use true or false)"),
        ("{exec: ''}", "exec", "is empty"),
        ("{exec: {a: 1}}", "exec", "must be a string or a list of strings, not a mapping"),
        ("{exec: 'check {socket}'}", "exec", "{socket} has no value with transport: tcp"),
    ],
)
def test_health_kind_problems(health: str, path: str, message: str, tmp_path: Path) -> None:
    problem = one_problem(HERMES + f"    health: {health}\n", tmp_path)
    assert problem.line == 6 and problem.path == f"components.hermes.health.{path}"
    assert message in problem.message


def test_tcp_false_with_a_path_is_an_http_check(tmp_path: Path) -> None:
    config = parse(HERMES + "    health: {tcp: false, path: /up}\n", tmp_path / "r.yaml")
    assert config.components[0].health.kind == "http"


def test_a_default_exec_check_with_the_wrong_placeholder_names_the_component(
    tmp_path: Path,
) -> None:
    problem = one_problem(
        "defaults:\n  health: {exec: 'check {port}'}\n"
        + HERMES.replace("    ports: 18001-18010\n", "    transport: unix\n").replace(
            " --port {port}", ""
        ),
        tmp_path,
    )
    assert problem.line == 4 and problem.path == "components.hermes.health.exec (from defaults)"
    assert "{port} has no value with transport: unix" in problem.message


# -- logs ---------------------------------------------------------------------------------


def test_logs_settings_merge_key_by_key(tmp_path: Path) -> None:
    config = parse(
        "defaults:\n  logs: {max_size: 10MiB}\n" + HERMES + "    logs: {keep: 2}\n" + ZEUS,
        tmp_path / "rotator.yaml",
    )
    hermes, zeus = config.components
    assert (hermes.log_max_size, hermes.log_keep) == (10 * 1024 * 1024, 2)
    assert (zeus.log_max_size, zeus.log_keep) == (10 * 1024 * 1024, 5)
    plain = parse(HERMES, tmp_path / "rotator.yaml").components[0]
    assert (plain.log_max_size, plain.log_keep) == (0, 5)  # never rotated by default


@pytest.mark.parametrize(
    ("logs", "path", "message"),
    [
        ("{max_size: 10}", "max_size", "must be 0 (off) or 1KiB or more"),
        ("{max_size: 10MB}", "max_size", "'10MB' is not a size (use 512B, 64KiB, 1MiB"),
        ("{keep: 0}", "keep", "must be 1 or more, not 0"),
        ("{max_sise: 1MiB}", "max_sise", "unknown key (did you mean 'max_size'?)"),
        ("10MiB", "", "must be a mapping, not a single value"),
    ],
)
def test_logs_problems(logs: str, path: str, message: str, tmp_path: Path) -> None:
    problem = one_problem(HERMES + f"    logs: {logs}\n", tmp_path)
    assert problem.line == 6 and problem.path == "components.hermes.logs" + (
        f".{path}" if path else ""
    )
    assert message in problem.message


# -- replicas (issue 16) ------------------------------------------------------------------


def test_replicas_forms(tmp_path: Path) -> None:
    path = tmp_path / "rotator.yaml"
    spec = parse(HERMES, path).components[0]
    assert (spec.replicas, spec.replicas_auto) == (1, False)
    for written, count in (("3", 3), ('"3"', 3), ("1", 1), ("999", 999)):
        spec = parse(HERMES.replace("18010", "19010") + f"    replicas: {written}\n", path)
        assert (spec.components[0].replicas, spec.components[0].replicas_auto) == (count, False)
    # From defaults, under each component's own.
    text = "defaults:\n  replicas: 2\n" + HERMES + ZEUS + "    replicas: 4\n"
    hermes, zeus = parse(text, path).components
    assert (hermes.replicas, zeus.replicas) == (2, 4)


def test_replicas_auto_is_the_cpu_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rotator.yaml"
    for written in ("auto", "AUTO", '"auto"'):
        [spec] = parse(HERMES + f"    replicas: {written}\n", path).components
        assert (spec.replicas, spec.replicas_auto) == (os.cpu_count() or 1, True)
    # cpu_count() may not know (None): one replica; and a huge machine is capped.
    for cores, count in ((None, 1), (6, 6), (4096, MAX_REPLICAS)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        text = "defaults:\n  replicas: auto\n" + HERMES.replace("18010", "19010")
        assert parse(text, path).components[0].replicas == count


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("0", "must be 1 or more (or auto), not 0"),
        ("-1", "must be 1 or more (or auto), not -1"),
        ("many", "'many' is not a whole number or auto"),
        ("1.5", "1.5 is not a whole number or auto"),
        ("true", "True is not a whole number or auto"),
        ('"2.0"', "'2.0' is not a whole number or auto"),
        ("1000", "must be 999 or less (or auto), not 1000"),
        (
            '"' + "9" * 5000 + '"',
            "'99999999999999999999999999999999999...' is not a whole number or auto",
        ),
        ("[2]", "must be a single value, not a list"),
        ("", "needs a value"),
    ],
)
def test_bad_replicas(written: str, message: str, tmp_path: Path) -> None:
    # A one-port pool is too small for the default's 3, but the component's own value is
    # not known: that one problem alone.
    one_port = "defaults:\n  replicas: 3\n" + HERMES.replace("18001-18010", "18001")
    problem = one_problem(one_port + f"    replicas: {written}\n", tmp_path)
    where = (problem.line, problem.path, problem.message)
    assert where == (8, "components.hermes.replicas", message)
    problem = one_problem(f"defaults:\n  replicas: {written}\n" + HERMES + ZEUS, tmp_path)
    assert (problem.line, problem.path, problem.message) == (2, "defaults.replicas", message)


def test_a_huge_quoted_max_clients_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    problem = one_problem(f'max_clients: "{"9" * 5000}"\n' + HERMES, tmp_path)
    assert (problem.line, problem.path) == (1, "max_clients")
    assert problem.message.endswith("...' is not a whole number or auto")


TOO_SMALL = "a rotation needs replicas + 1 = {} (one new instance starts before an old one stops)"


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [
        (  # the issue's own example
            HERMES.replace("18010", "18003") + "    replicas: 3\n",
            4,
            "components.hermes.ports",
            "3 ports for replicas: 3; " + TOO_SMALL.format(4),
        ),
        (
            HERMES.replace("18001-18010", "[18001]") + "    replicas: 2\n",
            4,
            "components.hermes.ports",
            "1 port for replicas: 2; " + TOO_SMALL.format(3),
        ),
        (  # replicas from defaults: still at the component's ports
            "defaults:\n  replicas: 12\n" + HERMES,
            6,
            "components.hermes.ports",
            "10 ports for replicas: 12; " + TOO_SMALL.format(13),
        ),
        (
            HERMES.replace("{port}", "{socket}").replace("ports: 18001-18010", "transport: unix")
            + "    sockets: 3\n    replicas: 3\n",
            6,
            "components.hermes.sockets",
            "3 sockets for replicas: 3; " + TOO_SMALL.format(4),
        ),
        (  # both from defaults: at the component, naming where the pool's size came from
            "defaults:\n  transport: unix\n  sockets: 2\n  replicas: 2\n"
            + HERMES.replace("{port}", "{socket}").replace("    ports: 18001-18010\n", ""),
            6,
            "components.hermes.sockets (from defaults)",
            "2 sockets for replicas: 2; " + TOO_SMALL.format(3),
        ),
    ],
)
def test_a_pool_too_small_for_the_replicas(
    text: str, line: int, path: str, message: str, tmp_path: Path
) -> None:
    problem = one_problem(text, tmp_path)
    assert (problem.line, problem.path, problem.message) == (line, path, message)
    assert str(problem) == f"{tmp_path / 'rotator.yaml'}:{line}: {path}: {message}"


def test_a_pool_too_small_for_auto_says_what_auto_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    problem = one_problem(HERMES.replace("18010", "18004") + "    replicas: auto\n", tmp_path)
    assert (problem.line, problem.path) == (4, "components.hermes.ports")
    assert problem.message == "4 ports for replicas: auto (8 on this machine); " + TOO_SMALL.format(
        9
    )


def test_pools_that_fit_the_replicas(tmp_path: Path) -> None:
    path = tmp_path / "rotator.yaml"
    # replicas + 1 is enough; one replica on one port stays allowed (as before replicas).
    parse(HERMES.replace("18010", "18004") + "    replicas: 3\n", path)
    parse(HERMES.replace("18001-18010", "18001"), path)
    parse(HERMES.replace("18001-18010", "18001") + "    replicas: 1\n", path)
    unix = "state_dir: s\n" + HERMES.replace("{port}", "{socket}").replace(
        "ports: 18001-18010", "transport: unix"
    )
    # Without `sockets`, the pool grows with the replicas, keeping one replica's 3 spare.
    for replicas, sockets in ((1, 4), (2, 5), (6, 9), (999, 1000)):
        [spec] = parse(unix + f"    replicas: {replicas}\n", path).components
        assert len(spec.sockets) == sockets
        assert spec.sockets[-1].endswith(f"hermes.{sockets - 1}.sock")
    [spec] = parse(unix + "    sockets: 4\n    replicas: 3\n", path).components
    assert len(spec.sockets) == 4


def test_replica_placeholder_and_env(tmp_path: Path) -> None:
    text = (
        HERMES.replace("run --port {port}", "run --port {port} --slot {replica} {replicas}")
        + "    env: {SLOT: 'w{replica}', LOG: '/var/log/{name}.{replica}.log'}\n"
        + "    health: {exec: 'probe {port} {replica}'}\n"
    )
    [spec] = parse(text, tmp_path / "rotator.yaml").components
    argv, env = spec.render(18003, replica=2)
    assert argv == ["run", "--port", "18003", "--slot", "2", "{replicas}"]  # only exact words
    assert env == {
        "SLOT": "w2",
        "LOG": "/var/log/hermes.2.log",
        "PORT": "18003",
        "HOST": "127.0.0.1",
        "ROTATOR_REPLICA": "2",
    }
    # Existing callers (no replica): slot 0. An exec check renders as health.py does.
    assert spec.render(18003)[0][4] == "0" and spec.render(18003)[1]["ROTATOR_REPLICA"] == "0"
    check = dataclasses.replace(spec, command=spec.health.exec)
    assert check.render(18004, replica=1)[0] == ["probe", "18004", "1"]
    # A unix component's instance learns its slot the same way; an env value wins nowhere.
    unix = HERMES.replace("{port}", "{socket} {replica}").replace(
        "ports: 18001-18010", "transport: unix"
    )
    [spec] = parse(unix + "    env: {ROTATOR_REPLICA: mine}\n", tmp_path / "u.yaml").components
    argv, env = spec.render(0, socket="/s/hermes.1.sock", replica=4)
    assert argv == ["run", "--port", "/s/hermes.1.sock", "4"]
    assert env == {"ROTATOR_SOCKET": "/s/hermes.1.sock", "ROTATOR_REPLICA": "4"}


def test_deploy_takes_the_replica_placeholder_but_not_a_count(tmp_path: Path) -> None:
    [spec] = parse(HERMES + "    replicas: 3\n", tmp_path / "rotator.yaml").components
    deployed = with_overrides(
        spec, command="run --port {port} --slot {replica}", env={"S": "{replica}"}
    )
    assert deployed.render(18002, replica=1)[0][-1] == "1"
    assert deployed.render(18002, replica=1)[1]["S"] == "1"
    assert deployed.replicas == 3
    # A deployed definition is what runs, not how many: stored and restored without replicas.
    assert "replicas" not in definition_of(deployed)
    one = dataclasses.replace(spec, replicas=1)
    assert apply_definition(one, definition_of(deployed)).replicas == 1
    assert apply_definition(one, definition_of(deployed)).command == deployed.command
    with pytest.raises(ValueError, match="unknown key 'replicas'"):
        apply_definition(spec, {**definition_of(deployed), "replicas": 5})
    with pytest.raises(ValueError, match=re.escape("{socket} has no value with transport: tcp")):
        with_overrides(spec, command="run {socket} {replica}")


# -- canary (issue 17) ----------------------------------------------------------------------

# `canary:` is line 6, its first key line 7.
CANARY = HERMES + "    canary:\n"


def canary_of(text: str, path: Path, name: str = "hermes") -> CanarySpec:
    return parse(text, path / "rotator.yaml").component(name).canary


def test_canary_defaults(tmp_path: Path) -> None:
    assert canary_of(HERMES, tmp_path) == CanarySpec(60.0, 20, 0.01, 1.5)
    assert canary_of(CANARY, tmp_path) == CanarySpec()  # an empty block


@pytest.mark.parametrize(
    ("written", "field", "value"),
    [
        ("duration: 2m", "duration", 120.0),
        ("duration: 90", "duration", 90.0),
        ("duration: 1m30s", "duration", 90.0),
        ("duration: 500ms", "duration", 0.5),
        ("min_requests: 0", "min_requests", 0),
        ("min_requests: '50'", "min_requests", 50),
        ("max_error_rate: 1%", "max_error_rate", 0.01),
        ("max_error_rate: 0.5%", "max_error_rate", 0.005),
        ("max_error_rate: .5 %", "max_error_rate", 0.005),
        ("max_error_rate: 0.3%", "max_error_rate", 0.003),  # exactly 3 in 1,000
        ("max_error_rate: 0%", "max_error_rate", 0.0),
        ("max_error_rate: 100%", "max_error_rate", 1.0),
        ("max_error_rate: 0.005", "max_error_rate", 0.005),  # a bare number is a fraction
        ("max_error_rate: '0.02'", "max_error_rate", 0.02),
        ("max_error_rate: 0", "max_error_rate", 0.0),
        ("max_latency_ratio: 2", "max_latency_ratio", 2.0),
        ("max_latency_ratio: 1.25", "max_latency_ratio", 1.25),
        ("max_latency_ratio: '3'", "max_latency_ratio", 3.0),
        ("max_latency_ratio: 0.8", "max_latency_ratio", 0.8),  # must be faster
    ],
)
def test_canary_accepted_forms(written: str, field: str, value: float, tmp_path: Path) -> None:
    canary = canary_of(CANARY + f"      {written}\n", tmp_path)
    assert getattr(canary, field) == value and type(getattr(canary, field)) is type(value)
    # Only that field moved from its default.
    assert dataclasses.replace(canary, **{field: getattr(CanarySpec(), field)}) == CanarySpec()


RATE_HINT = "(use a percentage such as 1% or 0.5%, or a fraction below 1 such as 0.005)"
FRACTION = "for a percentage (a bare number is a fraction: 0.01 is 1%)"


@pytest.mark.parametrize(
    ("written", "path", "message"),
    [
        ("duraton: 2m", "duraton", "unknown key (did you mean 'duration'?)"),
        ("max_errors: 1%", "max_errors", "unknown key (did you mean 'max_error_rate'?)"),
        ("duration: 0", "duration", "must be greater than 0"),
        ("duration: soon", "duration", "'soon' is not a duration (use 250ms, 2s, 1m or a number of seconds)"),
        ("duration: -5s", "duration", "'-5s' is negative (a duration must be 0 or more)"),
        ("min_requests: -1", "min_requests", "must be 0 or more, not -1"),
        ("min_requests: 2.5", "min_requests", "2.5 is not a whole number"),
        ("min_requests: many", "min_requests", "'many' is not a whole number"),
        ("max_error_rate: 1", "max_error_rate", f"1 is not a fraction below 1: write 1% {FRACTION}"),
        ("max_error_rate: 5", "max_error_rate", f"5 is not a fraction below 1: write 5% {FRACTION}"),
        ("max_error_rate: 1.5", "max_error_rate", f"1.5 is not a fraction below 1: write 1.5% {FRACTION}"),
        ("max_error_rate: '2'", "max_error_rate", f"'2' is not a fraction below 1: write 2% {FRACTION}"),
        ("max_error_rate: 150%", "max_error_rate", "'150%' is more than 100%"),
        ("max_error_rate: -1%", "max_error_rate", "'-1%' is negative (a rate must be 0% or more)"),
        ("max_error_rate: -0.01", "max_error_rate", "-0.01 is negative (a rate must be 0% or more)"),
        ("max_error_rate: lots", "max_error_rate", f"'lots' is not a rate {RATE_HINT}"),
        ("max_error_rate: 1 %%", "max_error_rate", f"'1 %%' is not a rate {RATE_HINT}"),
        ("max_error_rate: true", "max_error_rate", f"True is not a rate {RATE_HINT}"),
        ("max_error_rate: .nan", "max_error_rate", f"nan is not a rate {RATE_HINT}"),
        ("max_error_rate: [1%]", "max_error_rate", "must be a single value, not a list"),
        ("max_error_rate:", "max_error_rate", "needs a value"),
        ("max_latency_ratio: 0", "max_latency_ratio", "must be above 0, not 0"),
        ("max_latency_ratio: -1.5", "max_latency_ratio", "must be above 0, not -1.5"),
        ("max_latency_ratio: fast", "max_latency_ratio", "'fast' is not a number (e.g. 1.5)"),
        ("max_latency_ratio: 1.5x", "max_latency_ratio", "'1.5x' is not a number (e.g. 1.5)"),
        ("max_latency_ratio: .inf", "max_latency_ratio", "inf is not a number (e.g. 1.5)"),
        ("max_latency_ratio: 'nan'", "max_latency_ratio", "'nan' is not a number (e.g. 1.5)"),
        ("max_latency_ratio: false", "max_latency_ratio", "False is not a number (e.g. 1.5)"),
    ],
)  # fmt: skip
def test_canary_problems(written: str, path: str, message: str, tmp_path: Path) -> None:
    problem = one_problem(CANARY + f"      {written}\n", tmp_path)
    assert (
        str(problem) == f"{tmp_path / 'rotator.yaml'}:7: components.hermes.canary.{path}: {message}"
    )
    # The same in defaults: reported once, at its defaults path and line, for both components.
    problem = one_problem(f"defaults:\n  canary:\n    {written}\n" + HERMES + ZEUS, tmp_path)
    assert (problem.line, problem.path, problem.message) == (3, f"defaults.canary.{path}", message)


def test_canary_must_be_a_mapping(tmp_path: Path) -> None:
    problem = one_problem(HERMES + "    canary: 10%\n", tmp_path)
    assert (problem.line, problem.path, problem.message) == (
        6,
        "components.hermes.canary",
        "must be a mapping, not a single value",
    )


def test_every_canary_problem_is_reported_in_one_pass(tmp_path: Path) -> None:
    text = CANARY + "      duration: 0\n      min_requests: -1\n      max_error_rate: 2\n"
    assert [(p.line, p.path.rsplit(".", 1)[1]) for p in problems_of(text, tmp_path)] == [
        (7, "duration"),
        (8, "min_requests"),
        (9, "max_error_rate"),
    ]


def test_canary_merges_over_defaults_field_by_field(tmp_path: Path) -> None:
    text = (
        "defaults:\n  canary:\n    duration: 2m\n    max_error_rate: 0.5%\n"
        + CANARY
        + "      min_requests: 0\n      duration: 30s\n"
        + ZEUS
    )
    config = parse(text, tmp_path / "rotator.yaml")
    assert config.component("hermes").canary == CanarySpec(30.0, 0, 0.005, 1.5)
    assert config.component("zeus").canary == CanarySpec(120.0, 20, 0.005, 1.5)


def test_a_deploy_keeps_the_canary_rule(tmp_path: Path) -> None:
    # The rule is the component's, not the definition's: a deploy neither carries nor drops it.
    spec = parse(CANARY + "      min_requests: 5\n", tmp_path / "rotator.yaml").components[0]
    deployed = with_overrides(spec, command="run v2 --port {port}")
    assert deployed.canary == spec.canary == CanarySpec(min_requests=5)
    assert "canary" not in definition_of(deployed)
    assert (
        apply_definition(
            dataclasses.replace(spec, canary=CanarySpec()), definition_of(deployed)
        ).canary
        == CanarySpec()
    )

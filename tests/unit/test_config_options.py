"""Issue 20's config features as the file states them: env files (dotenv syntax, errors
at the env file's line), health checks that are not HTTP GET, and `logs` rotation
settings. Real files in tmp_path; no processes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rotator import envfile
from rotator.config import ConfigError, Problem
from rotator.configfile import parse

# Line 2 is `hermes:`; cases append keys to it (line 6 on).
HERMES = """\
components:
  hermes:
    listen: 127.0.0.1:8001
    ports: 18001-18010
    command: run --port {port}
"""


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

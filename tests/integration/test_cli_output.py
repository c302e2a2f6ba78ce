"""The CLI where people first meet it: the README's sample output, errors as one line
with no traceback, and a reader that goes away (`rotator status | head -3`). A real
daemon, the real CLI in subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import PY, Load, cli, component, write_config

README = Path(__file__).parents[2] / "README.md"


def readme_block(after: str) -> list[str]:
    """The lines of the README's first fenced block after the text `after`."""
    text = README.read_text()
    block = text[text.index(after) :].split("```")[1]
    return block.strip("\n").splitlines()


def shape(line: str) -> str:
    """What kind of line it is: numbers, durations, pids and ports made alike."""
    line = re.sub(r"\[\s+", "[", line)
    return re.sub(r"\d+(?:\.\d+)?(?:ms|s|m|h)?(?:\d+(?:ms|s|m))?", "N", line)


def test_the_readme_restart_sample_is_what_restart_prints(tmp_path: Path, daemon_factory) -> None:
    # As in the README: the bundled demo, with its startup delay, restarted by name.
    demo = f"{PY} -m rotator.demo --port {{port}} --name {{name}} --startup-delay 0.5"
    config = write_config(tmp_path, {"hermes": component(command=demo)})
    daemon = daemon_factory(config)
    with Load(daemon.url("hermes"), clients=2) as load:  # the README's curl loop
        result = cli(config, "restart", "hermes")
    assert result.returncode == 0, result.stderr
    assert load.report.failed == 0, load.report.samples
    sample = readme_block("`rotator restart` prints each step with its time:")
    assert [shape(line) for line in result.stdout.splitlines()] == [shape(s) for s in sample]
    # `rotator status | head -3`, with the reader gone before the first line: no traceback.
    gone = closed_pipe(config, "status")
    assert (gone.returncode, gone.stderr) == (FAILED, "")
    gone = closed_pipe(config, "events")  # a stream: the reader decides where it ends
    assert (gone.returncode, gone.stderr) == (0, "")


def closed_pipe(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with its stdout a pipe nobody reads any more (`rotator status | head -0`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [PY, "-m", "rotator", "-c", str(config), *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


FAILED = 1  # docs/cli.md: the output, perhaps the result, was not all delivered


def test_a_closed_pipe_is_not_a_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"web": component()}, export={"kubernetes": {"image": "a"}})
    for args in (("export", "kubernetes"), ("service", "systemd", "--dry-run"), ("check",)):
        gone = closed_pipe(config, *args)
        assert (gone.returncode, gone.stderr) == (FAILED, ""), args


def test_no_config_file_says_where_it_looked(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ROTATOR_CONFIG"}
    run = [PY, "-m", "rotator", "status"]
    result = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (
        2,
        f"rotator: no config file (no rotator.yaml in {tmp_path} and $ROTATOR_CONFIG is not"
        " set; give one with -c FILE or ROTATOR_CONFIG=FILE)\n",
    )
    env["ROTATOR_CONFIG"] = str(tmp_path / "fleet.yaml")
    result = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (
        2,
        f"rotator: no config file ($ROTATOR_CONFIG is {tmp_path / 'fleet.yaml'}, which does not"
        " exist; point it elsewhere with -c FILE or ROTATOR_CONFIG=FILE)\n",
    )


BROKEN = {
    "deep": b"components: " + b"[" * 1000 + b"]" * 1000 + b"\n",
    "nul": b"components:\n  a:\n    listen: 127.0.0.1:1\n    ports: 2\n    command: x\n"
    b'    cwd: "a\\0"\n',
    "latin-1": b"components:\n  caf\xe9: {}\n",
    "empty": b"",
    "a list": b"- a\n",
    "many": b"components:\n  c0: &c {listen: 127.0.0.1:1, ports: 2, command: x}\n"
    + b"".join(b"  c%d: *c\n" % i for i in range(1, 2000)),
}


def test_check_prints_each_problem_as_file_line_field_message(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    for name, data in BROKEN.items():
        path.write_bytes(data)
        result = cli(path, "check")
        assert result.returncode == 2, name
        assert result.stderr and "Traceback" not in result.stderr, name
        pattern = rf"{re.escape(str(path))}:\d+: [^ :]+( [a-z]+\))?: \S.*"
        for line in result.stderr.splitlines():
            assert re.fullmatch(pattern, line), (name, line)

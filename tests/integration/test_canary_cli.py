"""`rotator deploy --canary` and `rotator promote` as the real CLI parses them (issue 17):
a bad value is one line on stderr and exit 2, before any daemon is asked; good ones get
as far as the admin API (no daemon here: exit 1 saying so). Every case is a subprocess of
`python -m rotator` against a real config; they run at once, so the file takes the time
of about one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, component, write_config

HELP = "(see: rotator deploy --help)"

# (arguments after `-c FILE`, exit code, the one line on stderr)
CASES: dict[str, tuple[list[str], int, str]] = {
    "percent 0": (
        ["deploy", "web", "--canary", "0"],
        2,
        f"rotator: argument --canary: must be from 1 to 99 percent: '0' {HELP}",
    ),
    "percent 100%": (
        ["deploy", "web", "--canary", "100%"],
        2,
        f"rotator: argument --canary: must be from 1 to 99 percent: '100%' {HELP}",
    ),
    "percent words": (
        ["deploy", "web", "--canary", "ten"],
        2,
        f"rotator: argument --canary: not a whole number of percent: 'ten' (e.g. 10%) {HELP}",
    ),
    "percent fraction": (
        ["deploy", "web", "--canary", "10.5%"],
        2,
        f"rotator: argument --canary: not a whole number of percent: '10.5%' (e.g. 10%) {HELP}",
    ),
    "percent negative": (
        ["deploy", "web", "--canary", "-5"],
        2,
        f"rotator: argument --canary: not a whole number of percent: '-5' (e.g. 10%) {HELP}",
    ),
    "percent missing": (
        ["deploy", "web", "--canary"],
        2,
        f"rotator: argument --canary: expected one argument {HELP}",
    ),
    "window 0": (
        ["deploy", "web", "--canary", "10", "--for", "0s"],
        2,
        f"rotator: argument --for: must be greater than 0: '0s' {HELP}",
    ),
    "window words": (
        ["deploy", "web", "--canary", "10", "--for", "soon"],
        2,
        "rotator: argument --for: 'soon' is not a duration (use 250ms, 2s, 1m or a number of"
        f" seconds) {HELP}",
    ),
    "min-requests negative": (
        ["deploy", "web", "--canary", "10", "--min-requests", "-1"],
        2,
        f"rotator: argument --min-requests: not a whole number: '-1' {HELP}",
    ),
    "min-requests words": (
        ["deploy", "web", "--canary", "10", "--min-requests", "many"],
        2,
        f"rotator: argument --min-requests: not a whole number: 'many' {HELP}",
    ),
    "window without a canary": (
        ["deploy", "web", "--for", "30s"],
        2,
        "rotator: --for goes with --canary PERCENT",
    ),
    "min-requests without a canary": (
        ["deploy", "web", "--min-requests", "5", "--env", "A=1"],
        2,
        "rotator: --min-requests goes with --canary PERCENT",
    ),
    "unknown component": (
        ["deploy", "nope", "--canary", "10"],
        2,
        "rotator: unknown component 'nope' (have: web)",
    ),
    "promote without a name": (
        ["promote"],
        2,
        "rotator: the following arguments are required: NAME (see: rotator promote --help)",
    ),
    "promote an unknown component": (
        ["promote", "nope"],
        2,
        "rotator: unknown component 'nope' (have: web)",
    ),
    # Parsed, and sent on: there is no daemon (nor its token) to take it.
    "a canary deploy": (
        ["deploy", "web", "--canary", "10%", "--for", "1m30s", "--min-requests", "0"],
        1,
        "rotator: cannot read the admin token {token}: No such file or directory"
        " (is the daemon running?)",
    ),
    "promote": (
        ["promote", "web", "--no-wait"],
        1,
        "rotator: cannot read the admin token {token}: No such file or directory"
        " (is the daemon running?)",
    ),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str, Path]]:
    """Every case's (exit code, stdout, stderr, config), run at once."""
    directory = tmp_path_factory.mktemp("canary-cli")
    config = write_config(directory, {"web": component()})
    running = {
        case: subprocess.Popen(
            [PY, "-m", "rotator", "-c", str(config), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (args, _, _) in CASES.items()
    }
    results = {}
    for case, proc in running.items():
        out, err = proc.communicate(timeout=60)
        results[case] = (proc.returncode, out, err, config)
    return results


@pytest.mark.parametrize("case", CASES)
def test_one_line_and_the_exit_code(
    case: str, outcomes: dict[str, tuple[int, str, str, Path]]
) -> None:
    code, out, err, config = outcomes[case]
    _, expected_code, line = CASES[case]
    token = config.parent / "state" / "admin.token"
    assert (code, out, err) == (expected_code, "", line.format(token=token) + "\n")

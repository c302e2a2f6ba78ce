"""rotator.service: the systemd units and the launchd plist it renders, and the
`rotator service` command that writes them (checked by systemd-analyze when present)."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rotator import fleet, service
from rotator.config import Config
from rotator.configfile import parse
from tests.conftest import PY

CONFIG = """\
defaults: {drain_timeout: 5s, stop_timeout: 3s}
components:
  db:
    listen: 127.0.0.1:8001
    ports: 18001-18002
    command: run db
  api:
    listen: "[::1]:8002"
    ports: 18003-18004
    command: run api
    depends_on: [db]
    stop_timeout: 4s
  web:
    listen: localhost:8003
    ports: 18005-18006
    command: run web
"""
ROTATOR = ("/opt/rotator/bin/rotator",)


def config_at(path: Path, text: str = CONFIG) -> Config:
    return parse(text, path)


def options(**changes: object) -> service.Options:
    base: dict[str, object] = {
        "name": "shop",
        "rotator": ROTATOR,
        "home": Path("/home/ann"),
        "path": "/usr/bin:/bin",
    }
    return service.Options(**{**base, **changes})  # type: ignore[arg-type]


def sections(text: bytes) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}}: keys may repeat (Environment=)."""
    parsed: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = parsed.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"not key=value in a section: {line!r}"
        current.setdefault(key, []).append(value)
    return parsed


def words(exec_line: str) -> list[str]:
    """An Exec line back into its words (systemd's quoting is a superset of this)."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_line)]


def test_systemd_service_runs_up_and_stops_with_down(tmp_path: Path) -> None:
    config = config_at(tmp_path / "shop.yaml")
    rendered = service.render("systemd", config, options())
    unit = sections(rendered.files["rotator-shop.service"])
    svc = unit["Service"]
    assert svc["Type"] == ["notify"]  # it says READY=1 once every component is up
    assert svc["NotifyAccess"] == ["all"]  # a takeover's MAINPID= comes from the new daemon
    assert words(svc["ExecStart"][0]) == [*ROTATOR, "up", "-c", str(config.path)]
    assert svc["ExecStop"][0].startswith("-")  # after a crash there is nobody to ask
    assert words(svc["ExecStop"][0][1:]) == [*ROTATOR, "down", "-c", str(config.path)]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["KillMode"] == ["process"]
    assert svc["Delegate"] == ["yes"]  # a cgroup per instance under the daemon's
    assert svc["Restart"] == ["on-failure"]
    assert svc["RestartPreventExitStatus"] == ["2"]
    assert svc["WorkingDirectory"] == [str(tmp_path)]
    assert svc["Environment"] == ["PYTHONUNBUFFERED=1", "PATH=/usr/bin:/bin"]
    assert "User" not in svc
    assert unit["Install"]["WantedBy"] == ["default.target"]
    assert rendered.directory == Path("/home/ann/.config/systemd/user")
    assert rendered.enable[0] == "systemctl --user daemon-reload"


def test_one_socket_unit_per_component_named_after_it(tmp_path: Path) -> None:
    rendered = service.render("systemd", config_at(tmp_path / "shop.yaml"), options())
    expected = ["rotator-shop-db.socket", "rotator-shop-api.socket"]
    assert list(rendered.files) == ["rotator-shop.service", *expected]
    unit = sections(rendered.files["rotator-shop.service"])
    assert unit["Service"]["Sockets"] == [" ".join(expected)]
    assert unit["Unit"]["Requires"] == [" ".join(expected)]
    db = sections(rendered.files["rotator-shop-db.socket"])
    assert db["Socket"]["ListenStream"] == ["127.0.0.1:8001"]
    assert db["Socket"]["FileDescriptorName"] == ["db"]
    assert db["Socket"]["Service"] == ["rotator-shop.service"]
    assert db["Socket"]["Backlog"] == ["1024"]
    assert "BindIPv6Only" not in db["Socket"]
    assert "PartOf" not in db["Unit"]  # a service restart must not close the socket
    api = sections(rendered.files["rotator-shop-api.socket"])
    assert api["Socket"]["ListenStream"] == ["[::1]:8002"]
    assert api["Socket"]["BindIPv6Only"] == ["ipv6-only"]
    # web listens on a name: ListenStream= takes addresses only, so rotator binds it.
    assert any(note.startswith("web: listen host 'localhost'") for note in rendered.notes)
    enable = rendered.enable[1].split()
    assert enable[:4] == ["systemctl", "--user", "enable", "--now"]
    assert enable[4:] == list(rendered.files)


def test_no_sockets_renders_the_service_alone(tmp_path: Path) -> None:
    rendered = service.render("systemd", config_at(tmp_path / "shop.yaml"), options(sockets=False))
    assert list(rendered.files) == ["rotator-shop.service"]
    unit = sections(rendered.files["rotator-shop.service"])
    assert "Sockets" not in unit["Service"] and "Requires" not in unit["Unit"]


def test_system_unit_runs_as_the_user_at_boot(tmp_path: Path) -> None:
    rendered = service.render(
        "systemd", config_at(tmp_path / "shop.yaml"), options(system=True, user="ann")
    )
    unit = sections(rendered.files["rotator-shop.service"])
    assert unit["Service"]["User"] == ["ann"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network.target" in unit["Unit"]["After"]
    assert rendered.directory == Path("/etc/systemd/system")
    assert rendered.enable[0] == "systemctl daemon-reload"


def test_start_timeout_covers_adoption_and_the_dependency_chain(tmp_path: Path) -> None:
    # Type=notify: systemd waits for READY=1. Three instances to adopt (3 s each); api
    # starts after db, each gated by start_timeout (30 s) twice (health, then own port).
    config = config_at(tmp_path / "shop.yaml")
    assert service.start_budget(config) == 3 * 3 + 2 * 30 + 2 * 30 + service.START_MARGIN
    unit = sections(service.render("systemd", config, options()).files["rotator-shop.service"])
    assert unit["Service"]["TimeoutStartSec"] == ["139s"]


def test_stop_timeout_covers_drain_and_the_dependency_chain(tmp_path: Path) -> None:
    config = config_at(tmp_path / "shop.yaml")
    # drain 5 s once; db stops after api (which depends on it): 4 + 3; web: 3.
    assert fleet.stop_budget(config) == 5 + 4 + 3 + fleet.STOP_MARGIN
    unit = sections(service.render("systemd", config, options()).files["rotator-shop.service"])
    assert unit["Service"]["TimeoutStopSec"] == ["22s"]


def test_paths_with_spaces_percent_and_dollar_survive_quoting(tmp_path: Path) -> None:
    odd = tmp_path / "my 100% $HOME"
    odd.mkdir()
    config = config_at(odd / "shop.yaml")
    rotator = (str(odd / "bin" / 'rot"ator'),)
    unit = sections(
        service.render("systemd", config, options(rotator=rotator)).files["rotator-shop.service"]
    )
    assert words(unit["Service"]["ExecStart"][0]) == [*rotator, "up", "-c", str(config.path)]
    assert unit["Service"]["WorkingDirectory"] == [str(odd).replace("%", "%%")]


def test_launchd_plist_round_trips(tmp_path: Path) -> None:
    config = config_at(tmp_path / "shop.yaml")
    rendered = service.render("launchd", config, options())
    assert list(rendered.files) == ["com.rotator.shop.plist"]
    plist = plistlib.loads(rendered.files["com.rotator.shop.plist"])
    assert plist["Label"] == "com.rotator.shop"
    assert plist["ProgramArguments"] == [*ROTATOR, "up", "-c", str(config.path)]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["WorkingDirectory"] == str(tmp_path)
    log = "/home/ann/Library/Logs/rotator-shop.log"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == log
    assert plist["ExitTimeOut"] == 22
    assert plist["EnvironmentVariables"] == {"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}
    assert "UserName" not in plist
    assert rendered.directory == Path("/home/ann/Library/LaunchAgents")
    assert rendered.enable == [
        "launchctl bootstrap gui/$(id -u) /home/ann/Library/LaunchAgents/com.rotator.shop.plist"
    ]


def test_launchd_system_daemon(tmp_path: Path) -> None:
    rendered = service.render(
        "launchd", config_at(tmp_path / "shop.yaml"), options(system=True, user="ann")
    )
    plist = plistlib.loads(rendered.files["com.rotator.shop.plist"])
    assert plist["UserName"] == "ann"
    assert plist["StandardOutPath"] == "/Library/Logs/rotator-shop.log"
    assert rendered.directory == Path("/Library/LaunchDaemons")
    assert rendered.enable[0].startswith("sudo launchctl bootstrap system ")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/srv/shop.yaml", "shop"),
        ("/srv/shop/rotator.yaml", "shop"),  # the directory says more than rotator.yaml
        ("/srv/my shop/conf@1.yml", "conf-1"),
    ],
)
def test_default_name(path: str, name: str) -> None:
    assert service.default_name(config_at(Path(path))) == name


def test_rotator_command(tmp_path: Path) -> None:
    script = tmp_path / "rotator"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert service.rotator_command(str(script), "/py") == (str(script),)
    main = str(Path(service.__file__).parent / "__main__.py")  # python -m rotator
    assert service.rotator_command(main, "/venv/bin/python") == (
        "/venv/bin/python",
        "-m",
        "rotator",
    )


def test_the_renderers_stay_stdlib_only() -> None:
    code = "import sys, rotator.service; print(' '.join(sys.modules))"
    loaded = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert not set(loaded.stdout.split()) & {"aiohttp", "httptools", "psutil", "rotator.daemon"}


# -- the command ----------------------------------------------------------------------
def write_config(directory: Path) -> Path:
    path = directory / "shop.yaml"
    path.write_text(CONFIG)
    return path


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "rotator", "-c", str(config), "service", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_dry_run_prints_the_files_and_writes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    out = tmp_path / "units"
    result = run(config, "systemd", "--dry-run", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "# ---- " in result.stdout and "[Service]" in result.stdout
    assert "ListenStream=127.0.0.1:8001" in result.stdout
    assert not out.exists()
    result = run(config, "launchd", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "<key>ProgramArguments</key>" in result.stdout


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run(config, "systemd", "--user", "--system", "--dry-run")
    assert result.returncode == 2
    foreign = "launchd" if sys.platform.startswith("linux") else "systemd"
    result = run(config, foreign)
    assert result.returncode == 2
    assert result.stderr.startswith("rotator: ") and result.stderr.count("\n") == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run(config, "systemd", "-o", str(blocker))
    assert result.returncode == 1
    assert result.stderr.startswith(f"rotator: cannot write {blocker}")
    assert result.stderr.count("\n") == 1


def test_written_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    out = tmp_path / "units"
    result = run(config, "systemd", "-o", str(out), "--name", "shop")
    assert result.returncode == 0, result.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [
        "rotator-shop-api.socket",
        "rotator-shop-db.socket",
        "rotator-shop.service",
    ]
    assert f"copy them to {Path.home() / '.config/systemd/user'}" in result.stdout
    assert "systemctl --user enable --now rotator-shop.service" in result.stdout
    # The command it runs is this interpreter with -m rotator: real, so verify checks it.
    unit = sections((out / "rotator-shop.service").read_bytes())
    assert words(unit["Service"]["ExecStart"][0])[:3] == [PY, "-m", "rotator"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    for scope in (["--user"], ["--system"]):
        check = subprocess.run(
            ["systemd-analyze", *scope, "verify", *map(str, files)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        )
        # verify exits 0 on a mere warning (an unknown key is "ignoring"): read what it says.
        problems = [line for line in check.stderr.splitlines() if "rotator-shop" in line]
        assert check.returncode == 0 and not problems, textwrap.indent(check.stderr, "  ")

"""The state_dir is trusted only when it is ours: a hand-made 0755 one is tightened, one
that another user owns or others may write is refused, a forged state file can neither
hand the daemon a stranger's process nor get one stopped, and the CLI sends no token
that someone else wrote or can read. Real daemons, real processes, the real CLI.

Cases that need a file of another user are run as root only (os.chown to `nobody`)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    PY,
    ROOT,
    alive,
    as_root,
    cli,
    component,
    mode,
    nobody,
    wait_until,
    write_config,
)


def record(pid: int, port: int, marker: str) -> dict[str, Any]:
    import psutil

    created = psutil.Process(pid).create_time()
    return {"pid": pid, "create_time": created, "port": port, "marker": marker, "started": 0}


def state_file(actives: dict[str, dict[str, Any]]) -> str:
    components = {
        name: {
            "active": active,
            "draining": [],
            "definition": None,
            "definition_source": "config",
            "deployed_at": None,
            "previous_definition": None,
            "stopped": False,
        }
        for name, active in actives.items()
    }
    doc = {"version": 1, "daemon_pid": None, "written_at": None, "components": components}
    return json.dumps(doc)


# An HTTP server that answers 200 to everything: it passes any health check.
STRANGER = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


def stranger(port: int, env: dict[str, str], user: int | None = None) -> subprocess.Popen[bytes]:
    # Another user may not reach our interpreter (a pyenv under /root, say): the system's.
    python = "/usr/bin/python3" if user is not None and os.path.exists("/usr/bin/python3") else PY
    proc = subprocess.Popen(
        [python, "-I", "-c", STRANGER, str(port)],
        env=env,
        cwd="/",
        start_new_session=True,
        **({"user": user, "group": user, "extra_groups": []} if user is not None else {}),
    )

    def answers() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    assert wait_until(answers, timeout=10), f"the stranger on port {port} never listened"
    return proc


def test_a_state_dir_made_by_hand_with_0755_is_tightened_and_what_rotator_makes_is_private(
    tmp_path: Path, daemon_factory: Any
) -> None:
    state = tmp_path / "state"
    old_logs = state / "logs" / "web"
    old_logs.mkdir(parents=True)
    (old_logs / "20260101-000000.000-4242.log").write_text("an old instance's output\n")
    os.chmod(state, 0o755)
    config = write_config(tmp_path, {"web": component(), "api": component()})

    daemon = daemon_factory(config)
    assert mode(state) == 0o700
    notices = [line for line in daemon.output().splitlines() if "readable by others" in line]
    assert notices == [
        f"rotator: state_dir {state} was readable by others (mode 0755); it is now 0700"
    ]
    for name in ("admin.token", "state.json", "events.log", "daemon.lock"):
        assert mode(state / name) == 0o600, name
    for name in ("web", "api"):
        pid = daemon.component(name)["active"]["pid"]
        (log,) = (state / "logs" / name).glob(f"*-{pid}.log")
        assert mode(log) == 0o600
    assert mode(state / "logs" / "api") == 0o700  # made by rotator (web's, by hand: left)

    # The CLI sends no token others can read (they may have used it already)...
    os.chmod(state / "admin.token", 0o644)
    refused = cli(config, "restart", "web")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    token = state / "admin.token"
    assert refused.stderr.startswith(f"rotator: admin token {token} is open to others (mode 0644)")
    assert f"chmod 600 {token}, then restart the daemon" in refused.stderr
    status = cli(config, "status")  # needs no token: works, without the private parts
    assert status.returncode == 0, status.stderr
    os.chmod(state / "admin.token", 0o600)
    assert cli(config, "restart", "web").returncode == 0
    if ROOT:  # ...nor one another user wrote
        os.chown(state / "admin.token", nobody(), -1)
        refused = cli(config, "restart", "web")
        assert refused.returncode == 1, refused.stderr
        assert f"is owned by uid {nobody()}" in refused.stderr
        assert "run this command as the user who runs the daemon" in refused.stderr
        os.chown(state / "admin.token", 0, -1)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("dir-of-another-user", marks=as_root),
        "takeover-in-a-dir-writable-by-others",  # its socket would hand us sockets
        "dir-writable-by-others",
        pytest.param("state-file-of-another-user", marks=as_root),
        "state-file-writable-by-others",
    ],
)
def test_a_state_dir_or_state_file_others_could_write_is_refused(tmp_path: Path, case: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = write_config(tmp_path, {"web": component()})
    forged = state / "state.json"
    forged.write_text(state_file({}))
    os.chmod(forged, 0o600)
    if case == "dir-of-another-user":
        os.chown(state, nobody(), -1)
        expected = (
            f"rotator: state_dir {state} is owned by uid {nobody()}",
            f"take this one over with: chown -R {pwd.getpwuid(os.geteuid()).pw_name} {state}",
        )
    elif case in ("dir-writable-by-others", "takeover-in-a-dir-writable-by-others"):
        os.chmod(state, 0o777)
        expected = (
            f"rotator: state_dir {state} is writable by others (mode 0777)",
            f"check its files, then: chmod 700 {state}",
        )
    elif case == "state-file-of-another-user":
        os.chown(forged, nobody(), -1)
        expected = (f"rotator: state file {forged} is owned by uid {nobody()}", "remove it")
    else:
        os.chmod(forged, 0o666)
        expected = (f"rotator: state file {forged} is writable by others (mode 0666)", "remove it")

    result = cli(config, "up", *(["--takeover"] if "takeover" in case else []), timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(expected[0]) and expected[1] in result.stderr
    assert "started pid" not in result.stdout
    assert not (state / "admin.token").exists()  # nothing was written into it


def test_a_forged_state_file_can_neither_hand_over_a_stranger_nor_have_it_stopped(
    tmp_path: Path, daemon_factory: Any
) -> None:
    names = ["plain", "copied", *(["nobody"] if ROOT else [])]
    specs = {name: component(health={"path": "/"}) for name in names}
    config = write_config(tmp_path, specs)
    state = tmp_path / "state"
    scope = hashlib.sha1(str(state.resolve()).encode()).hexdigest()[:10]  # as daemon.py's
    port = {name: spec["ports"][0] for name, spec in specs.items()}
    # Each answers its health check on the port recorded for it, with the true create time:
    # - plain: our user's process, without the instance's marker in its environment;
    # - copied: ours with a marker, but another state_dir's (a copied state_dir, say);
    # - nobody: carries a marker of this state_dir, but runs as another user.
    env = {k: v for k, v in os.environ.items() if k != "ROTATOR_INSTANCE"}
    markers = {
        "plain": f"{scope}:plain:forged000000",
        "copied": "0123456789:copied:elsewhere000",
        "nobody": f"{scope}:nobody:forged000000",
    }
    strangers = {"plain": stranger(port["plain"], env)}
    try:
        strangers["copied"] = stranger(
            port["copied"], {**env, "ROTATOR_INSTANCE": markers["copied"]}
        )
        if ROOT:
            strangers["nobody"] = stranger(
                port["nobody"], {**env, "ROTATOR_INSTANCE": markers["nobody"]}, user=nobody()
            )
        state.mkdir(mode=0o700)
        (state / "state.json").write_text(
            state_file({n: record(strangers[n].pid, port[n], markers[n]) for n in names})
        )
        os.chmod(state / "state.json", 0o600)

        daemon = daemon_factory(config)
        out = daemon.output()
        reasons = {
            "plain": "its environment does not carry the ROTATOR_INSTANCE marker recorded for it",
            "copied": "its marker is not one of this state_dir's",
            "nobody": f"it runs as uid {nobody()}, not as rotator's user",
        }
        for name in names:
            pid = strangers[name].pid
            assert f"{name}: not adopting pid {pid}: {reasons[name]}" in out, out
            c = daemon.component(name)
            assert c["state"] == "running" and c["active"]["adopted"] is False
            assert c["active"]["pid"] != pid and c["active"]["port"] != port[name]
        down = cli(config, "down")  # stops every instance it owns, and only those
        assert down.returncode == 0, down.stderr
        assert daemon.proc.wait(30) == 0
        assert all(alive(s.pid) for s in strangers.values())  # not ours to stop
    finally:
        for s in strangers.values():
            s.kill()
            s.wait()

"""Issue 20's config features through the real CLI and daemon: tcp and exec health
checks, env files (and `deploy --env-file`), and log rotation of running instances."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil

from rotator.config import Address, ComponentSpec, Endpoint, HealthSpec
from rotator.health import HealthCheck
from rotator.spawner import Spawner
from tests.conftest import DEMO, PY, cli, component, free_ports, wait_until, write_config
from tests.integration.test_logs import Follower

NEVER_HEALTHY = f"{DEMO} --never-healthy"  # /health answers 503: an HTTP check fails
ECHO_ENV = 'sh -c \'echo "GREETING=$GREETING WHO=$WHO"; exec "$0" "$@"\' ' + DEMO


def active_pid(daemon: Any, name: str = "web") -> int:
    return int(daemon.component(name)["active"]["pid"])


def log_texts(config: Path, *args: str) -> list[str]:
    result = cli(config, "logs", "web", "--no-prefix", *args)
    assert result.returncode == 0, result
    return result.stdout.splitlines()


# -- health checks that are not HTTP GET ---------------------------------------------------


def test_a_tcp_check_passes_on_a_connect_alone(tmp_path: Path, daemon_factory: Any) -> None:
    web = component(command=NEVER_HEALTHY, health={"tcp": True})
    daemon = daemon_factory(write_config(tmp_path, {"web": web}))
    first = active_pid(daemon)
    assert cli(daemon.config, "restart", "web").returncode == 0
    assert active_pid(daemon) != first
    assert daemon.component("web")["state"] == "running"


def test_an_exec_check_runs_in_the_components_cwd_and_env(
    tmp_path: Path, daemon_factory: Any
) -> None:
    home = tmp_path / "app"
    home.mkdir()
    (home / "ready").write_text("")
    # Passes only with the component's cwd, its env (from the env file too) and the
    # instance's address: as placeholders, and as PORT/HOST.
    script = (
        "import os, socket, sys; host, port = sys.argv[1], int(sys.argv[2]);"
        " assert os.environ['PORT'] == str(port) and os.environ['HOST'] == host;"
        " assert os.environ['WHO'] == 'file', os.environ.get('WHO');"
        " os.path.exists('ready') or sys.exit('not ready: no ready file in ' + os.getcwd());"
        " socket.create_connection((host, port), 1).close()"
    )
    (tmp_path / ".env").write_text("WHO=file\n")
    web = component(
        command=NEVER_HEALTHY,
        cwd="app",
        env_file=".env",
        # start_timeout: the failing restart below gives up after it.
        health={
            "exec": [PY, "-c", script, "{host}", "{port}"],
            "timeout": "3s",
            "start_timeout": "4s",
        },
    )
    config = write_config(tmp_path, {"web": web})
    daemon = daemon_factory(config)
    first = active_pid(daemon)
    assert cli(config, "restart", "web").returncode == 0
    second = active_pid(daemon)
    assert second != first

    # A failing check gates a restart; its last line of output is the reason.
    (home / "ready").unlink()
    failed = cli(config, "restart", "web")
    assert failed.returncode == 1, failed
    assert "exited with code 1: not ready: no ready file in " + str(home) in failed.stdout
    assert active_pid(daemon) == second  # the old instance serves on


def exec_check(
    tmp_path: Path, words: tuple[str, ...], timeout: float = 5, cwd: Path | None = None
) -> Callable[[Spawner], HealthCheck]:
    spec = ComponentSpec(
        "web",
        Address("127.0.0.1", 1),
        (2,),
        ("true",),
        cwd or tmp_path,
        env=MappingProxyType({"WHO": "env"}),
        health=HealthSpec(exec=words, timeout=timeout),
    )
    output = tmp_path / "health"
    return lambda spawner: HealthCheck(spec.health, spec, spawn=spawner.spawn, output_dir=output)


async def probe_with(check: Callable[[Spawner], HealthCheck]) -> str | None:
    spawner = Spawner()
    await spawner.start()
    try:
        return await check(spawner).probe(Endpoint("127.0.0.1", 2))
    finally:
        await spawner.close()


def test_an_exec_check_past_its_timeout_is_killed_with_what_it_started(tmp_path: Path) -> None:
    marker = f"rotator-test-{uuid.uuid4().hex}"
    sleeper = shlex.join([PY, "-c", "import time; time.sleep(30)", marker])
    words = ("sh", "-c", f"{sleeper} & {sleeper}")
    check = exec_check(tmp_path, words, timeout=0.5)

    async def cancelled() -> None:
        # Cancelled midway (the instance it gated exited, say): killed all the same.
        task = asyncio.ensure_future(probe_with(exec_check(tmp_path, words, timeout=30)))
        while len(_running(marker)) < 2:
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(probe_with(check)) == "exec sh did not finish within 500ms"
    assert wait_until(lambda: not _running(marker), timeout=5), _running(marker)
    asyncio.run(asyncio.wait_for(cancelled(), 10))
    assert wait_until(lambda: not _running(marker), timeout=5), _running(marker)
    assert os.listdir(tmp_path / "health") == []  # each run's output file goes


def test_exec_check_problems_are_described(tmp_path: Path) -> None:
    def probe(*words: str, cwd: Path | None = None) -> str | None:
        return asyncio.run(probe_with(exec_check(tmp_path, words, cwd=cwd)))

    expected = f"env:2:127.0.0.1:{tmp_path}"
    assert probe("sh", "-c", f'test "$WHO:$PORT:$HOST:$PWD" = {expected}') is None
    assert probe("sh", "-c", "echo first; echo; echo '  last words  '; echo; exit 4") == (
        "exec sh exited with code 4: last words"
    )
    assert probe("sh", "-c", "exit 1") == "exec sh exited with code 1"
    assert probe("no-such-command-here") == "exec: command not found: no-such-command-here"
    gone = tmp_path / "gone"
    assert probe("true", cwd=gone) == f"working directory not found: {gone}"


def test_a_tcp_check_against_nothing_is_described() -> None:
    spec = HealthSpec(tcp=True, timeout=1)
    port = free_ports(1)[0]
    assert asyncio.run(HealthCheck(spec).probe(Endpoint("127.0.0.1", port))) == (
        f"connecting to port {port}: connection refused"
    )
    missing = "/nonexistent/web.sock"
    assert asyncio.run(HealthCheck(spec).probe(Endpoint("127.0.0.1", path=missing))) == (
        f"no socket at {missing}"
    )


def test_a_tcp_check_connects_to_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "web.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        assert asyncio.run(HealthCheck(HealthSpec(tcp=True)).probe(Endpoint("", path=path))) is None
        accepted, _ = server.accept()
        accepted.close()
    assert asyncio.run(HealthCheck(HealthSpec(tcp=True)).probe(Endpoint("", path=path))) == (
        f"connecting to {path}: connection refused"
    )


def _running(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if marker in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


# -- env files ----------------------------------------------------------------------------


def test_env_files_reach_the_instance_and_deploy_takes_more(
    tmp_path: Path, daemon_factory: Any
) -> None:
    (tmp_path / ".env").write_text("# shared\nGREETING='hello from .env'\nWHO=file\n")
    (tmp_path / ".env.local").write_text("WHO=local\n")
    web = component(command=ECHO_ENV, env_file=[".env", {"path": ".env.local", "required": False}])
    config = write_config(tmp_path, {"web": web})
    daemon = daemon_factory(config)
    assert "GREETING=hello from .env WHO=local" in log_texts(config)

    # deploy --env-file: read where the user is; later files, then --env, win.
    (tmp_path / "a.env").write_text('GREETING="from a"\nWHO=a\n')
    (tmp_path / "b.env").write_text("export WHO=b\n")
    deployed = cli(
        config,
        "deploy",
        "web",
        "--env-file",
        str(tmp_path / "a.env"),
        "--env-file",
        str(tmp_path / "b.env"),
    )
    assert deployed.returncode == 0, deployed
    assert log_texts(config, "-n", "2")[0] == "GREETING=from a WHO=b"
    again = cli(config, "deploy", "web", "--env-file", str(tmp_path / "a.env"), "--env", "WHO=cli")
    assert again.returncode == 0, again
    assert log_texts(config, "-n", "2")[0] == "GREETING=from a WHO=cli"

    # Bad files: a usage error (exit 2), one line naming the file (and its line).
    (tmp_path / "bad.env").write_text("OK=1\nNOT VALID\n")
    for args, message in (
        (["--env-file", str(tmp_path / "bad.env")], f"{tmp_path / 'bad.env'}:2: 'NOT VALID'"),
        (
            ["--env-file", str(tmp_path / "none.env")],
            f"--env-file {tmp_path / 'none.env'}: no such file",
        ),
    ):
        result = cli(config, "deploy", "web", *args)
        assert result.returncode == 2, result
        assert result.stderr.startswith("rotator: ") and result.stderr.count("\n") == 1, result
        assert message in result.stderr
    assert daemon.component("web")["state"] == "running"


def test_check_names_the_env_files_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=1\nB='unclosed\n")
    config = write_config(tmp_path, {"web": component(env_file=".env")})
    result = cli(config, "check")
    assert result.returncode == 2
    assert f"{tmp_path / '.env'}:2: components.web.env_file: the ' that opens this value" in (
        result.stderr
    )
    (tmp_path / ".env").unlink()
    missing = cli(config, "check")
    assert missing.returncode == 2
    assert re.search(
        r"rotator.yaml:\d+: components.web.env_file: .* does not exist", missing.stderr
    )


def test_check_refuses_a_pool_too_small_for_the_replicas(tmp_path: Path) -> None:
    config = tmp_path / "rotator.yaml"
    config.write_text(
        "defaults:\n"
        "  replicas: 3\n"
        "components:\n"
        "  web:\n"
        "    listen: 127.0.0.1:8001\n"
        "    ports: 18001-18003\n"
        "    command: run --port {port} --slot {replica}\n"
    )
    result = cli(config, "check")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"{config}:6: components.web.ports: 3 ports for replicas: 3; a rotation needs"
        " replicas + 1 = 4 (one new instance starts before an old one stops)\n"
    )
    config.write_text(config.read_text().replace("18003", "18004"))
    fits = cli(config, "check")
    assert (fits.returncode, fits.stderr) == (0, ""), fits


# -- log rotation -------------------------------------------------------------------------

# An instance that writes numbered lines steadily (about 180 KB/s) besides serving.
CHATTY = """\
import runpy, sys, threading, time

def chatter():
    n = 0
    while True:
        print(f"n={n:07d} " + "x" * 80, flush=True)
        n += 1
        if n % 20 == 0:
            time.sleep(0.01)

threading.Thread(target=chatter, daemon=True).start()
sys.argv = ["rotator.demo", *sys.argv[1:]]
runpy.run_module("rotator.demo", run_name="__main__", alter_sys=True)
"""


def numbers(texts: list[str]) -> list[int]:
    return [int(text[2:9]) for text in texts if text.startswith("n=")]


def test_a_running_instances_log_is_rotated_and_read_across_rotations(
    tmp_path: Path, daemon_factory: Any
) -> None:
    (tmp_path / "chatty.py").write_text(CHATTY)
    command = f"{PY} chatty.py --port {{port}} --name {{name}}"
    web = component(command=command, logs={"max_size": "64KiB", "keep": 2})
    config = write_config(tmp_path, {"web": web})
    daemon = daemon_factory(config)
    follower = Follower(config, "web", "-n", "0", "--no-prefix")
    try:
        follow_and_check(tmp_path, config, daemon, follower)
    finally:
        follower.kill()


def follow_and_check(tmp_path: Path, config: Path, daemon: Any, follower: Follower) -> None:
    pid = active_pid(daemon)
    directory = tmp_path / "state" / "logs" / "web"
    [own] = list(directory.glob("*.log"))
    rotated = [own.with_name(f"{own.name}.{n}") for n in (1, 2, 3)]
    assert wait_until(lambda: rotated[1].exists(), timeout=20), os.listdir(directory)
    assert wait_until(lambda: "rotated the log of pid" in daemon.output(), timeout=5)
    assert not rotated[2].exists()  # keep: 2
    assert rotated[1].stat().st_size >= 64 * 1024 and rotated[0].stat().st_size >= 64 * 1024

    # `rotator logs` reads the copies before the file: one run of numbers across them.
    history = numbers(log_texts(config, "-n", "5000"))
    assert len(history) > 1500 and history == sorted(set(history))
    in_file = numbers(own.read_text().splitlines())
    assert in_file and history[0] < in_file[0]  # began in a copy
    assert history[-1] - history[0] + 1 - len(history) <= 2  # at most a line per rotation lost

    # The follower saw every line across the rotations, once each, in order.
    assert wait_until(lambda: len(numbers(follower.lines)) > 2000, timeout=10)
    followed = numbers(follower.lines)
    assert followed == sorted(set(followed))
    rotations = daemon.output().count("rotated the log of pid")
    assert followed[-1] - followed[0] + 1 - len(followed) <= rotations
    # Through all this, one instance: it never noticed.
    assert active_pid(daemon) == pid


def test_an_exec_check_gates_a_deploy_with_the_deployed_env_and_cwd(
    tmp_path: Path, daemon_factory: Any
) -> None:
    # As an exec probe runs in the new container: the check sees the new definition.
    (tmp_path / "v2").mkdir()
    check = ["sh", "-c", 'test "$READY" = yes || { echo "READY=$READY in $PWD"; exit 1; }']
    web = component(env={"READY": "yes"}, health={"exec": check, "start_timeout": "2s"})
    config = write_config(tmp_path, {"web": web})
    daemon = daemon_factory(config)
    first = active_pid(daemon)
    refused = cli(config, "deploy", "web", "--env", "READY=no", "--cwd", str(tmp_path / "v2"))
    assert refused.returncode == 1, refused
    assert f"exited with code 1: READY=no in {tmp_path / 'v2'}" in refused.stdout
    assert active_pid(daemon) == first
    assert cli(config, "deploy", "web", "--env", "OTHER=1").returncode == 0
    assert active_pid(daemon) != first

"""`rotator logs`: a component's output across its instances, each line tagged with the pid
that wrote it; following through rotations; retention; adoption. Real daemon, real CLI."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rotator.configfile import load
from rotator.daemon import Daemon
from tests.conftest import PY, alive, cli, component, wait_until, write_config

TAGGED = re.compile(r"^\[(\d+)\] (.*)$")


def tagged(stdout: str) -> list[tuple[int, str]]:
    lines = []
    for line in stdout.splitlines():
        match = TAGGED.match(line)
        assert match, f"untagged line {line!r}"
        lines.append((int(match.group(1)), match.group(2)))
    return lines


def logs(config: Path, *args: str) -> list[tuple[int, str]]:
    result = cli(config, "logs", *args)
    assert result.returncode == 0 and result.stderr == "", result
    return tagged(result.stdout)


def active_pid(daemon: Any, name: str = "web") -> int:
    return int(daemon.component(name)["active"]["pid"])


def log_files(tmp_path: Path, name: str = "web") -> list[str]:
    return sorted(p.name for p in (tmp_path / "state" / "logs" / name).glob("*.log"))


def one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result
    assert result.stderr.startswith("rotator: ") and result.stderr.count("\n") == 1, result
    assert text in result.stderr and "Traceback" not in result.stderr


def admin_get(daemon: Any, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(daemon.admin + path)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


class Follower:
    """`rotator logs -f` as a subprocess, its output collected as it comes."""

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "rotator", "-c", str(config), "logs", "-f", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Ctrl-C must reach it even when the suite itself runs with SIGINT ignored (a
            # background job of a non-interactive shell: its children inherit that).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, text: str, timeout: float = 15) -> bool:
        return wait_until(lambda: text in self.lines, timeout=timeout)

    def end(self, timeout: float = 15) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def followers() -> Any:
    started: list[Follower] = []

    def start(config: Path, *args: str) -> Follower:
        started.append(Follower(config, *args))
        return started[-1]

    yield start
    for follower in started:
        follower.kill()


def test_each_line_carries_the_pid_of_the_instance_that_wrote_it(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    first = active_pid(daemon)
    assert cli(config, "restart", "web").returncode == 0  # returns once `first` is stopped
    second = active_pid(daemon)
    assert [n.rsplit("-", 1)[1] for n in log_files(tmp_path)] == [f"{first}.log", f"{second}.log"]

    lines = logs(config, "web", "-n", "100")
    assert [pid for pid, _ in lines] == [first] * 3 + [second] * 2  # in start order
    for pid, text in lines:
        assert text.startswith("==== rotator: web on port ") or f"pid {pid} " in text
    assert lines[1][1].startswith(f"demo web pid {first} listening on 127.0.0.1:")
    assert lines[2] == (first, f"demo web pid {first} stopping")

    assert logs(config, "web", "-n", "2") == lines[-2:]
    assert logs(config, "web", "-n", "0") == []
    assert logs(config, "web", "--instance", str(first)) == lines[:3]
    plain = cli(config, "logs", "web", "--no-prefix", "--instance", str(second))
    assert plain.returncode == 0 and plain.stdout.splitlines() == [t for _, t in lines[3:]]

    one_line_error(cli(config, "logs", "nope"), 2, "unknown component 'nope'")
    gone = cli(config, "logs", "web", "--instance", "1")
    one_line_error(gone, 2, f"no log of an instance with pid 1 (logs kept for: {first}, {second})")

    # What instances print may be secret: this GET, unlike status, needs the token.
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    assert admin_get(daemon, "/v1/components/web/logs")[0] == 401
    assert admin_get(daemon, "/v1/components/web/logs", token="wrong")[0] == 401
    assert admin_get(daemon, "/v1/components/web/logs", token)[0] == 200
    assert admin_get(daemon, "/v1/status")[0] == 200
    code, body = admin_get(daemon, "/v1/components/nope/logs", token)
    assert code == 404 and "no component named 'nope'" in body["error"]
    for bad in ("n=-1", "n=many", "n=10001", "instance=x"):
        code, body = admin_get(daemon, f"/v1/components/web/logs?{bad}", token)
        assert code == 400 and "query parameter" in body["error"], bad
    assert daemon.proc.poll() is None


def test_follow_goes_through_a_rotation_and_ends_quietly(
    tmp_path: Path, daemon_factory: Any, followers: Any
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    first = active_pid(daemon)
    interrupted = followers(config, "web", "-n", "1")
    to_the_end = followers(config, "web", "-n", "0", "--no-prefix")
    assert wait_until(lambda: len(interrupted.lines) == 1, timeout=15)
    assert interrupted.lines[0].startswith(f"[{first}] demo web pid {first} listening on ")

    assert cli(config, "restart", "web").returncode == 0
    second = active_pid(daemon)
    assert interrupted.saw(f"[{first}] demo web pid {first} stopping")
    news = f"[{second}] demo web pid {second} listening on "
    assert wait_until(lambda: any(x.startswith(news) for x in interrupted.lines), timeout=15)
    # Ctrl-C is the way to stop following: exit 0, nothing on stderr.
    interrupted.proc.send_signal(signal.SIGINT)
    assert interrupted.end() == (0, "")

    # The daemon shutting down ends every follow, after its instances' last words.
    assert cli(config, "down").returncode == 0
    code, err = to_the_end.end()
    assert (code, err) == (0, "rotator: the daemon is shutting down\n")
    assert f"demo web pid {first} stopping" in to_the_end.lines
    assert to_the_end.lines[-1] == f"demo web pid {second} stopping"


def test_retention_keeps_ten_files_and_never_a_running_instances(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    first = active_pid(daemon)
    [own] = log_files(tmp_path)
    # Twelve files of earlier instances, all newer than the running one's.
    began = datetime.datetime.strptime(own.rsplit("-", 1)[0], "%Y%m%d-%H%M%S.%f")
    directory = tmp_path / "state" / "logs" / "web"
    for i in range(1, 13):
        stamp = (began + datetime.timedelta(milliseconds=i)).strftime("%Y%m%d-%H%M%S.%f")[:-3]
        (directory / f"{stamp}-{900000 + i}.log").write_text(f"old {i}\n")

    assert cli(config, "restart", "web").returncode == 0
    second = active_pid(daemon)
    files = log_files(tmp_path)
    # The newest ten (the new instance and nine old ones), plus the one that was serving.
    assert len(files) == 11 and files[0] == own and files[-1].endswith(f"-{second}.log")
    assert [f.rsplit("-", 1)[1] for f in files[1:10]] == [f"{900000 + i}.log" for i in range(4, 13)]

    assert cli(config, "restart", "web").returncode == 0
    files = log_files(tmp_path)
    assert len(files) == 10 and own not in files and files[-2].endswith(f"-{second}.log")
    assert logs(config, "web", "-n", "1000")[0] == (900005, "old 5")
    assert not alive(first)


def test_an_adopted_instance_keeps_its_log_file(tmp_path: Path, daemon_factory: Any) -> None:
    config = write_config(tmp_path, {"web": component()})
    first_daemon = daemon_factory(config)
    adopted = active_pid(first_daemon)
    first_daemon.proc.kill()  # SIGKILL the daemon alone: its instance lives on
    first_daemon.proc.wait(10)
    first_daemon.log = first_daemon.log.rename(tmp_path / "daemon-first.out")

    second_daemon = daemon_factory(config)
    active = second_daemon.component("web")["active"]
    assert active["pid"] == adopted and active["adopted"] is True, second_daemon.output()
    history = logs(config, "web", "--instance", str(adopted))
    assert history[1][1].startswith(f"demo web pid {adopted} listening on ")

    # Its crash report quotes the file the earlier daemon opened for it.
    os.kill(adopted, signal.SIGKILL)
    replaced = wait_until(
        lambda: active_pid_or_none(second_daemon) not in (None, adopted), timeout=15
    )
    out = second_daemon.output()
    assert replaced and f"    | demo web pid {adopted} listening on " in out, out
    replacement = active_pid(second_daemon)
    lines = logs(config, "web")
    # (A replacement that failed to start in between, say on a port taken meanwhile by
    # another process, would have its own lines between these.)
    pids = [pid for pid, _ in lines]
    assert pids[:2] == [adopted] * 2 and pids[-2:] == [replacement] * 2, lines


def active_pid_or_none(daemon: Any) -> int | None:
    active = daemon.component("web")["active"]
    return None if active is None else int(active["pid"])


def test_a_follow_ends_when_its_client_leaves_or_the_daemon_stops(tmp_path: Path) -> None:
    """In-process daemon, to see its tasks: a follower whose client left must not poll on."""
    config = load(write_config(tmp_path, {"web": component()}))

    def handlers() -> int:
        """The admin API's connection tasks: one lives as long as its request's handler."""
        names = (getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks())
        return sum(name == "RequestHandler.start" for name in names)

    async def scenario() -> None:
        shutdown = asyncio.Event()
        daemon = Daemon(config, out=lambda line: None)
        serving = asyncio.ensure_future(daemon.serve(shutdown))
        deadline = time.monotonic() + 20
        while not daemon.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert daemon.ready
        active = daemon.components["web"].active
        assert active is not None
        url = f"http://{config.admin.listen}/v1/components/web/logs?follow=1&n=1"
        auth = {"Authorization": f"Bearer {config.token_path.read_text().strip()}"}
        async with aiohttp.ClientSession() as session:
            leaving = await session.get(url, headers=auth)
            assert leaving.status == 200
            assert b"listening on" in await leaving.content.readline()
            staying = await session.get(url, headers=auth)
            assert staying.status == 200
            assert handlers() == 2
            leaving.close()  # the client leaves while nothing is being written
            for _ in range(50):
                if handlers() == 1:
                    break
                await asyncio.sleep(0.1)
            assert handlers() == 1

            began = time.monotonic()
            shutdown.set()
            await asyncio.wait_for(serving, 30)
            assert time.monotonic() - began < 15  # not aiohttp's 60 s wait for handlers
            rest = [json.loads(line) for line in (await staying.read()).splitlines()]
            assert rest[1:] == [
                {"pid": active.pid, "line": f"demo web pid {active.pid} stopping"},
                {"end": "the daemon is shutting down"},
            ]

    asyncio.run(scenario())

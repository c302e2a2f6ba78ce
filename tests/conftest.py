"""Shared fixtures: free ports, config files, a real daemon, the real CLI, and a load generator."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import pwd
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from rotator import cgroups

PY = sys.executable
DEMO = f"{PY} -m rotator.demo --port {{port}} --name {{name}}"


# Below the ephemeral ranges (Linux 32768-60999, macOS 49152-65535): a pool
# port that the kernel also hands out as a client port can carry a TIME_WAIT
# that no SO_REUSEADDR bind gets past, which would make tests flaky.
# ROTATOR_TEST_PORTS=LO-HI moves the range (to share a machine); ports are handed
# out in turn and recycled after each test, so a few hundred are enough.


def _port_range() -> tuple[int, int]:
    raw = os.environ.get("ROTATOR_TEST_PORTS", "20000-32000")
    lo, sep, hi = raw.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and 1024 <= int(lo) < int(hi) <= 65535):
        raise pytest.UsageError(f"ROTATOR_TEST_PORTS={raw!r}: expected LO-HI, e.g. 20000-20400")
    return int(lo), int(hi)


_PORT_RANGE = _port_range()
_handed_out: set[int] = set()  # during the current test
_next_port = random.randint(*_PORT_RANGE)


def free_ports(n: int) -> list[int]:
    """n distinct ports of the test range that nothing holds right now (a port in
    TIME_WAIT fails the plain bind, so it rests until a later pass)."""
    global _next_port
    lo, hi = _PORT_RANGE
    ports: list[int] = []
    tried = 0
    while len(ports) < n:
        if tried > hi - lo:
            raise RuntimeError(
                f"no {n} free ports left in {lo}-{hi} (ROTATOR_TEST_PORTS): widen the range"
            )
        port, tried = _next_port, tried + 1
        _next_port = lo if port >= hi else port + 1
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        ports.append(port)
    return ports


@pytest.fixture(autouse=True)
def _recycle_ports() -> Iterator[None]:
    """A test's ports go back to the range when it ends (its processes are gone by then)."""
    yield
    _handed_out.clear()


# Files given to another user (the trust tests): possible only as root.
ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="giving a file to another user needs root")


def nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def component(pool: int = 4, command: str = DEMO, **extra: Any) -> dict[str, Any]:
    ports = free_ports(pool + 1)
    return {"listen": f"127.0.0.1:{ports[0]}", "ports": ports[1:], "command": command, **extra}


def write_config(directory: Path, components: dict[str, dict[str, Any]], **top: Any) -> Path:
    config = {
        "admin": {"listen": f"127.0.0.1:{free_ports(1)[0]}"},
        "state_dir": "state",
        "defaults": {
            "health": {"interval": "200ms", "timeout": "1s", "start_timeout": "10s"},
            "drain_timeout": "5s",
            "stop_timeout": "3s",
        },
        "components": components,
        **top,
    }
    path = directory / "rotator.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "rotator", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def cli_started(config: Path, *args: str) -> asyncio.subprocess.Process:
    """The real CLI, started from a test's event loop; `await proc.communicate()` ends it."""
    return await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "rotator",
        "-c",
        str(config),
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# `python -m rotator ARGS...` after setting RLIMIT_NOFILE (soft, hard; -1: as is) and,
# with the loop "asyncio", hiding uvloop: argv is SOFT HARD LOOP ARGS...
_LIMITED = """
import resource, runpy, sys
soft, hard, loop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if soft >= 0:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
if loop == "asyncio":
    sys.modules["uvloop"] = None  # import uvloop now raises ImportError
sys.argv = ["rotator", *sys.argv[4:]]
runpy.run_module("rotator", run_name="__main__", alter_sys=True)
"""


class RunningDaemon:
    """`rotator up` as a real subprocess; `fd_limit` (soft, hard) starts it with that
    RLIMIT_NOFILE, `event_loop="asyncio"` without uvloop."""

    def __init__(
        self,
        config: Path,
        *args: str,
        log_name: str = "daemon.out",
        fd_limit: tuple[int, int] | None = None,
        event_loop: str | None = None,
    ) -> None:
        self.config = config
        self.data = yaml.safe_load(config.read_text())
        self.admin = f"http://{self.data['admin']['listen']}"
        self.log = config.parent / log_name
        argv = [PY, "-m", "rotator"]
        if fd_limit is not None or event_loop is not None:
            soft, hard = fd_limit or (-1, -1)
            argv = [PY, "-c", _LIMITED, str(soft), str(hard), event_loop or "default"]
        with self.log.open("wb") as out:  # the daemon writes through its own descriptor
            self.proc = subprocess.Popen(
                [*argv, "up", "-c", str(config), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids_seen: set[int] = set()

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.admin + "/v1/status", timeout=5) as resp:
            status: dict[str, Any] = json.load(resp)
        for c in status["components"]:
            if c["active"]:
                self.pids_seen.add(c["active"]["pid"])
            self.pids_seen.update(i["pid"] for i in c.get("instances", []))
            self.pids_seen.update(i["pid"] for i in (c.get("canary") or {}).get("instances", []))
            self.pids_seen.update(d["pid"] for d in c["draining"])
        return status

    def component(self, name: str) -> dict[str, Any]:
        return next(c for c in self.status()["components"] if c["name"] == name)

    def wait_running(self, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                status = self.status()
                if status["daemon"]["ready"]:
                    return status
            time.sleep(0.05)
        raise AssertionError(f"daemon not running after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def url(self, name: str, path: str = "/") -> str:
        return f"http://{self.data['components'][name]['listen']}{path}"

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill_everything(self) -> None:
        """Test cleanup: nothing this daemon started may outlive the test."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.pids_seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        """The instances' cgroups a killed daemon left (a live one removes its own)."""
        parent = cgroups.parent()
        if parent is None:
            return
        state_dir = (self.config.parent / self.data.get("state_dir", ".rotator")).resolve()
        scope = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
        for cgroup in parent.glob(cgroups.name_of(f"{scope}:*")):
            cgroups.kill(cgroup)
            wait_until(lambda cgroup=cgroup: not cgroups.members(cgroup), timeout=5)
            cgroups.remove(cgroup)


@pytest.fixture
def daemon_factory() -> Iterator[Any]:
    started: list[RunningDaemon] = []

    def start(
        config: Path, wait: bool = True, args: tuple[str, ...] = (), **options: Any
    ) -> RunningDaemon:
        d = RunningDaemon(config, *args, **options)
        started.append(d)
        if wait:
            d.wait_running()
        return d

    yield start
    for d in started:
        d.stop()
        d.kill_everything()
        print(f"---- daemon output ({d.config}):\n{d.output()}")  # shown when the test failed


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until(predicate: Any, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class LoadReport:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    longest_gap: float = 0.0
    pids: collections.Counter[int] = field(default_factory=collections.Counter)
    samples: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


class Load:
    """Concurrent clients hammering a URL from a background thread until stopped:
    half keep their connections alive, half open a new one per request."""

    def __init__(self, url: str, clients: int = 16) -> None:
        self.url = url
        self.clients = clients
        self.report = LoadReport()
        self._stop = threading.Event()
        self._last_ok = 0.0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.report.ok < self.clients and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        keep = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        # aiohttp (3.10+) silently sends a GET again when a kept connection turns out
        # closed: exactly the failure these tests must see. (No public switch exists.)
        keep._retry_connection = False
        fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self._last_ok = time.monotonic()
        async with keep, fresh:
            await asyncio.gather(
                *(self._client(keep if i % 2 == 0 else fresh) for i in range(self.clients))
            )

    async def _client(self, session: aiohttp.ClientSession) -> None:
        report = self.report
        while not self._stop.is_set():
            try:
                async with session.get(self.url) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        report.failures[f"status {resp.status}"] += 1
                        report.samples.append(body[:200].decode(errors="replace"))
                        continue
                    report.pids[int(resp.headers.get("X-Instance-Pid", 0))] += 1
            except Exception as exc:  # every kind of failure is what we count
                report.failures[type(exc).__name__] += 1
                report.samples.append(repr(exc)[:200])
                continue
            now = time.monotonic()
            report.longest_gap = max(report.longest_gap, now - self._last_ok)
            self._last_ok = now
            report.ok += 1


# -- Prometheus exposition, parsed ----------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))

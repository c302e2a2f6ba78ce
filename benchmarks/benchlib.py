"""Shared pieces of the benchmarks: ports, processes and their cleanup, wrk, nginx, HAProxy,
rotator.

Everything runs on 127.0.0.1 with ports in 20000-32000 (below Linux's ephemeral
range, so no client socket can hold them; ROTATOR_BENCH_PORTS=LO-HI moves the range,
to share a machine). Every process is started in its own
session and tagged through an environment variable; `Processes` stops them all
on the way out, also on Ctrl-C, SIGTERM or an error, and sweeps by tag for
anything that escaped (rotator's instances are rotator's children, nginx's
workers nginx's, and all of them inherit the tag).
"""

from __future__ import annotations

import contextlib
import grp
import importlib.metadata
import json
import os
import pwd
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable
HOST = "127.0.0.1"
PORTS_ENV = "ROTATOR_BENCH_PORTS"
TAG_ENV = "ROTATOR_BENCH_TAG"  # set on every process a benchmark starts
RUN_ENV = "ROTATOR_BENCH_RUN"  # set by benchmarks/run on each benchmark it starts

_handed_out: set[int] = set()


# -- ports --------------------------------------------------------------------------
def port_range(raw: str) -> tuple[int, int]:
    lo, sep, hi = raw.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and 1024 <= int(lo) < int(hi) <= 65535):
        raise SystemExit(f"{PORTS_ENV}={raw!r}: expected LO-HI, e.g. 20000-32000")
    return int(lo), int(hi)


PORT_RANGE = port_range(os.environ.get(PORTS_ENV, "20000-32000"))


def free_ports(n: int) -> list[int]:
    """n distinct ports in PORT_RANGE that nothing holds right now."""
    ports: list[int] = []
    for _ in range(10_000):
        if len(ports) == n:
            return ports
        port = random.randint(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        ports.append(port)
    raise RuntimeError(f"could not find {n} free ports in {PORT_RANGE}")


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until GET url answers 2xx/3xx (or raise, naming the url)."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError), opener.open(url, timeout=1) as resp:
            if 200 <= resp.status < 400:
                return
        time.sleep(0.025)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s")


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return json.load(resp)


# -- processes ----------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that every `finally` runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def handle_sigterm() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


class Processes:
    """Every process a benchmark starts; all stopped (process groups) on exit."""

    def __init__(self, workdir: Path, tag: str | None = None) -> None:
        self.workdir = workdir
        self.tag = tag or uuid.uuid4().hex
        self.env = {**os.environ, TAG_ENV: self.tag}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def start(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start argv in a session of its own, output appended to `log`."""
        out = log.open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                cwd=log.parent,
            )
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
    ) -> bool:
        """Signal the process group, wait, SIGKILL it if needed; True if that was needed."""
        forced = False
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                forced = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # The group may outlive its leader (nginx workers, children of a child).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)
        return forced

    def cleanup(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=15)
        sweep(TAG_ENV, self.tag)


def sweep(variable: str, value: str) -> list[int]:
    """SIGKILL every process (other than this one) whose environment has variable=value."""
    killed: list[int] = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(variable) == value:
                proc.kill()
                killed.append(proc.pid)
    return killed


# -- wrk ------------------------------------------------------------------------------
# OPERATOR: a restart command (`rotator restart`, `nginx -s reload`) runs in a session of
# its own, as from an operator's terminal. On Linux, with autogroup scheduling (most
# distributions' default), each session shares the CPU equally with the others: in the
# load generator's session, the command's CPU would be taken from the clients' share.
WRK = shutil.which("wrk")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    cpu_seconds: float = 0.0  # wrk's own, user + system

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors: dict[str, int] = {}
    sock = re.search(r"Socket errors: (.*)", out)
    if sock:
        for kind, n in re.findall(r"(\w+) (\d+)", sock.group(1)):
            if int(n):
                errors[kind] = int(n)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        p50_ms=_ms(p50.group(1)) if p50 else None,
        p99_ms=_ms(p99.group(1)) if p99 else None,
        socket_errors=errors,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
    )


def wrk(
    url: str, *, connections: int, duration: float, threads: int = 1, timeout: float = 2.0
) -> WrkResult:
    """`timeout`: wrk's own (`--timeout`, 2 s by default); a slower answer counts as a
    timeout error and is left out of the latency figures."""
    if WRK is None:
        raise RuntimeError("wrk is not installed")
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency",
            f"--timeout={timeout:g}s", url]  # fmt: skip
    before = _children_cpu()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + timeout + 30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
    result = parse_wrk(done.stdout)
    result.cpu_seconds = _children_cpu() - before
    return result


def _children_cpu() -> float:
    """CPU time of the waited-for children so far: wrk's, measured around its run
    (nothing else is waited for meanwhile)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tool_version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else None
    return None


# -- nginx ------------------------------------------------------------------------------
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/upstream.conf;
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # What rotator tells an instance about its client: the same work behind each.
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
"""

# The balancing method (`least_conn;`, or nothing: round-robin) comes before `keepalive`.
UPSTREAM_CONF = "upstream backend {{ {method}{servers} keepalive 32; }}\n"


class Nginx:
    """nginx in the foreground as the current user, everything it writes in `directory`."""

    def __init__(self, procs: Processes, directory: Path, listen: int, upstream: int) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed")
        self.binary = NGINX
        self.procs = procs
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = listen
        self.conf = self.dir / "nginx.conf"
        # As root, nginx would switch its workers to `nobody`: keep them as we are.
        user = ""
        if os.geteuid() == 0:
            user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
        self.conf.write_text(NGINX_CONF.format(user=user, dir=self.dir, host=HOST, port=listen))
        self.set_upstream(upstream, reload=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def _argv(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.dir),
            "-c",
            str(self.conf),
            "-e",
            str(self.dir / "error.log"),
            *extra,
        ]

    def start(self) -> None:
        self.proc = self.procs.start(self._argv(), self.dir / "nginx.out")
        wait_http(f"http://{HOST}:{self.port}/health", proc=self.proc)

    def set_upstream(self, port: int, reload: bool = True) -> None:
        self.set_upstreams([port], reload=reload)

    def set_upstreams(self, ports: Sequence[int], method: str = "", reload: bool = True) -> None:
        """Balance over `ports`: `method` is nginx's directive (`least_conn`), or "" for
        its default, round-robin."""
        servers = " ".join(f"server {HOST}:{port};" for port in ports)
        (self.dir / "upstream.conf").write_text(
            UPSTREAM_CONF.format(method=f"{method}; " if method else "", servers=servers)
        )
        if reload:
            subprocess.run(
                self._argv("-s", "reload"),
                check=True,
                capture_output=True,
                timeout=10,
                start_new_session=True,  # an operator's command: see OPERATOR
            )

    def workers(self) -> set[int]:
        if self.proc is None:
            return set()
        with contextlib.suppress(psutil.Error):
            return {c.pid for c in psutil.Process(self.proc.pid).children()}
        return set()

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGQUIT, timeout=10)
            self.proc = None

    def warnings(self) -> list[str]:
        """What nginx logged at warn level or above (e.g. bodies buffered to temp files)."""
        with contextlib.suppress(OSError):
            return (self.dir / "error.log").read_text(errors="replace").splitlines()
        return []


def nginx_version() -> str | None:
    return tool_version([NGINX, "-v"]) if NGINX else None


# -- HAProxy -----------------------------------------------------------------------------
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)

# One thread (as nginx's one worker), keep-alive on both sides, and idle connections to the
# backend shared between clients (`http-reuse always`, the fastest of its reuse policies).
# It sets the X-Forwarded-* headers rotator sets (as nginx above), so that the backend
# parses the same request behind each proxy.
HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend bench
    bind {host}:{port}
    http-request set-header X-Forwarded-For %[src]
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend app
backend app
    server app {host}:{upstream}
"""


class HAProxy:
    """HAProxy in the foreground (`-db`), one process, its config in `directory`."""

    def __init__(self, procs: Processes, directory: Path, listen: int, upstream: int) -> None:
        if HAPROXY is None:
            raise RuntimeError("haproxy is not installed")
        self.procs = procs
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = listen
        self.conf = self.dir / "haproxy.cfg"
        self.conf.write_text(HAPROXY_CONF.format(host=HOST, port=listen, upstream=upstream))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert HAPROXY is not None
        self.proc = self.procs.start([HAPROXY, "-db", "-f", str(self.conf)], self.dir / "out")
        wait_http(f"http://{HOST}:{self.port}/health", proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None

    def output(self) -> list[str]:
        """What HAProxy printed (warnings and alerts go to its stderr in the foreground)."""
        with contextlib.suppress(OSError):
            return (self.dir / "out").read_text(errors="replace").splitlines()
        return []


def haproxy_version() -> str | None:
    return tool_version([HAPROXY, "-v"]) if HAPROXY else None


# -- rotator ----------------------------------------------------------------------------
# Quicker health checks than rotator's defaults (1 s), for benchmarks that restart.
BENCH_DEFAULTS: dict[str, Any] = {
    "health": {"interval": "200ms", "timeout": "1s", "start_timeout": "15s"},
    "drain_timeout": "5s",
    "stop_timeout": "3s",
}


class Rotator:
    """`rotator up` as a real subprocess, on a config written into `directory`."""

    def __init__(
        self,
        procs: Processes,
        directory: Path,
        components: dict[str, dict[str, Any]],
        defaults: dict[str, Any] | None = None,
    ) -> None:
        """`defaults`: the config's `defaults` section; None: BENCH_DEFAULTS."""
        self.procs = procs
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        admin = free_ports(1)[0]
        self.admin = f"http://{HOST}:{admin}"
        self.components = components
        config = {
            "admin": {"listen": f"{HOST}:{admin}"},
            "state_dir": "state",
            "defaults": BENCH_DEFAULTS if defaults is None else defaults,
            "components": components,
        }
        self.config = self.dir / "rotator.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids_seen: set[int] = set()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "rotator", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.procs.env,
            start_new_session=True,  # an operator's command: see OPERATOR
        )

    def start(self, timeout: float = 30) -> None:
        self.proc = self.procs.start(
            [PY, "-m", "rotator", "up", "-c", str(self.config)], self.dir / "rotator.out"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rotator up exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                components = self.status()["components"]
                if all(c["state"] == "running" for c in components):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"rotator not running after {timeout:g}s:\n{self.output()}")

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = http_get_json(self.admin + "/v1/status")
        for c in status["components"]:
            if c["active"]:
                self.pids_seen.add(c["active"]["pid"])
            self.pids_seen.update(d["pid"] for d in c["draining"])
        return status

    def event_loop(self) -> str:
        """As `rotator status --json` reports it (daemon.event_loop)."""
        done = self.cli("status", "--json", timeout=15)
        if done.returncode != 0:
            raise RuntimeError(f"rotator status --json failed: {done.stderr}")
        return str(json.loads(done.stdout)["daemon"]["event_loop"])

    def url(self, name: str, path: str = "/") -> str:
        return f"http://{self.components[name]['listen']}{path}"

    def spawner(self) -> psutil.Process | None:
        """The daemon's spawner process (rotator/spawner.py): part of rotator's own cost."""
        assert self.proc is not None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children():
                if "rotator.spawner_process" in " ".join(child.cmdline()):
                    return child
        return None

    def output(self) -> str:
        return (self.dir / "rotator.out").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            self.pids_seen.update(c.pid for c in psutil.Process(self.proc.pid).children(True))
        self.procs.stop(self.proc, signal.SIGTERM, timeout=20)
        self.proc = None
        for pid in self.pids_seen:  # instances run in sessions of their own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


# -- machine and results ----------------------------------------------------------------
def uvloop_version() -> str | None:
    try:
        return importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "uvloop": uvloop_version(),
        "wrk": tool_version(["wrk", "--version"]),
        "nginx": nginx_version(),
        "haproxy": haproxy_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj: object) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)  # type: ignore[call-overload]
    raise TypeError(f"not JSON: {obj!r}")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)

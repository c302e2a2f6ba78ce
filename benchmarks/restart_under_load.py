"""Restarts under load: what clients see while a backend is restarted ten times.

The backend is benchmarks/backend.py with `--startup-delay 1` (a small aiohttp
app that binds its port one second after it starts, like an app that loads
before it listens; it notes when it first answered its health check and its
first real request). 16 concurrent clients, each one request at a time, hit one
URL for ~30 s while the backend is restarted 10 times, evenly spaced. Two loads,
each run against each way of restarting:

- keep-alive:     8 clients on a keep-alive pool with aiohttp's retry (a GET that
                  fails on a connection is silently sent again, once), 8 on a
                  keep-alive pool with that retry turned off;
- new connection: 16 clients that open a new connection for every request.

The ways of restarting:

- naive:   SIGTERM the backend, wait for it to exit, start it again on the same
           port; the clients hit the backend directly.
- nginx:   by hand: start a new backend on the other port, wait for its health
           check, rewrite the upstream file, `nginx -s reload`, wait for the old
           workers to exit, SIGTERM the old backend (skipped without nginx).
- rotator: `rotator restart web` (the CLI), clients on the public address.

Reported per run (and per client group): requests, failures by kind, the
longest time without a successful response (across all clients); per switch, the
longest such gap within 100 ms of it, and the same measure at rest (0.5 s before
each restart) as a baseline, their medians compared with nginx's; latency
p50/p99/max of successes, p99 at rest against p99 while a restart runs, and the
switch as the backend saw it (its first request minus its first healthy check).
A client that failed waits 10 ms before its next request (no busy loop).

    python benchmarks/restart_under_load.py [--quick] [--duration S] [--restarts N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import plots
from benchlib import (
    HOST,
    NGINX,
    PY,
    RESULTS,
    ROOT,
    TAG_ENV,
    Nginx,
    Processes,
    Rotator,
    free_ports,
    handle_sigterm,
    machine,
    median,
    percentile,
    sweep,
    table,
    wait_http,
    workdir,
    write_result,
)

NAME = "restart_under_load"
BACKEND = Path(__file__).resolve().parent / "backend.py"
STARTUP_DELAY = 1.0
FAILURE_PAUSE = 0.010
REQUEST_TIMEOUT = 10.0
WARM_UP = 1.0  # s of load before anything counts as "at rest"
GAP_RECORDED = 0.001  # gaps longer than this are kept: each switch's longest, and at rest
GAP_REPORTED = 0.010  # gaps longer than this are listed with their time
NEAR_SWITCH = 0.100  # a gap this close to a backend's first answer counts as "at the switch"
REST_BEFORE = 0.5  # s before each restart: where the same window is measured at rest
STOP_TIMEOUT = 3.0  # SIGTERM, then SIGKILL after this: rotator's stop_timeout in its config
# Targets for rotator
TARGET_GAP = 0.050  # longest gap, s; and no longer than nginx's in the same round and load
TARGET_P99_RATIO = 2.0  # p99 while restarting <= this x p99 at rest
TARGET_SWITCH_MS = 50.0  # median of first request - first healthy check, backend side


@dataclass(frozen=True)
class Group:
    name: str
    clients: int
    keep_alive: bool
    retry: bool


LOADS: dict[str, tuple[Group, ...]] = {
    "keep-alive": (
        Group("keep-alive, retry", 8, keep_alive=True, retry=True),
        Group("keep-alive, no retry", 8, keep_alive=True, retry=False),
    ),
    "new connection": (Group("new connection", 16, keep_alive=False, retry=False),),
    # The test suite's smoke run: both kinds of connection, no retry anywhere.
    "mixed": (
        Group("keep-alive, no retry", 8, keep_alive=True, retry=False),
        Group("new connection", 8, keep_alive=False, retry=False),
    ),
}


def backend_argv(
    port: int | str, record: Path, startup_delay: float, notify: bool = False
) -> list[str]:
    return [PY, str(BACKEND), "--port", str(port), "--record", str(record),
            "--startup-delay", f"{startup_delay:g}", *(["--notify"] if notify else [])]  # fmt: skip


def disable_retry(session: aiohttp.ClientSession) -> None:
    """Turn off aiohttp's silent second attempt of an idempotent request.

    Since 3.9 aiohttp sends a GET again, once, when the first attempt fails with
    ClientOSError or ServerDisconnectedError (a keep-alive connection the server
    has closed, typically), and the caller never learns of the first failure.
    There is no public switch: `_retry_connection` is the attribute aiohttp's own
    test client turns off (aiohttp PR #9396, 3.10.9+). Without it the clients
    that should not retry would silently retry, so its absence is an error.
    """
    if not hasattr(session, "_retry_connection"):
        raise RuntimeError(
            f"aiohttp {aiohttp.__version__} has no ClientSession._retry_connection: "
            "cannot turn off its retry (needs aiohttp >= 3.10.9)"
        )
    session._retry_connection = False


# -- load ----------------------------------------------------------------------------
class Tally:
    """Successes and failures of some clients; times in seconds since the load began."""

    def __init__(self) -> None:
        self.ok = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.failed_at = array("d")
        self.sent_at = array("d")  # of each success
        self.latency = array("d")
        self.gaps: list[tuple[float, float]] = []  # (start, length) over GAP_RECORDED
        self.longest_gap = (0.0, 0.0)
        # Gaps run from one success to the next: the wait for the very first answer is
        # the clients connecting, not an interruption of service.
        self._last_ok: float | None = None

    def success(self, sent: float, now: float) -> None:
        self.close(now)
        self.ok += 1
        self.sent_at.append(sent)
        self.latency.append(now - sent)

    def failure(self, now: float, kind: str) -> None:
        self.failures[kind] += 1
        self.failed_at.append(now)

    def close(self, now: float) -> None:
        """A success at `now` (or the end of the load): ends the current gap."""
        if self._last_ok is None:
            self._last_ok = now
            return
        gap = now - self._last_ok
        if gap > GAP_RECORDED:
            self.gaps.append((self._last_ok, gap))
        if gap > self.longest_gap[1]:
            self.longest_gap = (self._last_ok, gap)
        self._last_ok = now

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def failure_kind(exc: BaseException) -> str:
    kind = type(exc).__name__
    os_error = getattr(exc, "os_error", None) or exc
    code = getattr(os_error, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        kind += f" {errno.errorcode[code]}"
    return kind


class LoadGenerator:
    """The clients of one load, one request at a time each, until stopped."""

    def __init__(self, url: str, groups: tuple[Group, ...]) -> None:
        self.url = url
        self.groups = groups
        self.all = Tally()
        self.by_group = {g.name: Tally() for g in groups}
        self.first_seen: dict[int, float] = {}  # backend pid: its first answer, s
        self.samples: list[str] = []
        self.t0 = 0.0
        self.t0_wall = 0.0
        self._stop = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wall(self, t: float) -> float:
        """A time of this load as time.time()."""
        return self.t0_wall + t

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        sessions = []
        for g in self.groups:
            connector = aiohttp.TCPConnector(force_close=not g.keep_alive, limit=0)
            session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)
            if not g.retry:
                disable_retry(session)
            sessions.append(session)
        self.t0, self.t0_wall = time.monotonic(), time.time()
        try:
            await asyncio.gather(
                *(
                    self._client(session, self.by_group[g.name])
                    for g, session in zip(self.groups, sessions, strict=True)
                    for _ in range(g.clients)
                )
            )
        finally:
            for session in sessions:
                await session.close()
        end = self.now()  # a gap at the very end counts too
        for tally in (self.all, *self.by_group.values()):
            tally.close(end)

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, session: aiohttp.ClientSession, mine: Tally) -> None:
        while not self._stop.is_set():
            sent = self.now()
            try:
                async with session.get(self.url) as resp:
                    await resp.read()
                    status, pid = resp.status, int(resp.headers.get("X-Instance-Pid", 0))
            except Exception as exc:  # every kind of failure is what we count
                kind = failure_kind(exc)
                if len(self.samples) < 20:
                    self.samples.append(f"{self.now():.3f}s {exc!r}"[:200])
            else:
                if status == 200:
                    now = self.now()
                    self.first_seen.setdefault(pid, now)
                    self.all.success(sent, now)
                    mine.success(sent, now)
                    continue
                kind = f"HTTP {status}"
            now = self.now()
            self.all.failure(now, kind)
            mine.failure(now, kind)
            await asyncio.sleep(FAILURE_PAUSE)


# -- scenarios -------------------------------------------------------------------------
class Scenario(ABC):
    name = ""
    url = ""

    def __init__(self, procs: Processes, directory: Path, startup_delay: float) -> None:
        self.procs = procs
        self.dir = directory
        self.records = directory / "records"  # the backends' first-event files
        self.records.mkdir(parents=True, exist_ok=True)
        self.startup_delay = startup_delay

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def restart(self) -> str:
        """One restart, blocking; returns a short note. Raises on failure."""

    @abstractmethod
    def teardown(self) -> None: ...

    def start_backend(self, port: int) -> subprocess.Popen[bytes]:
        argv = backend_argv(port, self.records, self.startup_delay)
        proc = self.procs.start(argv, self.dir / "backend.out")
        wait_http(f"http://{HOST}:{port}/health", proc=proc)
        return proc

    def backends(self) -> list[dict[str, float]]:
        """What each backend of this scenario recorded, in the order they were created."""
        found = []
        for path in self.records.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                found.append(json.loads(path.read_text()))
        return sorted(found, key=lambda r: r["started"])


class Naive(Scenario):
    name = "naive"

    def setup(self) -> None:
        (self.port,) = free_ports(1)
        self.url = f"http://{HOST}:{self.port}/"
        self.backend = self.start_backend(self.port)

    def restart(self) -> str:
        down = time.monotonic()
        forced = self.procs.stop(self.backend, signal.SIGTERM, timeout=STOP_TIMEOUT)
        stopped = time.monotonic() - down
        self.backend = self.start_backend(self.port)
        return (
            f"stopped in {stopped:.2f}s{' (SIGKILL)' if forced else ''}, "
            f"port closed for {time.monotonic() - down:.2f}s"
        )

    def teardown(self) -> None:
        self.procs.stop(self.backend)


class NginxByHand(Scenario):
    name = "nginx"

    def setup(self) -> None:
        self.ports = free_ports(2)
        (listen,) = free_ports(1)
        self.url = f"http://{HOST}:{listen}/"
        self.current = 0
        self.backend = self.start_backend(self.ports[0])
        self.nginx = Nginx(self.procs, self.dir / "nginx", listen, self.ports[0])
        self.nginx.start()

    def restart(self) -> str:
        other = 1 - self.current
        new = self.start_backend(self.ports[other])
        old_workers = self.nginx.workers()
        self.nginx.set_upstream(self.ports[other])  # nginx -s reload
        began = time.monotonic()
        while old_workers & self.nginx.workers() and time.monotonic() - began < 10:
            time.sleep(0.01)
        waited = time.monotonic() - began
        forced = self.procs.stop(self.backend, signal.SIGTERM, timeout=STOP_TIMEOUT)
        self.backend, self.current = new, other
        return f"old workers gone {waited:.2f}s after the reload{'; old backend: SIGKILL' if forced else ''}"

    def teardown(self) -> None:
        self.nginx.stop()
        self.procs.stop(self.backend)


class RotatorCli(Scenario):
    name = "rotator"
    event_loop = ""
    ready = "poll"  # health.ready

    def setup(self) -> None:
        listen, *pool = free_ports(5)
        notify = self.ready == "notify"
        command = " ".join(backend_argv("{port}", self.records, self.startup_delay, notify))
        web: dict[str, Any] = {"listen": f"{HOST}:{listen}", "ports": pool, "command": command}
        if notify:
            web["health"] = {"ready": "notify"}  # merged over the defaults' other fields
        self.rotator = Rotator(self.procs, self.dir, {"web": web})
        self.rotator.start()
        self.url = self.rotator.url("web")
        self.event_loop = self.rotator.event_loop()

    def restart(self) -> str:
        done = self.rotator.cli("restart", "web", timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"rotator restart exited {done.returncode}: {done.stderr.strip()}")
        # Its event lines ("[ 1.2s] web: switched ..."), to place gaps within a restart.
        return " | ".join(done.stdout.strip().splitlines())

    def teardown(self) -> None:
        self.rotator.stop()


class RotatorNotify(RotatorCli):
    """rotator with `health: {ready: notify}`: the backend says READY=1 once listening."""

    name = "rotator-notify"
    ready = "notify"


SCENARIOS: list[type[Scenario]] = [Naive, NginxByHand, RotatorCli]
# Those switch_latency runs as well.
EVERY_SCENARIO: list[type[Scenario]] = [*SCENARIOS, RotatorNotify]


class Operator:
    """A scenario run from a process of its own, as an operator's shell would run it.

    Restarting takes work: starting processes, polling health, running commands. Done
    in the load generator's process, that work would stall the clients in ways no real
    client sees: CPython 3.11 holds the GIL while the parent of a vfork waits for the
    child's exec (on a busy 2-core machine, 10-20 ms in which the clients' event loop
    cannot run), and a restart's Python code competes with the clients for the GIL.
    """

    def __init__(self, cls: type[Scenario], directory: Path, startup_delay: float, tag: str):
        context = multiprocessing.get_context("spawn")  # no copy of this process's loop
        self._conn, theirs = context.Pipe()
        self._proc = context.Process(
            target=_operate, args=(theirs, cls.name, directory, startup_delay, tag), daemon=True
        )
        # The child imports this module by name: from this folder (benchmarks import
        # their neighbours by name), whoever imported it here and however.
        here = str(Path(__file__).resolve().parent)
        added = here not in sys.path
        if added:
            sys.path.insert(0, here)
        try:
            self._proc.start()
        finally:
            if added:
                sys.path.remove(here)
        theirs.close()

    def call(self, what: str) -> Any:
        self._conn.send(what)
        try:
            ok, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the operator process exited ({self._proc.exitcode})") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        """Tear the scenario down (whatever state setup left it in) and wait for the end."""
        try:
            self.call("teardown")
        except (RuntimeError, OSError) as exc:  # the sweep after it still stops everything
            print(f"{NAME}: teardown: {exc}", file=sys.stderr)
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _operate(conn: Any, name: str, directory: Path, startup_delay: float, tag: str) -> None:
    """The operator process: runs setup, restarts and teardown as they are asked for."""
    cls = next(c for c in EVERY_SCENARIO if c.name == name)
    with Processes(directory, tag) as procs:
        scenario = cls(procs, directory, startup_delay)
        while True:
            what = conn.recv()
            try:
                if what == "setup":
                    scenario.setup()
                    value: Any = (scenario.url, getattr(scenario, "event_loop", ""))
                elif what == "restart":
                    value = scenario.restart()
                else:
                    scenario.teardown()
                    value = None
                conn.send((True, value))
            except Exception as exc:
                conn.send((False, f"{type(exc).__name__}: {exc}"))
            if what == "teardown":
                return


# -- driving -----------------------------------------------------------------------------
@dataclass
class Run:
    """One scenario under one load: the figures, and what the plot needs."""

    result: dict[str, Any]
    panel: plots.Panel
    extra: dict[str, Any] = field(default_factory=dict)


async def drive(
    operator: Operator, load: LoadGenerator, duration: float, restarts: int, verbose: bool
) -> list[dict[str, Any]]:
    """Restarts evenly spread over `duration` while the load runs; returns the restart log."""
    running = asyncio.ensure_future(load.run())
    await asyncio.sleep(0)  # let it set t0
    log: list[dict[str, Any]] = []
    try:
        for i in range(restarts):
            await asyncio.sleep(max(0.0, (i + 0.5) * duration / restarts - load.now()))
            began = load.now()
            try:
                note = await asyncio.to_thread(operator.call, "restart")
                ok = True
            except Exception as exc:
                note, ok = f"{type(exc).__name__}: {exc}", False
            took = load.now() - began
            log.append({"at": round(began, 3), "seconds": round(took, 3), "ok": ok, "note": note})
            if verbose:
                last = note.rsplit(" | ", 1)[-1]
                print(f"    restart {i + 1:2}/{restarts} at {began:5.2f}s took {took:5.2f}s: {last}",
                      flush=True)  # fmt: skip
        end = max(duration, (log[-1]["at"] + log[-1]["seconds"] + 1.0) if log else 0.0)
        await asyncio.sleep(max(0.0, end - load.now()))
    finally:
        load.stop()
        await running
    return log


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def latency_figures(tally: Tally) -> dict[str, Any]:
    lat = sorted(tally.latency)
    return {
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
    }


def at_rest_and_rotating(tally: Tally, log: list[dict[str, Any]]) -> dict[str, Any]:
    """p99 of requests sent while a restart ran, against those sent at rest (after warm-up)."""
    windows = [(r["at"], r["at"] + r["seconds"]) for r in log]
    rest: list[float] = []
    rotating: list[float] = []
    for sent, latency in zip(tally.sent_at, tally.latency, strict=True):
        if any(a <= sent <= b for a, b in windows):
            rotating.append(latency)
        elif sent >= WARM_UP:
            rest.append(latency)
    p99_rest, p99_rot = percentile(sorted(rest), 99), percentile(sorted(rotating), 99)
    return {
        "p99_at_rest_ms": ms(p99_rest),
        "p99_rotating_ms": ms(p99_rot),
        "p99_rotating_x_rest": round(p99_rot / p99_rest, 2) if p99_rest and p99_rot else None,
    }


def switch_figures(
    backends: list[dict[str, float]], load: LoadGenerator, log: list[dict[str, Any]]
) -> dict[str, Any]:
    """Each restart seen from the new backend: times from its own clock, in ms.

    switch: first request minus first healthy check (negative: clients reached it
    first, as in the naive case); wall minus startup: the restart's whole time
    less the backend's own start-up (its first line ran -> listening)."""
    rows = []
    for r in log:
        began, ended = load.wall(r["at"]), load.wall(r["at"] + r["seconds"])
        new = [b for b in backends if began <= b["started"] <= ended]
        if not new:
            continue
        b = new[0]
        row: dict[str, Any] = {"pid": b.get("pid"), "wall_ms": ms(ended - began)}
        if "listening" in b:
            startup = b["listening"] - b["started"]
            row["before_spawn_ms"] = ms(b["started"] - began)
            row["startup_ms"] = ms(startup)
            row["wall_minus_startup_ms"] = ms(ended - began - startup)
        if "first_health_ok" in b and "listening" in b:
            row["healthy_after_listening_ms"] = ms(b["first_health_ok"] - b["listening"])
        if "notified" in b and "first_request" in b:
            row["ready_to_request_ms"] = ms(b["first_request"] - b["notified"])
        if "first_health_ok" in b and "first_request" in b:
            row["switch_ms"] = ms(b["first_request"] - b["first_health_ok"])
            row["after_switch_ms"] = ms(ended - b["first_request"])
        rows.append(row)

    def med(key: str) -> float | None:
        value = median([r[key] for r in rows if r.get(key) is not None])
        return None if value is None else round(value, 1)

    return {
        "switch_ms_median": med("switch_ms"),
        "switch_ms_max": max((r["switch_ms"] for r in rows if "switch_ms" in r), default=None),
        "wall_ms_median": med("wall_ms"),
        "startup_ms_median": med("startup_ms"),
        "wall_minus_startup_ms_median": med("wall_minus_startup_ms"),
        "per_restart": rows,
    }


def report(
    scenario: Scenario, load_name: str, load: LoadGenerator, log: list[dict[str, Any]]
) -> Run:
    s = load.all
    # Switches as the clients saw them: the first answer of each new backend.
    switches = sorted(t for pid, t in load.first_seen.items() if pid)[1:]

    def away_from_switch(start: float, length: float) -> float | None:
        return min((max(0.0, t - (start + length), start - t) for t in switches), default=None)

    def near_switch(start: float, length: float) -> bool:
        away = away_from_switch(start, length)
        return away is not None and away <= NEAR_SWITCH

    reported = [(a, g) for a, g in s.gaps if g > GAP_REPORTED]
    near = [g for a, g in reported if near_switch(a, g)]
    elsewhere = [g for a, g in reported if not near_switch(a, g)]

    def longest_gap_near(t: float) -> float:
        """The longest gap (over GAP_RECORDED, else 0) within NEAR_SWITCH of the instant t."""
        return max(
            (g for a, g in s.gaps if a - NEAR_SWITCH <= t <= a + g + NEAR_SWITCH), default=0.0
        )

    # Each switch's own longest gap: the longest one max is only the worst of these.
    at_each_switch = [longest_gap_near(t) for t in switches]
    # The same measure at rest, before each restart: what a switch adds is the difference.
    rest_points = [r["at"] - REST_BEFORE for r in log if r["at"] - REST_BEFORE >= WARM_UP]
    at_rest = [longest_gap_near(t) for t in rest_points]
    ends = [int(a + b) for a, b in zip(s.sent_at, s.latency, strict=True)]
    counts = collections.Counter(ends)
    per_second = [counts[i] for i in range(max(counts, default=-1) + 1)]
    groups = {
        name: {
            "requests": t.ok + t.failed,
            "failed": t.failed,
            "failures": dict(t.failures.most_common()),
            "longest_gap_ms": ms(t.longest_gap[1]),
            **latency_figures(t),
        }
        for name, t in load.by_group.items()
    }
    result = {
        "scenario": scenario.name,
        "load": load_name,
        "seconds": round(load.now(), 2),
        "requests": s.ok + s.failed,
        "ok": s.ok,
        "failed": s.failed,
        "failures": dict(s.failures.most_common()),
        "longest_gap_ms": ms(s.longest_gap[1]),
        "longest_gap_at_s": round(s.longest_gap[0], 3),
        "longest_gap_near_switch_ms": ms(max(near, default=0.0)),
        "longest_gap_elsewhere_ms": ms(max(elsewhere, default=0.0)),
        "gap_at_each_switch_ms": [ms(g) for g in at_each_switch],
        "gap_at_switch_ms_median": ms(median(at_each_switch)) if at_each_switch else None,
        "gap_at_rest_ms": [ms(g) for g in at_rest],
        "gap_at_rest_ms_median": ms(median(at_rest)) if at_rest else None,
        **latency_figures(s),
        **at_rest_and_rotating(s, log),
        "groups": groups,
        "switch": switch_figures(scenario.backends(), load, log),
        "switches_seen_at_s": [round(t, 3) for t in switches],
        "gaps_over_10ms": [
            {"at_s": round(a, 3), "ms": ms(g), "from_switch_ms": ms(away_from_switch(a, g))}
            for a, g in reported
        ],
        "backends_seen": len([p for p in load.first_seen if p]),
        "ok_per_second_median": median(per_second[1:-1]) if len(per_second) > 2 else None,
        "restarts": log,
        "restarts_failed": sum(not r["ok"] for r in log),
        "failure_samples": load.samples,
    }
    panel = plots.Panel(
        title=(
            f"{scenario.name}, {load_name}: {result['requests']} requests, {s.failed} failed, "
            f"longest gap {result['longest_gap_ms']:.1f} ms, p99 {result['p99_ms']} ms "
            f"(at rest {result['p99_at_rest_ms']}, restarting {result['p99_rotating_ms']})"
        ),
        series={
            name: (t.sent_at, [x * 1000 for x in t.latency]) for name, t in load.by_group.items()
        },
        failures=s.failed_at,
        rotations=[(r["at"], r["at"] + r["seconds"]) for r in log],
        switches=switches,
    )
    return Run(result, panel)


def run_scenario(
    cls: type[Scenario],
    procs: Processes,
    tmp: Path,
    load_name: str,
    duration: float,
    restarts: int,
    startup_delay: float = STARTUP_DELAY,
    verbose: bool = True,
) -> Run:
    """Set up one scenario, run one load through `restarts` restarts, tear it all down."""
    directory = tmp / f"{cls.name}-{load_name.replace(' ', '-')}-{time.monotonic_ns()}"
    scenario = cls(procs, directory, startup_delay)  # here only to read what it recorded
    if verbose:
        print(f"  {cls.name}, {load_name}: setting up", flush=True)
    operator = Operator(cls, directory, startup_delay, procs.tag)
    try:
        url, event_loop = operator.call("setup")
        load = LoadGenerator(url, LOADS[load_name])
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            log = runner.run(drive(operator, load, duration, restarts, verbose))
    finally:
        operator.close()
        # Nothing of this scenario may disturb the next one (the tag is the operator's too).
        sweep(TAG_ENV, procs.tag)
    run = report(scenario, load_name, load, log)
    if event_loop:
        run.result["event_loop"] = event_loop
    return run


def smoke(directory: Path, restarts: int = 3, duration: float = 5.0) -> dict[str, Any]:
    """rotator only, a few restarts of a backend that starts fast, both kinds of connection
    without retries: what the test suite runs (tests/integration/test_benchmark_smoke.py)."""
    with Processes(directory) as procs:
        run = run_scenario(
            RotatorCli, procs, directory, "mixed", duration, restarts, startup_delay=0.2,
            verbose=False,
        )  # fmt: skip
    return run.result


def _loop_factory() -> Any:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None


# -- reporting ---------------------------------------------------------------------------
def gap_cell(ms: float | None) -> str:
    return "-" if ms is None else f"<{GAP_REPORTED * 1000:.0f}" if ms == 0 else f"{ms:.1f}"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """rotator's targets, each run against nginx's run of the same round and load."""
    lines = []
    for r in rows:
        if r["scenario"] != "rotator":
            continue
        where = f"round {r['round']}, {r['load']}"
        gap, ratio = r["longest_gap_ms"], r["p99_rotating_x_rest"]
        nginx = next(
            (n for n in rows if n["scenario"] == "nginx" and (n["round"], n["load"]) == (r["round"], r["load"])),
            None,
        )  # fmt: skip
        checks = [
            (f"{r['failed']} failed (target 0)", r["failed"] == 0),
            (f"longest gap {gap:.1f} ms (target < {TARGET_GAP * 1000:.0f})",
             gap < TARGET_GAP * 1000),
            (f"p99 restarting {ratio}x at rest (target <= {TARGET_P99_RATIO:g}x)",
             ratio is not None and ratio <= TARGET_P99_RATIO),
        ]  # fmt: skip
        if nginx is not None:
            checks.append(
                (f"gap vs nginx's {nginx['longest_gap_ms']:.1f} ms (target <=)",
                 gap <= nginx["longest_gap_ms"])
            )  # fmt: skip
            # The longest gap is one sample, the worst of a run; the median of each
            # switch's own longest gap says what a switch costs, with far less noise.
            mine, theirs = r["gap_at_switch_ms_median"], nginx["gap_at_switch_ms_median"]
            if mine is not None and theirs is not None:
                checks.append(
                    (f"median gap at a switch {mine:.1f} ms vs nginx's {theirs:.1f} ms (target <=)",
                     mine <= theirs)
                )  # fmt: skip
            # The same window at rest carries each proxy's steady-state cost per request
            # (per new connection, above all): the difference is what the switch adds.
            rest, nginx_rest = r["gap_at_rest_ms_median"], nginx["gap_at_rest_ms_median"]
            if None not in (mine, theirs, rest, nginx_rest):
                added, nginx_added = mine - rest, theirs - nginx_rest
                checks.append(
                    (f"a switch adds {added:.1f} ms to the gap at rest ({rest:.1f} ms), "
                     f"nginx's {nginx_added:.1f} ms (at rest {nginx_rest:.1f}) (target <=)",
                     added <= nginx_added)
                )  # fmt: skip
        switch = r["switch"]["switch_ms_median"]
        if switch is not None:
            checks.append(
                (f"switch median {switch:.1f} ms (target < {TARGET_SWITCH_MS:g})",
                 switch < TARGET_SWITCH_MS)
            )  # fmt: skip
        for text, ok in checks:
            lines.append(f"rotator, {where}: {text}: {'ok' if ok else 'MISSED'}")
    return lines


def print_tables(rows: list[dict[str, Any]]) -> None:
    print(table(
        ["round", "load", "scenario", "requests", "failed", "failures by kind", "longest gap ms",
         "at switch", "elsewhere", "median at a switch", "same at rest", "p50 ms", "p99 ms", "p99 rest", "p99 restarting", "max ms",
         "switch ms", "restarts ok"],
        [[r["round"], r["load"], r["scenario"], r["requests"], r["failed"],
          ", ".join(f"{k}: {n}" for k, n in r["failures"].items()) or "-",
          f"{r['longest_gap_ms']:.1f}", gap_cell(r["longest_gap_near_switch_ms"]),
          gap_cell(r["longest_gap_elsewhere_ms"]), r["gap_at_switch_ms_median"],
          r["gap_at_rest_ms_median"], r["p50_ms"], r["p99_ms"],
          r["p99_at_rest_ms"], r["p99_rotating_ms"], r["max_ms"],
          r["switch"]["switch_ms_median"],
          f"{len(r['restarts']) - r['restarts_failed']}/{len(r['restarts'])}"] for r in rows],
    ))  # fmt: skip
    print()
    print(table(
        ["round", "scenario", "client group", "requests", "failed", "failures by kind",
         "longest gap ms", "p50 ms", "p99 ms"],
        [[r["round"], r["scenario"], name, g["requests"], g["failed"],
          ", ".join(f"{k}: {n}" for k, n in g["failures"].items()) or "-",
          f"{g['longest_gap_ms']:.1f}", g["p50_ms"], g["p99_ms"]]
         for r in rows for name, g in r["groups"].items()],
    ))  # fmt: skip


def write_plots(runs: list[Run], directory: Path) -> list[str]:
    """One PNG per scenario, a panel per load, from the first round."""
    if not plots.available():
        print(f"{NAME}: matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    written = []
    by_scenario: dict[str, list[Run]] = {}
    for run in runs:
        if run.result["round"] == 1:
            by_scenario.setdefault(run.result["scenario"], []).append(run)
    for name, mine in by_scenario.items():
        path = directory / f"bench-restart-{name}.png"
        title = (
            f"{name}: {len(mine[0].result['restarts'])} restarts under load "
            f"(16 clients, backend start-up delay {STARTUP_DELAY:g} s)"
        )
        plots.timeline_png(path, title, [run.panel for run in mine])
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 round, 8 s and 3 restarts per run")
    p.add_argument("--rounds", type=int, default=1, help="each round runs every load x scenario")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--only", choices=[s.name for s in SCENARIOS], action="append")
    p.add_argument("--load", choices=["keep-alive", "new connection"], action="append")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="where the PNGs go (default: docs/, or benchmarks/results/ with --quick)")  # fmt: skip
    args = p.parse_args(argv)
    duration, restarts, rounds = args.duration, args.restarts, args.rounds
    plot_dir = args.plots or ROOT / "docs"
    if args.quick:
        duration, restarts, rounds = 8.0, 3, 1
        plot_dir = args.plots or RESULTS
    handle_sigterm()
    scenarios = list(SCENARIOS)
    if NGINX is None:
        print(f"{NAME}: nginx is not installed: skipping the nginx scenario")
        scenarios.remove(NginxByHand)
    if args.only:
        scenarios = [s for s in scenarios if s.name in args.only]
    loads = args.load or ["keep-alive", "new connection"]
    info = machine()
    print(
        f"{NAME}: 16 clients, {duration:g} s, {restarts} restarts per run, loads {loads}, "
        f"{rounds} round(s), backend start-up delay {STARTUP_DELAY:g} s",
        flush=True,
    )
    runs: list[Run] = []
    try:
        with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
            for rnd in range(1, rounds + 1):
                for load_name in loads:
                    for cls in scenarios:
                        load_before = round(os.getloadavg()[0], 2)
                        run = run_scenario(cls, procs, tmp, load_name, duration, restarts)
                        run.result = {
                            "round": rnd,
                            "load_average_before": load_before,
                            **run.result,
                        }
                        runs.append(run)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see handle_sigterm)
        print(f"{NAME}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    rows = [run.result for run in runs]
    print()
    print_tables(rows)
    checks = verdicts(rows)
    print()
    for line in checks:
        print(f"  {line}")
    pngs = write_plots(runs, plot_dir)
    for png in pngs:
        print(f"{NAME}: plot {png}")
    path = write_result(NAME, {
        "machine": info,
        "settings": {"clients": 16, "duration": duration, "restarts": restarts, "rounds": rounds,
                     "loads": {name: [asdict(g) for g in LOADS[name]] for name in loads},
                     "startup_delay": STARTUP_DELAY, "failure_pause": FAILURE_PAUSE},
        "scenarios": rows, "targets": checks, "plots": pngs,
    })  # fmt: skip
    print(f"\n{NAME}: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

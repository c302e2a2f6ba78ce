"""Restarts under load: what clients see while a backend is restarted ten times.

The backend is the demo with `--startup-delay 1` (it binds its port one second
after it starts, like an app that loads before it listens). 16 concurrent
clients (half keep-alive, half a new connection per request, each one request
at a time) hit one URL for ~24 s while the backend is restarted 10 times,
evenly spaced, in three ways:

- naive:   SIGTERM the backend, wait for it to exit, start it again on the same
           port; the clients hit the backend directly.
- nginx:   by hand: start a new backend on the other port, wait for its health
           check, rewrite the upstream file, `nginx -s reload`, wait for the old
           workers to exit, SIGTERM the old backend (skipped without nginx).
- rotator: `rotator restart web` (the CLI), clients on the public address.

Reported per scenario: requests, failures by kind, the longest time without a
successful response (across all clients), latency p50/p99/max of successes.
A client that failed waits 10 ms before its next request (no busy loop).

    python benchmarks/restart_under_load.py [--quick] [--duration S] [--restarts N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import (
    HOST,
    NGINX,
    PY,
    Nginx,
    Processes,
    Rotator,
    free_ports,
    handle_sigterm,
    machine,
    median,
    percentile,
    table,
    wait_http,
    workdir,
    write_result,
)

NAME = "restart_under_load"
CLIENTS = 16
STARTUP_DELAY = 1.0
FAILURE_PAUSE = 0.010
REQUEST_TIMEOUT = 10.0
GAP_REPORTED = 0.010  # gaps longer than this are listed with their time
NEAR_SWITCH = 0.100  # a gap this close to a backend's first answer counts as "at the switch"
TARGET_GAP = 0.050  # rotator: longest gap below this, and no failed request
STOP_TIMEOUT = 3.0  # SIGTERM, then SIGKILL after this: rotator's stop_timeout in its config


def demo_argv(port: int) -> list[str]:
    return [PY, "-m", "rotator.demo", "--port", str(port), "--name", "web",
            "--startup-delay", f"{STARTUP_DELAY:g}"]  # fmt: skip


# -- load ----------------------------------------------------------------------------
@dataclass
class LoadStats:
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, length), s
    longest_gap: tuple[float, float] = (0.0, 0.0)
    pids: collections.Counter[int] = field(default_factory=collections.Counter)
    per_second: collections.Counter[int] = field(default_factory=collections.Counter)
    first_seen: dict[int, float] = field(default_factory=dict)  # backend pid: first answer, s
    samples: list[str] = field(default_factory=list)


def failure_kind(exc: BaseException) -> str:
    kind = type(exc).__name__
    os_error = getattr(exc, "os_error", None) or exc
    code = getattr(os_error, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        kind += f" {errno.errorcode[code]}"
    return kind


class LoadGenerator:
    """CLIENTS concurrent clients, one request at a time each, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stats = LoadStats()
        self.t0 = 0.0
        self._last_ok = 0.0
        self._stop = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        keep = aiohttp.ClientSession(timeout=timeout, trust_env=False)
        fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=timeout, trust_env=False
        )
        self.t0 = self._last_ok = time.monotonic()
        async with keep, fresh:
            await asyncio.gather(
                *(self._client(keep if i % 2 == 0 else fresh) for i in range(CLIENTS))
            )
        self._success(time.monotonic(), count=False)  # a gap at the very end counts too

    def stop(self) -> None:
        self._stop.set()

    def _success(self, now: float, count: bool = True) -> None:
        gap = now - self._last_ok
        start = self._last_ok - self.t0
        if gap > GAP_REPORTED:
            self.stats.gaps.append((start, gap))
        if gap > self.stats.longest_gap[1]:
            self.stats.longest_gap = (start, gap)
        self._last_ok = now
        if count:
            self.stats.ok += 1
            self.stats.per_second[int(now - self.t0)] += 1

    async def _client(self, session: aiohttp.ClientSession) -> None:
        stats = self.stats
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                async with session.get(self.url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        stats.failures[f"HTTP {resp.status}"] += 1
                        await asyncio.sleep(FAILURE_PAUSE)
                        continue
                    pid = int(resp.headers.get("X-Instance-Pid", 0))
                    if (
                        pid not in stats.pids
                    ):  # a new backend answers: the switch, as clients see it
                        stats.first_seen[pid] = self.now()
                    stats.pids[pid] += 1
            except Exception as exc:  # every kind of failure is what we count
                stats.failures[failure_kind(exc)] += 1
                if len(stats.samples) < 20:
                    stats.samples.append(f"{self.now():.3f}s {exc!r}"[:200])
                await asyncio.sleep(FAILURE_PAUSE)
                continue
            now = time.monotonic()
            stats.latencies.append(now - began)
            self._success(now)


# -- scenarios -------------------------------------------------------------------------
class Scenario(ABC):
    name = ""
    url = ""

    def __init__(self, procs: Processes, directory: Path) -> None:
        self.procs = procs
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def restart(self) -> str:
        """One restart, blocking; returns a short note. Raises on failure."""

    @abstractmethod
    def teardown(self) -> None: ...

    def start_backend(self, port: int) -> subprocess.Popen[bytes]:
        proc = self.procs.start(demo_argv(port), self.dir / "backend.out")
        wait_http(f"http://{HOST}:{port}/health", proc=proc)
        return proc


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

    def setup(self) -> None:
        listen, *pool = free_ports(5)
        command = (
            f"{PY} -m rotator.demo --port {{port}} --name web --startup-delay {STARTUP_DELAY:g}"
        )
        self.rotator = Rotator(
            self.procs,
            self.dir,
            {"web": {"listen": f"{HOST}:{listen}", "ports": pool, "command": command}},
        )
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


# -- driving -----------------------------------------------------------------------------
async def drive(scenario: Scenario, duration: float, restarts: int) -> dict[str, Any]:
    load = LoadGenerator(scenario.url)
    running = asyncio.ensure_future(load.run())
    await asyncio.sleep(0)  # let it set t0
    log: list[dict[str, Any]] = []
    try:
        for i in range(restarts):
            await asyncio.sleep(max(0.0, (i + 0.5) * duration / restarts - load.now()))
            began = load.now()
            try:
                note = await asyncio.to_thread(scenario.restart)
                ok = True
            except Exception as exc:
                note, ok = f"{type(exc).__name__}: {exc}", False
            took = load.now() - began
            log.append({"at": round(began, 3), "seconds": round(took, 3), "ok": ok, "note": note})
            last = note.rsplit(" | ", 1)[-1]
            print(
                f"    restart {i + 1:2}/{restarts} at {began:5.2f}s took {took:5.2f}s: {last}",
                flush=True,
            )
        end = max(duration, (log[-1]["at"] + log[-1]["seconds"] + 1.0) if log else 0.0)
        await asyncio.sleep(max(0.0, end - load.now()))
    finally:
        load.stop()
        await running
    return report(scenario.name, load, log)


def report(name: str, load: LoadGenerator, log: list[dict[str, Any]]) -> dict[str, Any]:
    s = load.stats
    lat = sorted(s.latencies)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 2)

    # Switches as the clients saw them: the first answer of each new backend.
    switches = sorted(t for pid, t in s.first_seen.items() if pid)[1:]

    def place(start: float, length: float) -> dict[str, Any]:
        """Which restart a gap fell in (the last one begun before it) and how far from a switch."""
        begun = [i for i, r in enumerate(log, 1) if r["at"] <= start + length]
        into = round(start - log[begun[-1] - 1]["at"], 3) if begun else None
        away = min((max(0.0, t - (start + length), start - t) for t in switches), default=None)
        return {
            "restart": begun[-1] if begun else None,
            "into_restart_s": into,
            "from_switch_ms": ms(away),
        }

    def near_switch(start: float, length: float) -> bool:
        away = place(start, length)["from_switch_ms"]
        return away is not None and away <= NEAR_SWITCH * 1000

    # Only gaps over GAP_REPORTED are kept: 0 below means "none that long".
    near = [g for a, g in s.gaps if near_switch(a, g)]
    elsewhere = [g for a, g in s.gaps if not near_switch(a, g)]

    gap_start, gap = s.longest_gap
    per_second = [s.per_second[i] for i in range(max(s.per_second, default=-1) + 1)]
    return {
        "scenario": name,
        "seconds": round(load.now(), 2),
        "requests": s.ok + sum(s.failures.values()),
        "ok": s.ok,
        "failed": sum(s.failures.values()),
        "failures": dict(s.failures.most_common()),
        "longest_gap_ms": ms(gap),
        "longest_gap_at_s": round(gap_start, 3),
        "longest_gap_where": place(gap_start, gap),
        "longest_gap_near_switch_ms": ms(max(near, default=0.0)),
        "longest_gap_elsewhere_ms": ms(max(elsewhere, default=0.0)),
        "switches_seen_at_s": [round(t, 3) for t in switches],
        "gaps_over_10ms": [{"at_s": round(a, 3), "ms": ms(g), **place(a, g)} for a, g in s.gaps],
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        "backends_seen": len([p for p in s.pids if p]),
        "ok_per_second": per_second,
        "ok_per_second_median": median(per_second[1:-1]) if len(per_second) > 2 else None,
        "restarts": log,
        "restarts_failed": sum(not r["ok"] for r in log),
        "failure_samples": s.samples,
    }


def run_scenario(
    cls: type[Scenario], procs: Processes, tmp: Path, duration: float, restarts: int
) -> dict[str, Any]:
    scenario = cls(procs, tmp / cls.name)
    print(f"  {cls.name}: setting up", flush=True)
    try:
        scenario.setup()
        try:
            runner = asyncio.Runner(loop_factory=_loop_factory())
            with runner:
                result = runner.run(drive(scenario, duration, restarts))
        finally:
            scenario.teardown()
    finally:
        # Nothing of this scenario may disturb the next one.
        for proc in list(procs.procs):
            procs.stop(proc)
    if isinstance(scenario, RotatorCli):
        result["event_loop"] = scenario.event_loop
    return result


def _loop_factory() -> Any:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None


def gap_cell(ms: float | None) -> str:
    return "-" if ms is None else f"<{GAP_REPORTED * 1000:.0f}" if ms == 0 else f"{ms:.1f}"


def verdict(rows: list[dict[str, Any]]) -> str:
    failed = sum(r["failed"] for r in rows)
    gap = max(r["longest_gap_ms"] for r in rows)
    ok = failed == 0 and gap < TARGET_GAP * 1000
    return (
        f"rotator: {failed} failed, longest gap {gap:.1f} ms over {len(rows)} round(s) "
        f"(target 0 failed and < {TARGET_GAP * 1000:.0f} ms): {'ok' if ok else 'MISSED'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 round, 8 s and 3 restarts per scenario")
    p.add_argument("--rounds", type=int, default=2, help="scenarios alternate: A B C A B C")
    p.add_argument("--duration", type=float, default=24.0, help="seconds of load per scenario")
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--only", choices=["naive", "nginx", "rotator"], action="append")
    args = p.parse_args(argv)
    duration, restarts, rounds = (args.duration, args.restarts, args.rounds)
    if args.quick:
        duration, restarts, rounds = 8.0, 3, 1
    handle_sigterm()
    scenarios: list[type[Scenario]] = [Naive, NginxByHand, RotatorCli]
    if NGINX is None:
        print(f"{NAME}: nginx is not installed: skipping the nginx scenario")
        scenarios.remove(NginxByHand)
    if args.only:
        scenarios = [s for s in scenarios if s.name in args.only]
    info = machine()
    print(
        f"{NAME}: {CLIENTS} clients, {duration:g} s, {restarts} restarts per scenario, {rounds} round(s), "
        f"backend startup delay {STARTUP_DELAY:g} s",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    try:
        with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
            for rnd in range(1, rounds + 1):
                for cls in scenarios:
                    load_before = round(os.getloadavg()[0], 2)
                    row = run_scenario(cls, procs, tmp, duration, restarts)
                    rows.append({"round": rnd, "load_average_before": load_before, **row})
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see handle_sigterm)
        print(f"{NAME}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print()
    print(table(
        ["round", "scenario", "requests", "failed", "failures by kind", "longest gap ms",
         "at switch", "elsewhere", "ok/s", "p50 ms", "p99 ms", "max ms", "restarts ok"],
        [[r["round"], r["scenario"], r["requests"], r["failed"],
          ", ".join(f"{k}: {n}" for k, n in r["failures"].items()) or "-",
          f"{r['longest_gap_ms']:.1f}", gap_cell(r["longest_gap_near_switch_ms"]),
          gap_cell(r["longest_gap_elsewhere_ms"]), r["ok_per_second_median"],
          r["p50_ms"], r["p99_ms"], r["max_ms"],
          f"{len(r['restarts']) - r['restarts_failed']}/{len(r['restarts'])}"] for r in rows],
    ))  # fmt: skip
    checks = (
        [verdict([r for r in rows if r["scenario"] == "rotator"])]
        if RotatorCli in scenarios
        else []
    )
    print()
    for line in checks:
        print(f"  {line}")
    path = write_result(NAME, {
        "machine": info,
        "settings": {"clients": CLIENTS, "duration": duration, "restarts": restarts, "rounds": rounds,
                     "startup_delay": STARTUP_DELAY, "failure_pause": FAILURE_PAUSE},
        "scenarios": rows, "targets": checks,
    })  # fmt: skip
    print(f"\n{NAME}: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What rotator's proxy costs: two backends measured with wrk directly, through rotator,
through nginx and through HAProxy, the runs alternated so that all variants share the
machine's noise.

With the fast backend, two more variants show the floor under rotator's proxy
(benchmarks/floor_proxy.py): `pump`, a byte pump on uvloop that parses nothing, and
`minimal`, an HTTP proxy that parses both ways with httptools and does nothing else. nginx
and HAProxy set the X-Forwarded-For, -Proto and -Host headers that rotator sets, so the
backend parses the same request behind each.

The backends are rotator's demo app (aiohttp), started by rotator (a component with
a pool of one port each): `typical` on plain asyncio, as a Python app usually runs,
and `fast`, the same app on uvloop (benchmarks/fast_backend.py), 1.2-1.5x as fast:
fast enough that the proxy's own cost shows. For each backend, `direct` hits its port,
`rotator` the component's public address, `nginx` and `haproxy` a proxy of their own
(one worker, one thread) whose upstream is that same port. Each round runs, for each
backend, each body (short `/`, 100 KiB `/bytes?n=102400`) and each concurrency (64
and 16 connections: throughput; 1 connection: the latency one hop adds), the variants
in turn. Reported: medians over rounds, the median of the per-round ratios, and each
proxy's CPU per request (psutil, around each wrk run).

Then, under the fast backend (short body, 16 connections), profiles of the daemon:
py-spy (`pip install py-spy`) for the functions with the most own time, kept in the
results, the raw stacks in benchmarks/results/proxy_profile.txt (py-spy's collapsed
format, for flamegraph tools); a full run samples a second time with --native, for
the C side, and runs `perf record` (Linux, if installed) for where the CPU goes by
shared object (kernel, CPython, uvloop, httptools) and symbol.

    python benchmarks/proxy_overhead.py [--quick] [--rounds N] [--duration S] [--profile S]
                                        [--backend typical|fast] [--body short|100KiB]
                                        [--connections 64|16|1]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from benchlib import (
    HAPROXY,
    HOST,
    NGINX,
    PY,
    RESULTS,
    ROOT,
    WRK,
    HAProxy,
    Nginx,
    Processes,
    Rotator,
    free_ports,
    handle_sigterm,
    machine,
    median,
    table,
    wait_http,
    workdir,
    write_result,
    wrk,
)

NAME = "proxy_overhead"
BODIES = {"short": "/", "100KiB": "/bytes?n=102400"}
BODY_BYTES = 102400
# The same demo app: on asyncio (a typical Python app), and on uvloop (a fast one).
BACKENDS = {
    "typical": f"{PY} -m rotator.demo --port {{port}} --name typical",
    "fast": f"{PY} {ROOT / 'benchmarks' / 'fast_backend.py'} --port {{port}} --name fast",
}
CONNECTIONS = (64, 16, 1)
# With the fast backend, two proxies that are no more than a floor (floor_proxy.py): a byte
# pump on uvloop, and a minimal HTTP proxy that parses with httptools as rotator does.
FLOOR_PROXY = ROOT / "benchmarks" / "floor_proxy.py"
FLOOR = ("pump", "minimal")
# Targets, printed next to the figures. The typical backend (c16 = the throughput runs):
TARGET_RATIO = 0.8  # rotator req/s >= 0.8x direct
TARGET_VS_NGINX = 1.0  # rotator req/s >= nginx's (with the fast backend: and HAProxy's)
TARGET_P50_OVERHEAD_MS = 0.3
# The fast backend, where the proxy's own cost shows:
TARGET_FAST_CPU_VS_NGINX = 1.3  # rotator's CPU per short request <= 1.3x nginx's
TARGET_FAST_P50_OVERHEAD_MS = 0.1  # at c1
PYSPY = shutil.which("py-spy") or next(
    (str(p) for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), None
)
PERF = shutil.which("perf") if sys.platform == "linux" else None
PROFILE_RATE = 250  # samples/s
IDLE = re.compile(r"^(epoll_p?wait|epoll_wait|kevent|select|poll) ")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
PERF_LINE = re.compile(r"^\s*(?P<pct>[\d.]+)%\s+(?P<dso>\S+)\s+\[(?P<kind>.)\]\s+(?P<sym>.+?)\s*$")


def check_same_backend(urls: dict[str, str]) -> int:
    """Every variant reaches the same backend pid and gets the 100 KiB body intact."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    expected = (bytes(range(256)) * (BODY_BYTES // 256 + 1))[:BODY_BYTES]
    pids = set()
    for variant, url in urls.items():
        with opener.open(url + BODIES["100KiB"], timeout=10) as resp:
            body = resp.read()
            pids.add(int(resp.headers["X-Instance-Pid"]))
        if body != expected:
            raise RuntimeError(f"{variant}: the 100 KiB body came back wrong ({len(body)} bytes)")
    if len(pids) != 1:
        raise RuntimeError(f"variants reached different backends: {pids}")
    return pids.pop()


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of these processes."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def measure(
    urls: dict[str, dict[str, str]],
    cpu_of: dict[str, dict[str, list[int]]],
    pids: dict[str, int],
    rounds: int,
    durations: dict[int, float],
    bodies: dict[str, str],
) -> list[dict[str, Any]]:
    """`urls[backend][variant]`; `cpu_of[backend][variant]`: the pids whose CPU is the
    proxy's; `pids[backend]`: the backend's; `durations[connections]`: seconds per run;
    `bodies`: name -> path, of BODIES."""
    runs: list[dict[str, Any]] = []
    for by_variant in urls.values():  # warm-up: connection pools, page cache, allocators
        for path in bodies.values():
            for url in by_variant.values():
                wrk(url + path, connections=16, duration=1)
    for rnd in range(1, rounds + 1):
        for backend, by_variant in urls.items():
            for body, path in bodies.items():
                for conns, secs in durations.items():
                    for variant, url in by_variant.items():
                        run = measure_one(
                            url + path, conns, secs, pids[backend], cpu_of[backend].get(variant)
                        )
                        run.update(round=rnd, backend=backend, body=body, variant=variant)
                        runs.append(run)
                        print(
                            f"  round {rnd} {backend:>7} {body:>6} c{conns:<2} {variant:>7}: "
                            f"{run['rps']:9.0f} req/s  p50 {run['p50_ms']:.3f} ms  "
                            f"p99 {run['p99_ms']:.3f} ms"
                            + (f"  ERRORS {run['errors']}" if run["errors"] else ""),
                            flush=True,
                        )
    return runs


def measure_one(
    url: str, conns: int, secs: float, backend: int, proxy: list[int] | None
) -> dict[str, Any]:
    """One wrk run, and the CPU it cost wrk, the backend and the proxy's processes (not
    their children: rotator's instances are the daemon's grandchildren)."""
    before = (cpu_seconds([backend]), cpu_seconds(proxy or []))
    r = wrk(url, connections=conns, duration=secs)
    after = (cpu_seconds([backend]), cpu_seconds(proxy or []))
    per_req = 1e6 / max(r.requests, 1)
    return {
        "connections": conns,
        "rps": r.rps,
        "requests": r.requests,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "errors": r.errors,
        "socket_errors": r.socket_errors,
        "non_2xx": r.non_2xx,
        "loadgen_cpu_us_per_req": round(r.cpu_seconds * per_req, 1),
        "backend_cpu_us_per_req": round((after[0] - before[0]) * per_req, 1),
        "proxy_cpu_us_per_req": round((after[1] - before[1]) * per_req, 1) if proxy else None,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    groups = sorted(
        {(r["backend"], r["body"], r["connections"]) for r in runs},
        key=lambda g: (list(BACKENDS).index(g[0]), list(BODIES).index(g[1]), -g[2]),
    )
    for group in groups:
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in runs:
            if (r["backend"], r["body"], r["connections"]) == group:
                by_round.setdefault(r["round"], {})[r["variant"]] = r
        variants = list(dict.fromkeys(v for rv in by_round.values() for v in rv))
        for variant in variants:
            mine = [rv[variant] for rv in by_round.values() if variant in rv]
            proxy_cpu = [
                r["proxy_cpu_us_per_req"] for r in mine if r["proxy_cpu_us_per_req"] is not None
            ]
            rows.append(
                {
                    "backend": group[0],
                    "body": group[1],
                    "connections": group[2],
                    "variant": variant,
                    "rps": median([r["rps"] for r in mine]),
                    "p50_ms": median([r["p50_ms"] for r in mine]),
                    "p99_ms": median([r["p99_ms"] for r in mine]),
                    "ratio_vs_direct": _ratio(by_round, variant, "direct", "rps"),
                    "p50_overhead_ms": median(
                        [rv[variant]["p50_ms"] - rv["direct"]["p50_ms"] for rv in by_round.values()]
                    ),
                    "ratio_vs_nginx": _ratio(by_round, variant, "nginx", "rps"),
                    "ratio_vs_haproxy": _ratio(by_round, variant, "haproxy", "rps"),
                    "per_round_vs_nginx": _ratios(by_round, variant, "nginx", "rps"),
                    "per_round_vs_haproxy": _ratios(by_round, variant, "haproxy", "rps"),
                    "cpu_vs_nginx": _ratio(by_round, variant, "nginx", "proxy_cpu_us_per_req"),
                    "loadgen_cpu_us_per_req": median([r["loadgen_cpu_us_per_req"] for r in mine]),
                    "backend_cpu_us_per_req": median([r["backend_cpu_us_per_req"] for r in mine]),
                    "proxy_cpu_us_per_req": median(proxy_cpu),
                    "errors": sum(r["errors"] for r in mine),
                    "rounds": len(mine),
                }
            )
    for row in rows:
        if row["connections"] == 1:  # one request at a time: latency bounds it, not CPU
            row["cpu_ceiling_rps"] = row["cpu_ceiling_x_direct"] = None
            continue
        key = (row["backend"], row["body"], row["connections"], "direct")
        direct = next(
            r for r in rows if (r["backend"], r["body"], r["connections"], r["variant"]) == key
        )
        best, best_direct = cpu_ceiling(row), cpu_ceiling(direct)
        row["cpu_ceiling_rps"] = best
        row["cpu_ceiling_x_direct"] = best / best_direct if best and best_direct else None
    return rows


def _ratio(
    by_round: dict[int, dict[str, dict[str, Any]]], variant: str, other: str, key: str
) -> float | None:
    """The median over rounds of variant's `key` / other's (None: not both measured, or
    `variant` is direct: the proxies are compared with each other)."""
    return median(_ratios(by_round, variant, other, key))


def _ratios(
    by_round: dict[int, dict[str, dict[str, Any]]], variant: str, other: str, key: str
) -> list[float]:
    """Per round, variant's `key` / other's (see _ratio)."""
    if variant in (other, "direct") and other != "direct":
        return []
    return [
        rv[variant][key] / rv[other][key]
        for rv in by_round.values()
        if variant in rv and other in rv and rv[variant][key] and rv[other][key]
    ]


def cpu_ceiling(row: dict[str, Any]) -> float | None:
    """The most requests per second the CPU time each request costs would allow, if the
    machine's cores were shared perfectly: wrk (one thread), the backend (one process)
    and the proxy (one process) can each use at most one core, and together all of them.
    The proxy's per-request CPU comes on top of the others' on the same cores, so this
    bounds what any proxy on this machine can reach next to a direct connection."""
    costs = [row["loadgen_cpu_us_per_req"], row["backend_cpu_us_per_req"]]
    if row["variant"] != "direct":
        costs.append(row["proxy_cpu_us_per_req"])
    if any(c is None or c <= 0 for c in costs):
        return None
    cores = os.cpu_count() or 1
    return min(min(1e6 / c for c in costs), cores * 1e6 / sum(costs))


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] != "rotator" or row["connections"] == 64:
            continue
        fast = row["backend"] == "fast"
        where = f"{row['backend']} {row['body']} c{row['connections']}"
        if row["connections"] == 16:
            if not fast:
                lines.append(_check(where, "x direct", row["ratio_vs_direct"], ">=", TARGET_RATIO))
            lines.append(
                _check(where, "x nginx", row["ratio_vs_nginx"], ">=", TARGET_VS_NGINX)
                + _rounds_at_least(row["per_round_vs_nginx"], TARGET_VS_NGINX)
            )
            if fast and row["body"] == "short":
                lines.append(
                    _check(where, "x haproxy", row["ratio_vs_haproxy"], ">=", TARGET_VS_NGINX)
                    + _rounds_at_least(row["per_round_vs_haproxy"], TARGET_VS_NGINX)
                )
                lines.append(
                    _check(
                        where, "CPU per request x nginx's", row["cpu_vs_nginx"], "<=",
                        TARGET_FAST_CPU_VS_NGINX,
                    )
                )  # fmt: skip
                lines.extend(_above_floor(rows, row))
        if fast and row["connections"] == 16:
            continue  # at c16 p50 is queueing (the backend is saturated), not the hop
        limit = TARGET_FAST_P50_OVERHEAD_MS if fast else TARGET_P50_OVERHEAD_MS
        lines.append(_check(where, "p50 +ms", row["p50_overhead_ms"], "<", limit, "+.3f"))
    return lines


def _rounds_at_least(ratios: list[float], target: float) -> str:
    """How many rounds met a throughput target on their own: one run's verdict is the
    median's, and the machine's noise moves a round by 5-10%."""
    if len(ratios) < 2:
        return ""
    return f" (per round: {sum(r >= target for r in ratios)} of {len(ratios)})"


def _above_floor(rows: list[dict[str, Any]], mine: dict[str, Any]) -> list[str]:
    """Not a target: how far rotator's CPU per request is above the floor proxies'."""
    key = (mine["backend"], mine["body"], mine["connections"])
    lines = []
    for row in rows:
        if (row["backend"], row["body"], row["connections"]) == key and row["variant"] in FLOOR:
            floor, own = row["proxy_cpu_us_per_req"], mine["proxy_cpu_us_per_req"]
            if floor and own:
                lines.append(
                    f"{key[0]} {key[1]} c{key[2]}: rotator's CPU per request {own:.1f} us, "
                    f"{own - floor:+.1f} us from the {row['variant']} proxy's {floor:.1f} (floor_proxy.py)"
                )
    return lines


def _check(
    where: str, what: str, value: float | None, op: str, target: float, spec: str = ".2f"
) -> str:
    if value is None:
        return f"{where}: rotator {what}: not measured (target {op} {target:g})"
    ok = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return f"{where}: rotator {what} {value:{spec}} (target {op} {target:g}): {'ok' if ok else 'MISSED'}"


def profile_daemon(
    pid: int, url: str, seconds: float, native: bool = False, top: int = 10
) -> dict[str, Any]:
    """py-spy samples the daemon while wrk loads it; the `top` functions by own time.

    Python frames only (the default): py-spy samples without pausing the daemon
    (--nonblocking) and leaves out idle samples; the time spent in uvloop's C
    code (socket reads and writes, polling) shows as the own time of the frame
    that entered the loop, Runner.run. With `native`, C frames too (that needs
    pausing the process for each sample); samples of other threads and of the
    loop waiting in epoll are dropped as idle."""
    assert PYSPY is not None
    raw = RESULTS / f"proxy_profile{'_native' if native else ''}.txt"
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = [PYSPY, "record", "--pid", str(pid), "--duration", f"{seconds + 1:.0f}",
            "--rate", str(PROFILE_RATE), "--format", "raw", "--output", str(raw),
            "--native" if native else "--nonblocking"]  # fmt: skip
    spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)  # attached before the load starts
    load = wrk(url, connections=16, duration=seconds)
    out, _ = spy.communicate(timeout=seconds + 30)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy exited {spy.returncode}: {out.strip()[-500:]}")
    own, inclusive = collections.Counter[str](), collections.Counter[str]()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_function(f) for f in stack.split(";")]
        if native and (
            not any(f.startswith("Runner.run ") for f in frames) or IDLE.match(frames[-1])
        ):
            continue
        total += int(count)
        own[_leaf(frames)] += int(count)
        for name in set(frames):
            inclusive[name] += int(count)
    rows = [
        {"function": name, "own_pct": round(100 * n / total, 1),
         "total_pct": round(100 * inclusive.get(name, n) / total, 1)}
        for name, n in own.most_common(top)
    ]  # fmt: skip
    return {"seconds": seconds, "rate": PROFILE_RATE, "native": native, "samples": total,
            "rps": load.rps, "raw": str(raw), "top_own": rows}  # fmt: skip


def perf_daemon(pid: int, url: str, seconds: float, top: int = 15) -> dict[str, Any]:
    """`perf record` (cpu-clock, every thread of the daemon) while wrk loads it: the share
    of the daemon's CPU by shared object (the kernel, CPython, uvloop, httptools) and the
    `top` symbols by own time. The report is kept in benchmarks/results/proxy_perf.txt."""
    assert PERF is not None
    data = RESULTS / "proxy_perf.data"
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = [PERF, "record", "-e", "cpu-clock", "-F", "999", "-p", str(pid), "-o", str(data),
            "--", "sleep", f"{seconds + 1:.0f}"]  # fmt: skip
    rec = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)  # attached before the load starts
    load = wrk(url, connections=16, duration=seconds)
    out, _ = rec.communicate(timeout=seconds + 30)
    if rec.returncode != 0 or not data.exists():
        raise RuntimeError(f"perf record exited {rec.returncode}: {out.strip()[-500:]}")
    report = subprocess.run(
        [PERF, "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    data.unlink()
    (RESULTS / "proxy_perf.txt").write_text(report.stdout)
    by_dso: dict[str, float] = collections.defaultdict(float)
    symbols = []
    for line in report.stdout.splitlines():
        m = PERF_LINE.match(line)
        if not m:
            continue
        pct = float(m["pct"])
        by_dso[_dso(m["dso"])] += pct
        symbols.append({"symbol": m["sym"], "dso": _dso(m["dso"]), "own_pct": pct})
    return {"seconds": seconds, "rps": load.rps, "raw": str(RESULTS / "proxy_perf.txt"),
            "by_dso": {k: round(v, 1) for k, v in sorted(by_dso.items(), key=lambda kv: -kv[1])},
            "top_own": symbols[:top]}  # fmt: skip


def _dso(name: str) -> str:
    """`/usr/lib/.../libpython3.11.so.1.0` -> `libpython3.11`; `[kernel.kallsyms]` -> `kernel`."""
    base = Path(name).name
    if base.startswith("[kernel"):
        return "kernel"
    return re.sub(r"(\.cpython-[^.]*)?\.so.*$", "", base)


def _function(frame: str) -> str:
    """`on_body (rotator/proxy/protocol.py:123)` -> `on_body (proxy/protocol.py)`."""
    m = FRAME.match(frame)
    if not m:
        return frame
    parts = Path(m["file"]).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else m["file"]
    return f"{m['func']} ({short})"


def _leaf(frames: list[str]) -> str:
    """The top frame; a system call or an unnamed address is named with its caller."""
    leaf = frames[-1]
    if len(frames) > 1 and (leaf.startswith("0x") or "libc" in leaf):
        return f"{leaf.split(' (')[0] if not leaf.startswith('0x') else 'libc'} <- {frames[-2]}"
    return leaf


def summarize_log(lines: list[str]) -> dict[str, Any]:
    """nginx's error.log, in short: how many lines, how many about temp files, a few samples."""
    return {
        "lines": len(lines),
        "temp_file_warnings": sum("temporary file" in line for line in lines),
        "samples": lines[:3],
    }


def fmt(x: float | None, spec: str) -> str | None:
    return None if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 round of 1-2 s runs (smoke test)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per 16-connection run")
    p.add_argument("--profile", type=float, default=10.0, metavar="S",
                   help="seconds of each profile under wrk (0: none)")  # fmt: skip
    p.add_argument("--backend", choices=list(BACKENDS), action="append",
                   help="measure only this backend (repeatable; default: both)")  # fmt: skip
    p.add_argument("--body", choices=list(BODIES), action="append",
                   help="measure only this body (repeatable; default: both)")  # fmt: skip
    p.add_argument("--connections", type=int, choices=CONNECTIONS, action="append",
                   help="measure only at this concurrency (repeatable; default: all)")  # fmt: skip
    args = p.parse_args(argv)
    rounds, profile_seconds = args.rounds, args.profile
    durations = {64: 3.0, 16: args.duration, 1: 3.0}
    if args.quick:
        rounds, profile_seconds = 1, min(args.profile, 3.0)
        durations = {64: 1.0, 16: 2.0, 1: 1.0}
    backends = args.backend or list(BACKENDS)
    bodies = {name: BODIES[name] for name in args.body or BODIES}
    durations = {c: secs for c, secs in durations.items() if c in (args.connections or CONNECTIONS)}
    if WRK is None:
        print(f"{NAME}: skipped: wrk is not installed")
        write_result(NAME, {"skipped": "wrk is not installed", "machine": machine()})
        return 0
    handle_sigterm()
    info = machine()
    try:
        with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
            runs, profiles = run_all(procs, tmp, info, backends, bodies, rounds, durations,
                                     profile_seconds, full=not args.quick)  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see handle_sigterm)
        print(f"{NAME}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    rows = summarize(runs)
    checks = verdicts(rows)
    print()
    print(
        table(
            ["backend", "body", "conns", "variant", "req/s", "x direct", "x nginx", "x haproxy",
             "p50 ms", "p99 ms", "p50 +ms", "CPU us/req: wrk", "backend", "proxy",
             "proxy CPU x nginx", "CPU ceiling x direct", "errors"],
            [
                [r["backend"], r["body"], r["connections"], r["variant"], fmt(r["rps"], ".0f"),
                 fmt(r["ratio_vs_direct"], ".2f"), fmt(r["ratio_vs_nginx"], ".2f"),
                 fmt(r["ratio_vs_haproxy"], ".2f"), fmt(r["p50_ms"], ".3f"),
                 fmt(r["p99_ms"], ".3f"), fmt(r["p50_overhead_ms"], "+.3f"),
                 fmt(r["loadgen_cpu_us_per_req"], ".0f"), fmt(r["backend_cpu_us_per_req"], ".0f"),
                 fmt(r["proxy_cpu_us_per_req"], ".1f"), fmt(r["cpu_vs_nginx"], ".2f"),
                 fmt(r["cpu_ceiling_x_direct"], ".2f"), r["errors"]]
                for r in rows
            ],
        )
    )  # fmt: skip
    print()
    for line in checks:
        print(f"  {line}")
    for profile in profiles:
        if "by_dso" in profile:
            shares = ", ".join(f"{k} {v}%" for k, v in profile["by_dso"].items() if v >= 0.5)
            print(f"\ndaemon profile (perf record, cpu-clock, at {profile['rps']:.0f} req/s): "
                  f"{shares}; top {len(profile['top_own'])} symbols by own time")  # fmt: skip
            print(table(["symbol", "in", "own %"],
                        [[r["symbol"], r["dso"], r["own_pct"]] for r in profile["top_own"]]))  # fmt: skip
            continue
        kind = "Python and C frames" if profile["native"] else "Python frames"
        print(f"\ndaemon profile (py-spy, {kind}, {profile['samples']} busy samples at "
              f"{profile['rps']:.0f} req/s): top {len(profile['top_own'])} by own time")  # fmt: skip
        print(table(["function", "own %", "total %"],
                    [[r["function"], r["own_pct"], r["total_pct"]] for r in profile["top_own"]]))  # fmt: skip
    path = write_result(
        NAME,
        {
            "machine": info,
            "settings": {
                "rounds": rounds,
                "backends": backends,
                "bodies": list(bodies),
                "durations": durations,
                "wrk_threads": 1,
            },
            "summary": rows,
            "targets": checks,
            "profiles": profiles,
            "runs": runs,
        },
    )
    print(f"\n{NAME}: results in {path}")
    return 0


def run_all(
    procs: Processes,
    tmp: Path,
    info: dict[str, Any],
    backends: list[str],
    bodies: dict[str, str],
    rounds: int,
    durations: dict[int, float],
    profile_seconds: float,
    full: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Start rotator (one component per backend), an nginx and an HAProxy per backend,
    measure them all, then profile the daemon; every process is stopped on the way out."""
    listen = {b: free_ports(2) for b in backends}  # public address, instance port
    rot = Rotator(
        procs,
        tmp / "rotator",
        {
            b: {"listen": f"{HOST}:{listen[b][0]}", "ports": [listen[b][1]],
                "command": BACKENDS[b]}
            for b in backends
        },
    )  # fmt: skip
    rot.start()
    info["rotator_event_loop"] = rot.event_loop()
    daemon = [rot.proc.pid] if rot.proc else []
    urls: dict[str, dict[str, str]] = {}
    cpu_of: dict[str, dict[str, list[int]]] = {}
    others: list[Nginx | HAProxy] = []
    for b in backends:
        instance = listen[b][1]
        urls[b] = {
            "direct": f"http://{HOST}:{instance}",
            "rotator": f"http://{HOST}:{listen[b][0]}",
        }
        cpu_of[b] = {"rotator": daemon}
        for variant, kind in (("nginx", Nginx if NGINX else None),
                              ("haproxy", HAProxy if HAPROXY else None)):  # fmt: skip
            if kind is None:
                continue
            port = free_ports(1)[0]
            proxy = kind(procs, tmp / f"{variant}-{b}", port, instance)
            proxy.start()
            others.append(proxy)
            urls[b][variant] = f"http://{HOST}:{port}"
            # nginx: its master and worker; HAProxy: its one process
            workers = proxy.workers() if isinstance(proxy, Nginx) else set()
            cpu_of[b][variant] = [proxy.proc.pid, *workers] if proxy.proc else []
        if b == "fast":  # the floor under rotator's proxy: benchmarks/floor_proxy.py
            for mode in FLOOR:
                port = free_ports(1)[0]
                floor = procs.start([PY, str(FLOOR_PROXY), mode, str(port), str(instance)],
                                    tmp / f"floor-{mode}.out")  # fmt: skip
                wait_http(f"http://{HOST}:{port}/health", proc=floor)
                urls[b][mode] = f"http://{HOST}:{port}"
                cpu_of[b][mode] = [floor.pid]
    missing = [name for name, tool in (("nginx", NGINX), ("haproxy", HAPROXY)) if tool is None]
    if missing:
        print(f"{NAME}: not installed, left out: {', '.join(missing)}")
    pids = {b: check_same_backend(urls[b]) for b in backends}
    print(
        f"{NAME}: backends {', '.join(f'{b} pid {pids[b]}' for b in backends)}; rotator's "
        f"event loop {info['rotator_event_loop']}; {rounds} round(s); seconds per run: "
        + ", ".join(f"c{c} {s:g}" for c, s in durations.items()),
        flush=True,
    )
    runs = measure(urls, cpu_of, pids, rounds, durations, bodies)
    profiles = []
    # The headline is the fast backend: there the proxy's own cost shows.
    load = urls["fast" if "fast" in urls else backends[0]]["rotator"] + BODIES["short"]
    if profile_seconds > 0 and daemon:
        if PYSPY is None:
            print(f"{NAME}: py-spy is not installed (pip install py-spy): no py-spy profile")
        for native in [] if PYSPY is None else [False] if not full else [False, True]:
            print(f"{NAME}: py-spy{' --native' if native else ''} on the daemon (pid "
                  f"{daemon[0]}) during {profile_seconds:g} s of wrk -c16 on {load}",
                  flush=True)  # fmt: skip
            profiles.append(profile_daemon(daemon[0], load, profile_seconds, native))
        if full and PERF is not None:
            print(f"{NAME}: perf record on the daemon during {profile_seconds:g} s of wrk -c16",
                  flush=True)  # fmt: skip
            try:
                profiles.append(perf_daemon(daemon[0], load, profile_seconds))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"{NAME}: perf record failed, no perf profile: {exc}")
    for proxy in others:
        proxy.stop()
    info["nginx_logs"] = [summarize_log(p.warnings()) for p in others if isinstance(p, Nginx)]
    info["haproxy_output"] = [p.output()[:5] for p in others if isinstance(p, HAProxy)]
    rot.stop()
    return runs, profiles


if __name__ == "__main__":
    sys.exit(main())

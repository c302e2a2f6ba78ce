"""What rotator's proxy costs: one demo backend measured with wrk directly, through
rotator, and through nginx, the runs alternated so that all variants share the
machine's noise.

There is exactly one backend process: the instance that rotator starts (pool
of one port). `direct` hits its port, `rotator` the component's public address,
`nginx` an nginx whose upstream is that same port. Each round runs, for each
body (short `/`, 100 KiB `/bytes?n=102400`) and each concurrency (16 connections:
throughput; 1 connection: the latency one hop adds), direct, rotator, nginx in
turn. Reported: medians over rounds, and the median of the per-round ratios.

Then, if py-spy is installed (`pip install py-spy`), one more wrk run (short
body, 16 connections) through rotator while py-spy samples the daemon: the
functions with the most own time (the frame on top of the stack) are printed
and kept in the results; the raw stacks go to benchmarks/results/proxy_profile.txt
(py-spy's collapsed format, for flamegraph tools). A full run samples a second
time with --native, for the C side (uvloop, system calls).

    python benchmarks/proxy_overhead.py [--quick] [--rounds N] [--duration S] [--profile S]
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
    HOST,
    NGINX,
    PY,
    RESULTS,
    WRK,
    Nginx,
    Processes,
    Rotator,
    free_ports,
    handle_sigterm,
    machine,
    median,
    table,
    workdir,
    write_result,
    wrk,
)

NAME = "proxy_overhead"
BODIES = {"short": "/", "100KiB": "/bytes?n=102400"}
BODY_BYTES = 102400
# Targets, printed next to the figures (c16 = the throughput runs).
TARGET_RATIO = 0.8  # rotator req/s >= 0.8x direct
TARGET_VS_NGINX = 1.0  # rotator req/s >= nginx's
TARGET_P50_OVERHEAD_MS = 0.3
PYSPY = shutil.which("py-spy") or next(
    (str(p) for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), None
)
PROFILE_RATE = 250  # samples/s
IDLE = re.compile(r"^(epoll_p?wait|epoll_wait|kevent|select|poll) ")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


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


def cpu_seconds(pids: list[int], children: bool = False) -> float:
    """CPU time (user + system) of these processes, and of their children if asked."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [proc, *(proc.children(recursive=True) if children else [])]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
    return total


def measure(
    urls: dict[str, str],
    cpu_of: dict[str, list[int]],
    backend: int,
    rounds: int,
    duration: float,
    c1_duration: float,
) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for path in BODIES.values():  # warm-up: connection pools, page cache, allocators
        for url in urls.values():
            wrk(url + path, connections=16, duration=1)
    for rnd in range(1, rounds + 1):
        for body, path in BODIES.items():
            for conns, secs in ((16, duration), (1, c1_duration)):
                for variant, url in urls.items():
                    # rotator: the daemon alone (the backend is its child); nginx: master + workers
                    proxy_pids = cpu_of.get(variant, [])
                    tree = variant == "nginx"
                    before = (cpu_seconds([backend]), cpu_seconds(proxy_pids, tree))
                    r = wrk(url + path, connections=conns, duration=secs)
                    after = (cpu_seconds([backend]), cpu_seconds(proxy_pids, tree))
                    per_req = 1e6 / max(r.requests, 1)
                    run = {
                        "round": rnd,
                        "body": body,
                        "connections": conns,
                        "variant": variant,
                        "rps": r.rps,
                        "requests": r.requests,
                        "p50_ms": r.p50_ms,
                        "p99_ms": r.p99_ms,
                        "errors": r.errors,
                        "socket_errors": r.socket_errors,
                        "non_2xx": r.non_2xx,
                        "loadgen_cpu_us_per_req": round(r.cpu_seconds * per_req, 1),
                        "backend_cpu_us_per_req": round((after[0] - before[0]) * per_req, 1),
                        "proxy_cpu_us_per_req": round((after[1] - before[1]) * per_req, 1)
                        if proxy_pids
                        else None,
                    }
                    runs.append(run)
                    print(
                        f"  round {rnd} {body:>6} c{conns:<2} {variant:>7}: {r.rps:9.0f} req/s  "
                        f"p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms"
                        + (f"  ERRORS {r.errors}" if r.errors else ""),
                        flush=True,
                    )
    return runs


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    groups = sorted(
        {(r["body"], r["connections"]) for r in runs},
        key=lambda g: (list(BODIES).index(g[0]), -g[1]),
    )
    for body, conns in groups:
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in runs:
            if (r["body"], r["connections"]) == (body, conns):
                by_round.setdefault(r["round"], {})[r["variant"]] = r
        for variant in variants:
            mine = [rv[variant] for rv in by_round.values() if variant in rv]
            ratios = [rv[variant]["rps"] / rv["direct"]["rps"] for rv in by_round.values()]
            p50_over = [rv[variant]["p50_ms"] - rv["direct"]["p50_ms"] for rv in by_round.values()]
            vs_nginx = [
                rv[variant]["rps"] / rv["nginx"]["rps"] for rv in by_round.values() if "nginx" in rv
            ]
            proxy_cpu = [
                r["proxy_cpu_us_per_req"] for r in mine if r["proxy_cpu_us_per_req"] is not None
            ]
            rows.append(
                {
                    "body": body,
                    "connections": conns,
                    "variant": variant,
                    "rps": median([r["rps"] for r in mine]),
                    "p50_ms": median([r["p50_ms"] for r in mine]),
                    "p99_ms": median([r["p99_ms"] for r in mine]),
                    "ratio_vs_direct": median(ratios),
                    "p50_overhead_ms": median(p50_over),
                    "ratio_vs_nginx": median(vs_nginx) if variant != "nginx" and vs_nginx else None,
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
        direct = next(
            r for r in rows
            if (r["body"], r["connections"], r["variant"]) == (row["body"], row["connections"], "direct")
        )  # fmt: skip
        best, best_direct = cpu_ceiling(row), cpu_ceiling(direct)
        row["cpu_ceiling_rps"] = best
        row["cpu_ceiling_x_direct"] = best / best_direct if best and best_direct else None
    return rows


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
        if row["variant"] != "rotator":
            continue
        where = f"{row['body']} c{row['connections']}"
        ratio, over, vs = row["ratio_vs_direct"], row["p50_overhead_ms"], row["ratio_vs_nginx"]
        if row["connections"] == 16:
            ok = "ok" if ratio >= TARGET_RATIO else "MISSED"
            lines.append(f"{where}: rotator {ratio:.2f}x direct (target >= {TARGET_RATIO}x): {ok}")
            if vs is not None:
                ok = "ok" if vs >= TARGET_VS_NGINX else "MISSED"
                lines.append(
                    f"{where}: rotator {vs:.2f}x nginx (target >= {TARGET_VS_NGINX:g}x): {ok}"
                )
        ok = "ok" if over < TARGET_P50_OVERHEAD_MS else "MISSED"
        lines.append(
            f"{where}: p50 overhead {over:+.3f} ms (target < {TARGET_P50_OVERHEAD_MS} ms): {ok}"
        )
    return lines


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
    p.add_argument("--quick", action="store_true", help="1 round of 2 s runs (smoke test)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per 16-connection run")
    p.add_argument("--profile", type=float, default=10.0, metavar="S",
                   help="seconds of py-spy sampling under wrk (0: none)")  # fmt: skip
    args = p.parse_args(argv)
    rounds, duration, c1_duration = args.rounds, args.duration, 3.0
    profile_seconds = args.profile
    if args.quick:
        rounds, duration, c1_duration, profile_seconds = 1, 2.0, 1.0, min(args.profile, 3.0)
    if WRK is None:
        print(f"{NAME}: skipped: wrk is not installed")
        write_result(NAME, {"skipped": "wrk is not installed", "machine": machine()})
        return 0
    handle_sigterm()
    info = machine()
    try:
        with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
            listen, instance_port, nginx_port = free_ports(3)
            command = f"{PY} -m rotator.demo --port {{port}} --name web"
            rot = Rotator(
                procs,
                tmp / "rotator",
                {
                    "web": {
                        "listen": f"{HOST}:{listen}",
                        "ports": [instance_port],
                        "command": command,
                    }
                },
            )
            rot.start()
            info["rotator_event_loop"] = rot.event_loop()
            urls = {
                "direct": f"http://{HOST}:{instance_port}",
                "rotator": f"http://{HOST}:{listen}",
            }
            cpu_of = {"rotator": [rot.proc.pid] if rot.proc else []}
            nginx = None
            if NGINX is not None:
                nginx = Nginx(procs, tmp / "nginx", nginx_port, instance_port)
                nginx.start()
                urls["nginx"] = f"http://{HOST}:{nginx_port}"
                cpu_of["nginx"] = [nginx.proc.pid] if nginx.proc else []
            else:
                print(f"{NAME}: nginx is not installed: measuring direct and rotator only")
            backend = check_same_backend(urls)
            print(
                f"{NAME}: backend pid {backend} on :{instance_port}; rotator on :{listen} "
                f"(event loop {info['rotator_event_loop']})"
                + (f"; nginx on :{nginx_port}" if nginx else "")
                + f"; {rounds} round(s), {duration:g} s per c16 run, {c1_duration:g} s per c1 run",
                flush=True,
            )
            runs = measure(urls, cpu_of, backend, rounds, duration, c1_duration)
            profiles = []
            if profile_seconds > 0 and PYSPY is None:
                print(f"{NAME}: py-spy is not installed (pip install py-spy): no profile")
            elif profile_seconds > 0 and rot.proc is not None:
                for native in [False] if args.quick else [False, True]:
                    print(f"{NAME}: py-spy{' --native' if native else ''} on the daemon "
                          f"(pid {rot.proc.pid}) during {profile_seconds:g} s of wrk -c16, "
                          "short body", flush=True)  # fmt: skip
                    profiles.append(profile_daemon(rot.proc.pid, urls["rotator"] + BODIES["short"],
                                                   profile_seconds, native))  # fmt: skip
            if nginx is not None:
                nginx.stop()
                info["nginx_log"] = summarize_log(nginx.warnings())
            rot.stop()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see handle_sigterm)
        print(f"{NAME}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    rows = summarize(runs, list(urls))
    checks = verdicts(rows)
    print()
    print(
        table(
            [
                "body",
                "conns",
                "variant",
                "req/s",
                "x direct",
                "x nginx",
                "p50 ms",
                "p99 ms",
                "p50 +ms",
                "CPU us/req: wrk",
                "backend",
                "proxy",
                "CPU ceiling x direct",
                "errors",
            ],
            [
                [
                    r["body"],
                    r["connections"],
                    r["variant"],
                    fmt(r["rps"], ".0f"),
                    fmt(r["ratio_vs_direct"], ".2f"),
                    fmt(r["ratio_vs_nginx"], ".2f"),
                    fmt(r["p50_ms"], ".3f"),
                    fmt(r["p99_ms"], ".3f"),
                    fmt(r["p50_overhead_ms"], "+.3f"),
                    fmt(r["loadgen_cpu_us_per_req"], ".0f"),
                    fmt(r["backend_cpu_us_per_req"], ".0f"),
                    fmt(r["proxy_cpu_us_per_req"], ".0f"),
                    fmt(r["cpu_ceiling_x_direct"], ".2f"),
                    r["errors"],
                ]
                for r in rows
            ],
        )
    )
    print()
    for line in checks:
        print(f"  {line}")
    for profile in profiles:
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
                "duration_c16": duration,
                "duration_c1": c1_duration,
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


if __name__ == "__main__":
    sys.exit(main())

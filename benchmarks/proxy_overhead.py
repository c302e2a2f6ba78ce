"""What rotator's proxy costs: one demo backend measured with wrk directly, through
rotator, and through nginx, the runs alternated so that all variants share the
machine's noise.

There is exactly one backend process: the instance that rotator starts (pool
of one port). `direct` hits its port, `rotator` the component's public address,
`nginx` an nginx whose upstream is that same port. Each round runs, for each
body (short `/`, 100 KiB `/bytes?n=102400`) and each concurrency (16 connections:
throughput; 1 connection: the latency one hop adds), direct, rotator, nginx in
turn. Reported: medians over rounds, and the median of the per-round ratios.

    python benchmarks/proxy_overhead.py [--quick] [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import urllib.request
from typing import Any

import psutil
from benchlib import (
    HOST,
    NGINX,
    PY,
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
                    "backend_cpu_us_per_req": median([r["backend_cpu_us_per_req"] for r in mine]),
                    "proxy_cpu_us_per_req": median(proxy_cpu),
                    "errors": sum(r["errors"] for r in mine),
                    "rounds": len(mine),
                }
            )
    return rows


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
    args = p.parse_args(argv)
    rounds, duration, c1_duration = args.rounds, args.duration, 3.0
    if args.quick:
        rounds, duration, c1_duration = 1, 2.0, 1.0
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
                "proxy CPU us/req",
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
                    fmt(r["proxy_cpu_us_per_req"], ".0f"),
                    r["errors"],
                ]
                for r in rows
            ],
        )
    )
    print()
    for line in checks:
        print(f"  {line}")
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
            "runs": runs,
        },
    )
    print(f"\n{NAME}: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

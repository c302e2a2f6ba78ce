"""Run every benchmark, each in a process of its own with a time limit, then a summary.

Started by `benchmarks/run`. Each benchmark writes benchmarks/results/<name>.json
and cleans up after itself; this runner also stops a benchmark that overruns
its limit (SIGTERM, which it turns into its normal cleanup, then SIGKILL) and
kills anything still carrying that benchmark's tag afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchlib import RESULTS, RUN_ENV, handle_sigterm, machine, sweep, table

HERE = Path(__file__).resolve().parent
# name: (time limit of a full run, of a --quick run), seconds
BENCHMARKS = {
    "proxy_overhead": (1200.0, 240.0),
    "restart_under_load": (720.0, 240.0),
    "switch_latency": (240.0, 120.0),
    "memory": (300.0, 120.0),
    "scale": (600.0, 300.0),
    "replicas": (420.0, 120.0),
}


def run_one(name: str, extra: list[str], limit: float) -> int | str:
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, str(HERE / f"{name}.py"), *extra],
        env={**os.environ, RUN_ENV: tag},
        start_new_session=True,  # Ctrl-C reaches us; we pass it on as SIGTERM
    )
    outcome: int | str
    try:
        outcome = proc.wait(limit)
    except subprocess.TimeoutExpired:
        outcome = f"stopped after its limit of {limit:g}s"
    except KeyboardInterrupt:
        outcome = "interrupted"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        leaked = sweep(RUN_ENV, tag)
        if leaked:
            print(f"runner: {name} left processes behind, killed: {leaked}", file=sys.stderr)
    return outcome


def load(name: str, since: float) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists() or path.stat().st_mtime < since:
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def summary(started: float) -> None:
    proxy = load("proxy_overhead", started)
    if proxy and "summary" in proxy:
        rows = [r for r in proxy["summary"] if r["connections"] == 16]
        print("proxy overhead (wrk -t1 -c16, medians):")
        print(
            table(
                ["backend", "body", "variant", "req/s", "x direct", "p50 ms", "p99 ms",
                 "proxy CPU us/req"],
                [
                    [
                        r.get("backend", "typical"),
                        r["body"],
                        r["variant"],
                        f"{r['rps']:.0f}",
                        f"{r['ratio_vs_direct']:.2f}" if r["ratio_vs_direct"] else "",
                        f"{r['p50_ms']:.3f}",
                        f"{r['p99_ms']:.3f}",
                        r["proxy_cpu_us_per_req"],
                    ]
                    for r in rows
                ],
            )
        )  # fmt: skip
        for line in proxy.get("targets", []):
            print(f"  {line}")
        print()
    restart = load("restart_under_load", started)
    if restart and "scenarios" in restart:
        print("restart under load:")
        print(
            table(
                ["round", "load", "scenario", "requests", "failed", "longest gap ms",
                 "median gap at a switch", "same at rest", "p99 ms", "p99 restarting",
                 "switch ms"],
                [
                    [
                        r["round"],
                        r["load"],
                        r["scenario"],
                        r["requests"],
                        r["failed"],
                        f"{r['longest_gap_ms']:.1f}",
                        r.get("gap_at_switch_ms_median"),
                        r.get("gap_at_rest_ms_median"),
                        r["p99_ms"],
                        r["p99_rotating_ms"],
                        r["switch"]["switch_ms_median"],
                    ]
                    for r in restart["scenarios"]
                ],
            )
        )  # fmt: skip
        for line in restart.get("targets", []):
            print(f"  {line}")
    switch = load("switch_latency", started)
    if switch and "medians" in switch:
        m = switch["medians"]
        print(
            f"\nswitch latency: median {m['switch_ms']} ms; `rotator restart` {m['wall_ms']} ms, "
            f"{m['wall_minus_startup_ms']} ms of it not the backend's own start-up"
        )
        for line in switch.get("targets", []):
            print(f"  {line}")

    memory = load("memory", started)
    if memory and "transfers" in memory:
        print(
            f"\nmemory: daemon RSS at rest {memory['idle_rss_mib']} MiB "
            f"({memory['idle_rss_15_components_mib']} MiB with 15 components)"
        )
        for r in memory["transfers"]:
            print(f"  {r['transfer']} {r['mib']} MiB: peak {r['peak_over_idle_mib']} MiB over idle")
        for line in memory.get("targets", []):
            print(f"  {line}")
    scale = load("scale", started)
    if scale and "idle" in scale:
        startup = ", ".join(f"{k} {v} s" for k, v in scale["startup_median_seconds"].items())
        print(f"\nscale: start-up to all running (median): {startup}")
        for line in scale.get("targets", []):
            print(f"  {line}")
    replicas = load("replicas", started)
    if replicas and "summary" in replicas:
        print(
            "\nreplicas of a one-at-a-time 20 ms backend (wrk, 4 connections per replica, medians):"
        )
        print(
            table(
                ["fleet", "variant", "req/s", "x N x one replica", "p50 ms", "p99 ms",
                 "shares %"],
                [
                    [
                        r["fleet"],
                        r["variant"],
                        f"{r['rps']:.1f}",
                        f"{r['efficiency']:.2f}" if r["efficiency"] else "",
                        f"{r['p50_ms']:.1f}",
                        f"{r['p99_ms']:.1f}",
                        "/".join(f"{v:.0f}" for v in r["shares_pct"]),
                    ]
                    for r in replicas["summary"]
                ],
            )
        )  # fmt: skip
        for line in replicas.get("targets", []):
            print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run", description="Run rotator's benchmarks.")
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    p.add_argument("--only", choices=list(BENCHMARKS), action="append", help="repeatable")
    args = p.parse_args(argv)
    handle_sigterm()
    info = machine()
    print(
        f"machine: {info['nproc']} cpu(s), python {info['python']}, uvloop {info['uvloop'] or 'no'}, "
        f"{info['wrk'] or 'no wrk'}, {info['nginx'] or 'no nginx'}, load {info['load_average']}",
        flush=True,
    )
    started = time.time()
    failed: list[str] = []
    try:
        for name in args.only or list(BENCHMARKS):
            full, quick = BENCHMARKS[name]
            print(f"\n== {name}", flush=True)
            outcome = run_one(
                name, ["--quick"] if args.quick else [], quick if args.quick else full
            )
            if outcome != 0:
                failed.append(
                    f"{name}: {outcome if isinstance(outcome, str) else f'exit {outcome}'}"
                )
                if outcome == "interrupted":
                    break
    except KeyboardInterrupt:
        failed.append("interrupted")
    print("\n== summary")
    summary(started)
    for line in failed:
        print(f"runner: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

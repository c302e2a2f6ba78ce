"""What replicas buy: the throughput of 1, 2 and 4 replicas of a one-request-at-a-time
backend, and the latency of a fleet with one slow replica, through rotator and through
nginx balancing over the very same replicas.

The backend (benchmarks/serial_backend.py) is the stdlib's single-threaded HTTPServer:
each process serves one request at a time and each request takes 20 ms (a sleep, so
the machine's cores bound nothing), which caps one replica at 50 requests/s. rotator
runs four components: `r1`, `r2` and `r4` with `replicas: 1, 2, 4`, and `skewed`,
4 replicas of which slot 0 (`{replica}` in its command) takes 200 ms per request.
For each fleet, nginx (one worker) balances over the ports of its replicas as
`rotator status --json` lists them: `least_conn` for every fleet, and its default
round-robin for the skewed one too. Each round runs every fleet's variants in turn
(the order rotated from one round to the next), with wrk at 4 connections per
replica: enough to keep every replica busy (see CONNECTIONS_PER_REPLICA).

Reported, medians over rounds: requests/s, p50 and p99 (wrk's, on the run's
requests), how far N replicas scale (per round, N replicas' requests/s over N times
one replica's, through the same proxy), and each replica's share of the requests and
the share of the run it was busy (from the replica's own counters, GET /stats).

    python benchmarks/replicas.py [--quick] [--rounds N] [--duration S] [--skewed-duration S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DEFAULTS,
    HOST,
    NGINX,
    PY,
    ROOT,
    WRK,
    Nginx,
    Processes,
    Rotator,
    free_ports,
    handle_sigterm,
    http_get_json,
    machine,
    median,
    table,
    workdir,
    write_result,
    wrk,
)

NAME = "replicas"
BACKEND = ROOT / "benchmarks" / "serial_backend.py"
DELAY = 0.02  # seconds per request: one replica serves at most 50 requests/s
SLOW_DELAY = 0.2  # the skewed fleet's slow replica: 10x
SLOW_SLOT = 0  # the first of the set: the one a naive balancer would favour
SIZES = (1, 2, 4)
SKEWED_REPLICAS = 4
# Little's law: a replica stays busy only while a request waits for it when the last
# one is done. With one connection per replica, each answer would leave its replica
# idle for a round trip through wrk and the proxy; with 4, three wait in its queue
# (the listen backlog) while one is served, so it never idles, and p50 stays near
# 4 x 20 ms (queueing time, which more connections would only lengthen).
CONNECTIONS_PER_REPLICA = 4
# wrk leaves answers slower than its timeout out of its latency figures (counting them
# as errors); under round-robin the slow replica's queue holds ~3 s of requests.
WRK_TIMEOUT = 30.0
# A probe waits in a replica's queue like any request: the skewed fleet's slow one holds
# ~0.8 s of requests under least-outstanding balancing, ~3 s under nginx's round-robin.
# Above that, so that no replica leaves the set (and is replaced) mid-benchmark.
DEFAULTS: dict[str, Any] = {
    **BENCH_DEFAULTS,
    "health": {"interval": "1s", "timeout": "10s", "start_timeout": "15s"},
}
TARGET_EFFICIENCY = 0.9  # N replicas >= 0.9 x N x one replica's requests/s


@dataclass(frozen=True)
class Fleet:
    """One component, and how the benchmark loads it."""

    name: str
    replicas: int
    skewed: bool
    duration: float

    @property
    def connections(self) -> int:
        return CONNECTIONS_PER_REPLICA * self.replicas

    @property
    def ideal_rps(self) -> float:
        """What the replicas could serve if each spent on a request only its wait."""
        if self.skewed:
            return (self.replicas - 1) / DELAY + 1 / SLOW_DELAY
        return self.replicas / DELAY

    def command(self) -> str:
        slow = f" --slow-replica {SLOW_SLOT} --slow-delay {SLOW_DELAY:g}" if self.skewed else ""
        return f"{PY} {BACKEND} --port {{port}} --replica {{replica}} --delay {DELAY:g}{slow}"


def fleets(duration: float, skewed_duration: float, sizes: tuple[int, ...] = SIZES) -> list[Fleet]:
    return [Fleet(f"r{n}", n, False, duration) for n in sizes] + [
        Fleet("skewed", SKEWED_REPLICAS, True, skewed_duration)
    ]


def instances(rot: Rotator) -> dict[str, list[dict[str, Any]]]:
    """Each component's replicas, in slot order, as `rotator status --json` lists them."""
    done = rot.cli("status", "--json", timeout=15)
    if done.returncode != 0:
        raise RuntimeError(f"rotator status --json failed: {done.stderr}")
    components = json.loads(done.stdout)["components"]
    return {c["name"]: sorted(c["instances"], key=lambda i: i["replica"]) for c in components}


def check_reach(url: str, pids: list[int], requests: int) -> None:
    """Sequential requests through one variant reach every replica, and only those."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    seen = set()
    for _ in range(requests):
        with opener.open(url, timeout=10) as resp:
            seen.add(int(resp.headers["X-Instance-Pid"]))
    if seen != set(pids):
        raise RuntimeError(f"{url} reached pids {sorted(seen)}, the replicas are {sorted(pids)}")


def replica_stats(ports: list[int]) -> list[dict[str, Any]]:
    """Each replica's own counters, asked of all at once. A replica answers after the
    requests queued before this one: the run's leftovers are served by the time this
    returns, and each replica's `at` is when its own were."""

    def one(port: int) -> dict[str, Any]:
        stat: dict[str, Any] = http_get_json(f"http://{HOST}:{port}/stats", timeout=60)
        stat["at"] = time.monotonic()
        return stat

    with ThreadPoolExecutor(len(ports)) as pool:
        return list(pool.map(one, ports))


def measure(
    plan: list[Fleet],
    urls: dict[str, dict[str, str]],
    ports: dict[str, list[int]],
    rounds: int,
    warm_up: bool = True,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for fleet in plan if warm_up else ():  # the interpreters' caches, the proxies' first paths
        for url in urls[fleet.name].values():
            wrk(url, connections=fleet.connections, duration=1, timeout=WRK_TIMEOUT)
        replica_stats(ports[fleet.name])
    for rnd in range(1, rounds + 1):
        for fleet in plan:
            variants = list(urls[fleet.name])
            turn = (rnd - 1) % len(variants)
            for variant in variants[turn:] + variants[:turn]:
                run = measure_one(fleet, urls[fleet.name][variant], ports[fleet.name])
                run.update(round=rnd, variant=variant)
                runs.append(run)
                if verbose:
                    print(
                        f"  round {rnd} {fleet.name:>6} c{fleet.connections:<2} {variant:>16}: "
                        f"{run['rps']:6.1f} req/s  p50 {run['p50_ms']:7.1f} ms  "
                        f"p99 {run['p99_ms']:7.1f} ms  shares {run['shares_pct']}"
                        + (f"  ERRORS {run['errors']}" if run["errors"] else ""),
                        flush=True,
                    )
    return runs


def measure_one(fleet: Fleet, url: str, ports: list[int]) -> dict[str, Any]:
    """One wrk run; each replica's requests served and the share of the run it was busy,
    from its own counters, from just before the run until its own queue was served."""
    before = replica_stats(ports)
    r = wrk(url, connections=fleet.connections, duration=fleet.duration, timeout=WRK_TIMEOUT)
    after = replica_stats(ports)
    served = [a["served"] - b["served"] for a, b in zip(after, before, strict=True)]
    busy = [
        (a["busy"] - b["busy"]) / (a["at"] - b["at"]) for a, b in zip(after, before, strict=True)
    ]
    total = sum(served) or 1
    return {
        "fleet": fleet.name,
        "replicas": fleet.replicas,
        "skewed": fleet.skewed,
        "connections": fleet.connections,
        "ideal_rps": fleet.ideal_rps,
        "rps": r.rps,
        "requests": r.requests,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "errors": r.errors,
        "socket_errors": r.socket_errors,
        "non_2xx": r.non_2xx,
        "served": served,
        "shares_pct": [round(100 * s / total, 1) for s in served],
        "busy_pct": [round(100 * b, 1) for b in busy],
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for fleet, variant in dict.fromkeys((r["fleet"], r["variant"]) for r in runs):
        mine = [r for r in runs if (r["fleet"], r["variant"]) == (fleet, variant)]
        first = mine[0]
        served = [sum(col) for col in zip(*(r["served"] for r in mine), strict=True)]
        total = sum(served) or 1
        rows.append(
            {
                "fleet": fleet,
                "replicas": first["replicas"],
                "skewed": first["skewed"],
                "connections": first["connections"],
                "variant": variant,
                "rps": median([r["rps"] for r in mine]),
                "p50_ms": median([r["p50_ms"] for r in mine]),
                "p99_ms": median([r["p99_ms"] for r in mine]),
                "x_ideal": median([r["rps"] / r["ideal_rps"] for r in mine]),
                "efficiency": None
                if first["skewed"]
                else _per_round(runs, (fleet, variant), ("r1", variant), first["replicas"]),
                "rps_x_nginx": _per_round(runs, (fleet, variant), (fleet, "nginx least_conn"), 1),
                "p99_x_nginx": _per_round(
                    runs, (fleet, variant), (fleet, "nginx least_conn"), 1, "p99_ms"
                ),
                "shares_pct": [round(100 * s / total, 1) for s in served],
                "busy_pct": [median([r["busy_pct"][i] for r in mine]) for i in range(len(served))],
                "errors": sum(r["errors"] for r in mine),
                "rounds": len(mine),
            }
        )
    return rows


def _per_round(
    runs: list[dict[str, Any]],
    mine: tuple[str, str],
    other: tuple[str, str],
    times: int,
    key: str = "rps",
) -> float | None:
    """Median over rounds of mine's `key` / (`times` x other's), each pair from one round;
    None where mine is other (a variant is not compared with itself)."""
    if mine == other and times == 1:
        return None
    by = {(r["round"], r["fleet"], r["variant"]): r[key] for r in runs}
    ratios = [
        value / (times * by[(rnd, *other)])
        for (rnd, *this), value in by.items()
        if tuple(this) == mine and by.get((rnd, *other))
    ]
    return median(ratios)


def verdicts(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] != "rotator":
            continue
        if not row["skewed"] and row["replicas"] > 1:
            eff = row["efficiency"]
            ok = eff is not None and eff >= TARGET_EFFICIENCY
            lines.append(
                f"{row['replicas']} replicas: rotator {eff:.2f} x N x one replica's req/s "
                f"(target >= {TARGET_EFFICIENCY:g}): {'ok' if ok else 'MISSED'}"
            )
        if row["skewed"]:
            nginx = next(
                (r for r in rows if (r["fleet"], r["variant"]) == (row["fleet"], "nginx least_conn")),
                None,
            )  # fmt: skip
            if nginx is None:
                lines.append("skewed fleet: rotator p99 vs nginx least_conn's: not measured")
                continue
            mine = [r for r in runs if (r["fleet"], r["variant"]) == (row["fleet"], "rotator")]
            theirs = {
                r["round"]: r["p99_ms"]
                for r in runs
                if (r["fleet"], r["variant"]) == (row["fleet"], "nginx least_conn")
            }
            wins = sum(r["p99_ms"] <= theirs.get(r["round"], 0) for r in mine)
            ok = row["p99_ms"] <= nginx["p99_ms"]
            lines.append(
                f"skewed fleet: rotator p99 {row['p99_ms']:.1f} ms vs nginx least_conn's "
                f"{nginx['p99_ms']:.1f} ms ({row['p99_ms'] - nginx['p99_ms']:+.1f} ms; target <=; "
                f"met in {wins} round(s) of {len(mine)}): {'ok' if ok else 'MISSED'}"
            )
    errors = sum(r["errors"] for r in rows)
    lines.append(f"errors (wrk's socket errors and non-2xx): {errors} (target 0): "
                 f"{'ok' if errors == 0 else 'MISSED'}")  # fmt: skip
    return lines


def fmt(x: float | None, spec: str) -> str | None:
    return None if x is None else format(x, spec)


def print_tables(rows: list[dict[str, Any]], checks: list[str]) -> None:
    scaling = [r for r in rows if not r["skewed"]]
    print(
        table(
            ["replicas", "conns", "variant", "req/s", "x N x one replica", "x ideal",
             "x nginx lc", "p50 ms", "p99 ms", "shares %", "busy %", "errors"],
            [[r["replicas"], r["connections"], r["variant"], fmt(r["rps"], ".1f"),
              fmt(r["efficiency"], ".2f"), fmt(r["x_ideal"], ".2f"), fmt(r["rps_x_nginx"], ".2f"),
              fmt(r["p50_ms"], ".1f"), fmt(r["p99_ms"], ".1f"), _list(r["shares_pct"]),
              _list(r["busy_pct"]), r["errors"]] for r in scaling],
        )
    )  # fmt: skip
    skewed = [r for r in rows if r["skewed"]]
    if skewed:
        print(f"\nskewed fleet: {SKEWED_REPLICAS} replicas, slot {SLOW_SLOT} takes "
              f"{SLOW_DELAY * 1000:g} ms, the others {DELAY * 1000:g} ms")  # fmt: skip
        print(
            table(
                ["variant", "conns", "req/s", "x ideal", "p50 ms", "p99 ms", "p99 x nginx lc",
                 "slow replica's share %", "shares %", "busy %", "errors"],
                [[r["variant"], r["connections"], fmt(r["rps"], ".1f"), fmt(r["x_ideal"], ".2f"),
                  fmt(r["p50_ms"], ".1f"),
                  fmt(r["p99_ms"], ".1f"), fmt(r["p99_x_nginx"], ".2f"),
                  r["shares_pct"][SLOW_SLOT], _list(r["shares_pct"]), _list(r["busy_pct"]),
                  r["errors"]] for r in skewed],
            )
        )  # fmt: skip
    print()
    for line in checks:
        print(f"  {line}")


def _list(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def run_all(
    procs: Processes,
    tmp: Path,
    plan: list[Fleet],
    rounds: int,
    full: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Start rotator (one component per fleet) and an nginx per fleet and balancing method,
    measure them, check that no replica was replaced meanwhile; everything is stopped on
    the way out (by `procs`)."""
    components = {}
    for fleet in plan:
        listen, *pool = free_ports(fleet.replicas + 3)
        components[fleet.name] = {
            "listen": f"{HOST}:{listen}",
            "ports": pool,  # replicas + 2: a rotation needs one more, and one spare
            "replicas": fleet.replicas,
            "command": fleet.command(),
        }
    rot = Rotator(procs, tmp / "rotator", components, defaults=DEFAULTS)
    rot.start()
    fleet_before = instances(rot)
    urls: dict[str, dict[str, str]] = {}
    ports: dict[str, list[int]] = {}
    nginxes = []
    for fleet in plan:
        replicas = fleet_before[fleet.name]
        if len(replicas) != fleet.replicas or not all(i["healthy"] for i in replicas):
            raise RuntimeError(f"{fleet.name}: expected {fleet.replicas} healthy: {replicas}")
        ports[fleet.name] = [i["port"] for i in replicas]
        urls[fleet.name] = {"rotator": rot.url(fleet.name)}
        methods = {"nginx least_conn": "least_conn"}
        if fleet.skewed:
            methods["nginx round-robin"] = ""
        for variant, method in methods.items() if NGINX else ():
            port = free_ports(1)[0]
            nginx = Nginx(
                procs, tmp / f"nginx-{fleet.name}-{method or 'rr'}", port, ports[fleet.name][0]
            )
            nginx.set_upstreams(ports[fleet.name], method, reload=False)
            nginx.start()
            nginxes.append(nginx)
            urls[fleet.name][variant] = f"http://{HOST}:{port}"
        pids = [i["pid"] for i in replicas]
        for url in urls[fleet.name].values():
            check_reach(url + "/", pids, 2 * fleet.replicas)
    if NGINX is None:
        print(f"{NAME}: nginx is not installed: rotator only")
    if verbose:
        print(
            f"{NAME}: " + "; ".join(
                f"{f.name} ({f.replicas} replica{'s' if f.replicas > 1 else ''}) on ports "
                f"{','.join(map(str, ports[f.name]))}" for f in plan
            ) + f"; {rounds} round(s)",
            flush=True,
        )  # fmt: skip
    runs = measure(plan, urls, ports, rounds, warm_up=full, verbose=verbose)
    fleet_after = instances(rot)
    replaced = {
        name: [i["pid"] for i in fleet_after[name]]
        for name, replicas in fleet_before.items()
        if [(i["pid"], i["healthy"]) for i in replicas]
        != [(i["pid"], True) for i in fleet_after[name]]
    }
    for nginx in nginxes:
        nginx.stop()
    warnings = [line for n in nginxes for line in n.warnings()]
    rot.stop()
    return {"runs": runs, "fleet": fleet_before, "replaced": replaced, "nginx_log": warnings[:10]}


def smoke(directory: Path) -> dict[str, Any]:
    """One round of 1 s runs, quietly, without the 4-replica fleet (the same code as 2):
    what the test suite runs (tests/integration/test_benchmark_smoke.py). Nothing timed
    is checked there."""
    plan = fleets(1.0, 1.0, sizes=(1, 2))
    with Processes(directory) as procs:
        result = run_all(procs, directory, plan, rounds=1, full=False, verbose=False)
    result["summary"] = summarize(result["runs"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 round of 1 s runs (smoke test)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run, 1-4 replicas")
    p.add_argument("--skewed-duration", type=float, default=10.0,
                   help="seconds per run, the skewed fleet")  # fmt: skip
    args = p.parse_args(argv)
    rounds, plan = args.rounds, fleets(args.duration, args.skewed_duration)
    if args.quick:
        rounds, plan = 1, fleets(1.0, 1.0)
    if WRK is None:
        print(f"{NAME}: skipped: wrk is not installed")
        write_result(NAME, {"skipped": "wrk is not installed", "machine": machine()})
        return 0
    handle_sigterm()
    info = machine()
    try:
        with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
            result = run_all(procs, tmp, plan, rounds, full=not args.quick)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see handle_sigterm)
        print(f"{NAME}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    info["load_average_after"] = machine()["load_average"]
    rows = summarize(result["runs"])
    checks = verdicts(rows, result["runs"])
    if result["replaced"]:
        checks.append(f"replicas replaced during the run (figures not valid): {result['replaced']}")
    print()
    print_tables(rows, checks)
    path = write_result(
        NAME,
        {
            "machine": info,
            "settings": {
                "rounds": rounds,
                "delay_s": DELAY,
                "slow_delay_s": SLOW_DELAY,
                "slow_slot": SLOW_SLOT,
                "connections_per_replica": CONNECTIONS_PER_REPLICA,
                "durations": {f.name: f.duration for f in plan},
                "wrk_threads": 1,
                "wrk_timeout_s": WRK_TIMEOUT,
                "health": DEFAULTS["health"],
            },
            "summary": rows,
            "targets": checks,
            "fleet": result["fleet"],
            "replaced": result["replaced"],
            "nginx_log": result["nginx_log"],
            "runs": result["runs"],
        },
    )
    print(f"\n{NAME}: results in {path}")
    return 1 if result["replaced"] else 0


if __name__ == "__main__":
    sys.exit(main())

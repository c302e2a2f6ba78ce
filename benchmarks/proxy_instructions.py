"""What one request costs the proxy's Python code, counted so that the machine's load
does not move the figure: CPU instructions (valgrind's callgrind), Python function calls
(cProfile) and cyclic collector passes per request.

No sockets: a ClientConnection and an UpstreamConnection, the proxy's own Protocol
objects, are driven directly, with transports that keep what is written in memory. Each
request is a client read (`GET /` as wrk sends it, or a browser's head with 12 header
lines) and the instance's answer in one read (aiohttp's head, 7 lines, and a short body).
So this counts the Python and httptools work per exchange, not the kernel's, not uvloop's
reads and writes, and not the scheduling: proxy_overhead.py measures all of those.
The `+ canary 10%` cases run the same requests while a canary takes 10% of them (a second
target in the canary's set, each side counting its figures): the difference from the
plain case is what a canary costs a request. The `minimal proxy` cases run the same
requests through floor_proxy.py's minimal proxy (httptools both ways, nothing else): the
floor under rotator's Python. Each case is also timed in-process (the best of 7 runs).
Instructions are the difference between a run of N requests and a run of none, after the
same warm-up, with a fixed hash seed: the same code gives the same count to within a
fraction of a percent, on a busy machine too.

    python benchmarks/proxy_instructions.py [--requests N]

Needs valgrind for the instruction counts (apt-get install valgrind); without it, only
the calls and collector passes are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import random
import re
import shutil
import subprocess
import sys
import time
from typing import Any, NamedTuple, cast

from benchlib import machine, table, write_result

NAME = "proxy_instructions"
VALGRIND = shutil.which("valgrind")
REQUESTS = {
    "wrk": b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    "browser": (
        b"GET /index.html?x=1 HTTP/1.1\r\nHost: example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
        b"Connection: keep-alive\r\nCookie: session=abcdef0123456789; theme=dark\r\n"
        b"Upgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n"
        b"Sec-Fetch-Site: none\r\n\r\n"
    ),
}
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"X-Instance-Pid: 12345\r\nX-Instance-Port: 20001\r\nContent-Length: 95\r\n"
    b"Date: Mon, 07 Dec 2026 16:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n\r\n" + b"x" * 95
)
WARM_UP = 200


class Case(NamedTuple):
    request: str  # a key of REQUESTS
    canary: int | None = None  # a canary's weight (%), or None: no canary, one target
    proxy: str = "rotator"  # or "minimal": floor_proxy.py's, the floor under rotator's


CASES = {
    "wrk": Case("wrk"),
    "browser": Case("browser"),
    "wrk + canary 10%": Case("wrk", 10),
    "browser + canary 10%": Case("browser", 10),
    "wrk, minimal proxy": Case("wrk", proxy="minimal"),
    "browser, minimal proxy": Case("browser", proxy="minimal"),
}


class MemoryTransport:
    """Keeps what the proxy writes; enough of a transport for the Protocols."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class Run(NamedTuple):
    passes: int  # the cyclic collector's, during the n requests
    seconds: float  # the n requests took (with the profiler, if one ran)


def minimal_proxy(to_client: MemoryTransport, to_instance: MemoryTransport) -> tuple[Any, Any]:
    """floor_proxy.py's minimal proxy, its client and instance sides wired to each other."""
    import floor_proxy

    client = floor_proxy.Client(1, parse=True)
    upstream = floor_proxy.Upstream(client, parse=True)
    upstream.connection_made(cast(Any, to_instance))
    client.upstream = upstream
    client.connection_made(cast(Any, to_client))
    return client, upstream


async def exchanges(case: str, n: int, profile: cProfile.Profile | None = None) -> Run:
    """Run WARM_UP + n requests through one client and one pooled instance connection."""
    from rotator.config import Endpoint
    from rotator.proxy.protocol import ClientConnection, Listener
    from rotator.proxy.route import Route, Target
    from rotator.proxy.upstream import UpstreamConnection

    kind, weight, proxy = CASES[case]
    # A fixed draw: the same requests go to the canary in every run.
    route = Route("web", draw=random.Random(0).random)
    target = Target(Endpoint("127.0.0.1", 1))
    route.swap(target)
    if weight is not None:
        canary = Target(Endpoint("127.0.0.1", 2))
        # Both targets share the one instance connection (their idle pools are one list), so
        # the run is driven as the plain one is: only the proxy's own steps differ.
        canary.idle = target.idle
        route.add(canary, canary=True)
        route.canary_weight = weight
        route.reset_figures()
    to_client, to_instance = MemoryTransport(), MemoryTransport()
    client: Any
    upstream: Any
    if proxy == "minimal":
        client, upstream = minimal_proxy(to_client, to_instance)
    else:
        client = ClientConnection(Listener(route, "127.0.0.1", 8080))
        client.connection_made(cast(Any, to_client))
        upstream = UpstreamConnection(target)
        upstream.connection_made(cast(Any, to_instance))
        target.put_idle(upstream)
    request = REQUESTS[kind]

    def one() -> None:
        client.data_received(request)
        upstream.data_received(RESPONSE)
        if len(to_client.written) != 1 or len(to_instance.written) != 1:
            raise RuntimeError(f"not one write each way: {to_client.written, to_instance.written}")
        to_client.written.clear()
        to_instance.written.clear()

    for _ in range(WARM_UP):
        one()
    passes = gc.get_stats()[0]["collections"]
    if profile is not None:
        profile.enable()
    started = time.perf_counter()
    for _ in range(n):
        one()
    seconds = time.perf_counter() - started
    if profile is not None:
        profile.disable()
    if weight is not None:
        figures = route.canary_figures.requests + route.stable_figures.requests
        if figures != WARM_UP + n or not route.canary_figures.requests:
            raise RuntimeError(f"the sides did not count every request: {figures}")
    return Run(int(gc.get_stats()[0]["collections"] - passes), seconds)


def run_loop(case: str, n: int, profile: cProfile.Profile | None = None) -> Run:
    try:
        import uvloop

        return uvloop.run(exchanges(case, n, profile))
    except ImportError:
        return asyncio.run(exchanges(case, n, profile))


def instructions(case: str, n: int) -> int | None:
    """Instructions per request: callgrind's count for n requests minus that for none."""
    if VALGRIND is None:
        return None
    counts = []
    for requests in (0, n):
        done = subprocess.run(
            [VALGRIND, "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, __file__, "--child", case, str(requests)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
            timeout=600,
        )  # fmt: skip
        m = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or not m:
            raise RuntimeError(f"valgrind failed ({done.returncode}): {done.stderr[-500:]}")
        counts.append(int(m.group(1)))
    return round((counts[1] - counts[0]) / n)


def calls(case: str, n: int) -> tuple[float, int, list[dict[str, Any]]]:
    """Python calls per request (cProfile), collector passes, the most frequent calls."""
    profile = cProfile.Profile()
    passes = run_loop(case, n, profile).passes
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(v[1] for v in stats.values())
    top = sorted(stats.items(), key=lambda kv: -kv[1][1])[:12]
    rows = [
        {"function": f"{os.path.basename(f)}:{line} {name}", "per_request": round(v[1] / n, 2)}
        for (f, line, name), v in top
    ]
    return total / n, passes, rows


def microseconds(case: str, n: int, repeats: int = 7) -> float:
    """The time a request takes in-process, the best of `repeats` runs of n: timed, so
    moved by the machine's load (the best of several, on a quiet machine, is stable to a
    few percent), unlike the counts. For comparing cases side by side in one run."""
    return min(run_loop(case, n).seconds for _ in range(repeats)) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=1000, help="per count (default 1000)")
    p.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # under valgrind: just run the requests
        run_loop(args.child[0], int(args.child[1]))
        return 0
    if VALGRIND is None:
        print(f"{NAME}: valgrind is not installed: no instruction counts")
    rows = []
    for case in CASES:
        per_call, passes, top = calls(case, 20 * args.requests)
        rows.append(
            {
                "request": case,
                "microseconds": round(microseconds(case, 20 * args.requests), 2),
                "instructions": instructions(case, args.requests),
                "python_calls": round(per_call, 1),
                "collector_passes_per_1000": round(1000 * passes / (20 * args.requests), 3),
                "top_calls": top,
            }
        )
    print(
        table(
            ["request", "instructions/request", "us/request in-process", "Python calls/request",
             "gc passes/1000 req"],
            [[r["request"], r["instructions"], r["microseconds"], r["python_calls"],
              r["collector_passes_per_1000"]] for r in rows],
        )
    )  # fmt: skip
    counts = {r["request"]: r["instructions"] for r in rows}
    for case, (kind, weight, proxy) in CASES.items():
        if weight is not None and counts[case] and counts[kind]:
            extra = counts[case] - counts[kind]
            print(f"{case}: {extra:+} instructions a request ({100 * extra / counts[kind]:+.1f}%)")
        if proxy == "minimal" and counts[case] and counts[kind]:
            above = counts[kind] - counts[case]
            print(f"{kind}: rotator {above:+} instructions a request above the minimal proxy")
    path = write_result(NAME, {"machine": machine(), "requests": args.requests, "rows": rows})
    print(f"\n{NAME}: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

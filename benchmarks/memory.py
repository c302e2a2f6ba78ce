"""Memory: the daemon's RSS at rest, and its peak while 1 GiB streams through the proxy
each way. Bodies are streamed, never held whole, so the peak must stay within
64 MiB of the idle RSS whatever the body size.

- idle:     `rotator up` with one demo component, RSS after start (and with 15
            components, for the fleet case);
- download: GET /bytes?n=1GiB through the proxy, read as fast as the client can;
- upload:   POST 1 GiB to /echo through the proxy while reading the echo back.
The daemon's RSS is sampled every 20 ms during each transfer (psutil).

    python benchmarks/memory.py [--quick] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from typing import Any

import aiohttp
import psutil
from benchlib import (
    HOST,
    PY,
    Processes,
    Rotator,
    free_ports,
    handle_sigterm,
    machine,
    table,
    workdir,
    write_result,
)

NAME = "memory"
MiB = 1024 * 1024
TARGET_MIB = 64
CHUNK = 256 * 1024


class Sampler:
    """The peak RSS of a process, sampled from a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def download(url: str, size: int) -> int:
    got = 0
    async with aiohttp.ClientSession() as session, session.get(f"{url}/bytes?n={size}") as resp:
        async for chunk in resp.content.iter_chunked(CHUNK):
            got += len(chunk)
    return got


async def upload(url: str, size: int) -> int:
    async def body() -> Any:
        block = b"x" * CHUNK
        for _ in range(size // CHUNK):
            yield block

    got = 0
    timeout = aiohttp.ClientTimeout(total=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            f"{url}/echo", data=body(), headers={"Content-Type": "application/octet-stream"}
        ) as resp,
    ):
        async for chunk in resp.content.iter_chunked(CHUNK):
            got += len(chunk)
    return got


def demo_components(n: int) -> dict[str, dict[str, Any]]:
    ports = free_ports(2 * n)
    return {
        f"c{i}": {
            "listen": f"{HOST}:{ports[2 * i]}",
            "ports": [ports[2 * i + 1]],
            "command": f"{PY} -m rotator.demo --port {{port}} --name {{name}}",
        }
        for i in range(n)
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="64 MiB each way (smoke test)")
    p.add_argument("--size-mib", type=int, default=1024)
    args = p.parse_args(argv)
    size = (64 if args.quick else args.size_mib) * MiB
    handle_sigterm()
    rows: list[dict[str, Any]] = []
    with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
        fleet = Rotator(procs, tmp / "fleet", demo_components(15))
        fleet.start(timeout=60)
        assert fleet.proc is not None
        time.sleep(2)
        fleet_idle = psutil.Process(fleet.proc.pid).memory_info().rss
        fleet.stop()

        rot = Rotator(procs, tmp / "one", demo_components(1))
        rot.start()
        assert rot.proc is not None
        time.sleep(1)
        idle = psutil.Process(rot.proc.pid).memory_info().rss
        spawner = rot.spawner()
        spawner_rss = spawner.memory_info().rss if spawner is not None else 0
        url = rot.url("c0").rstrip("/")
        for name, transfer in (("download", download), ("upload", upload)):
            began = time.monotonic()
            with Sampler(rot.proc.pid) as sampler:
                got = asyncio.run(transfer(url, size))
            seconds = time.monotonic() - began
            if got != size:
                print(f"{NAME}: {name} moved {got} bytes, expected {size}", file=sys.stderr)
                return 1
            rows.append(
                {
                    "transfer": name,
                    "mib": size // MiB,
                    "seconds": round(seconds, 2),
                    "mib_per_s": round(size / MiB / seconds, 1),
                    "peak_over_idle_mib": round((sampler.peak - idle) / MiB, 1),
                }
            )
        rot.stop()
    print(
        f"daemon RSS at rest: {idle / MiB:.1f} MiB with 1 component, {fleet_idle / MiB:.1f} MiB with 15"
        f" (and its spawner process: {spawner_rss / MiB:.1f} MiB)"
    )
    print(
        table(
            ["transfer", "MiB", "seconds", "MiB/s", "peak over idle (MiB)"],
            [
                [r["transfer"], r["mib"], r["seconds"], r["mib_per_s"], r["peak_over_idle_mib"]]
                for r in rows
            ],
        )
    )
    worst = max(r["peak_over_idle_mib"] for r in rows)
    verdict = "ok" if worst < TARGET_MIB else "MISSED"
    target = f"peak within {TARGET_MIB} MiB of idle: {worst} MiB: {verdict}"
    print(f"  {target}")
    write_result(
        NAME,
        {
            "machine": machine(),
            "idle_rss_mib": round(idle / MiB, 1),
            "idle_rss_15_components_mib": round(fleet_idle / MiB, 1),
            "spawner_rss_mib": round(spawner_rss / MiB, 1),
            "transfers": rows,
            "targets": [target],
        },
    )
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

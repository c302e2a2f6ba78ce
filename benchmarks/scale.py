"""Scale: the daemon's CPU at idle with 15 and with 100 components, and how fast a fleet starts.

- start-up: `rotator up` on the 15-component fleet of config/tekton.yaml (its
  commands, health settings and depends_on, on free ports of our own) until
  every component is running (healthy), three times; and one demo component
  alone, for comparison.
- idle CPU: the daemon process's own CPU time (user + system, psutil) over 30 s
  with nothing but health checks at rotator's default interval (1 s), after a
  few seconds to settle: 15 components (the tekton fleet), then 100 demo
  components. Targets: under 1% and under 5% of one core. The instances'
  CPU is reported alongside (they answer those health checks).

    python benchmarks/scale.py [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from benchlib import (
    HOST,
    PY,
    ROOT,
    Processes,
    Rotator,
    free_ports,
    handle_sigterm,
    machine,
    median,
    table,
    workdir,
    write_result,
)

NAME = "scale"
TEKTON = ROOT / "config" / "tekton.yaml"
DEMO = f"{PY} -m rotator.demo --port {{port}} --name {{name}}"
SETTLE = 3.0  # s after all are running: the start's own work is done
TARGET_CPU = {15: 1.0, 100: 5.0}  # % of one core


def tekton_fleet() -> tuple[dict[str, Any], dict[str, Any]]:
    """config/tekton.yaml's components and defaults, on free ports, with this interpreter."""
    config = yaml.safe_load(TEKTON.read_text())
    components = {}
    for name, spec in config["components"].items():
        listen, *pool = free_ports(3)
        components[name] = {
            **spec,
            "listen": f"{HOST}:{listen}",
            "ports": pool,
            "command": spec["command"].replace("{python}", PY),
        }
    return components, config.get("defaults", {})


def demo_fleet(n: int) -> dict[str, Any]:
    ports = free_ports(2 * n)
    return {
        f"c{i:03}": {
            "listen": f"{HOST}:{ports[2 * i]}",
            "ports": [ports[2 * i + 1]],
            "command": DEMO,
        }
        for i in range(n)
    }


def started(procs: Processes, directory: Path, components: dict[str, Any],
            defaults: dict[str, Any]) -> tuple[Rotator, float]:  # fmt: skip
    """`rotator up`, and the seconds until every component runs."""
    rot = Rotator(procs, directory, components, defaults=defaults)
    began = time.monotonic()
    rot.start(timeout=180)
    return rot, time.monotonic() - began


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def idle_cpu(rot: Rotator, seconds: float) -> dict[str, Any]:
    """% of one core used by the daemon (with its spawner), and by all its instances
    together, over `seconds`."""
    assert rot.proc is not None
    daemon = psutil.Process(rot.proc.pid)
    time.sleep(SETTLE)
    spawner = rot.spawner()
    ours = [daemon] if spawner is None else [daemon, spawner]
    instances = [p for p in daemon.children(recursive=True) if p not in ours]

    def total() -> tuple[float, float]:
        kids = 0.0
        for p in instances:
            with contextlib.suppress(psutil.Error):  # an instance may have gone
                kids += cpu(p)
        return sum(cpu(p) for p in ours), kids

    before, began = total(), time.monotonic()
    time.sleep(seconds)
    after, took = total(), time.monotonic() - began
    return {
        "seconds": round(took, 1),
        "daemon_cpu_pct": round(100 * (after[0] - before[0]) / took, 2),
        "instances_cpu_pct": round(100 * (after[1] - before[1]) / took, 2),
        "instances": len(instances),
        "daemon_rss_mib": round(daemon.memory_info().rss / 2**20, 1),
        "spawner_rss_mib": round(spawner.memory_info().rss / 2**20, 1) if spawner else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one start each, 5 s of idle")
    p.add_argument("--seconds", type=float, default=30.0, help="idle time measured")
    p.add_argument("--starts", type=int, default=3, help="timed starts of the 15-fleet")
    args = p.parse_args(argv)
    seconds, starts = (5.0, 1) if args.quick else (args.seconds, args.starts)
    handle_sigterm()
    info = machine()
    startup: dict[str, list[float]] = {"1 demo component": [], "tekton fleet (15)": []}
    idle: dict[int, dict[str, Any]] = {}
    try:
        with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
            for i in range(starts):
                rot, took = started(procs, tmp / f"one-{i}", demo_fleet(1), {})
                startup["1 demo component"].append(took)
                rot.stop()
                components, defaults = tekton_fleet()
                rot, took = started(procs, tmp / f"tekton-{i}", components, defaults)
                startup["tekton fleet (15)"].append(took)
                print(f"  start {i + 1}/{starts}: 15 components running after {took:.2f} s",
                      flush=True)  # fmt: skip
                if i == starts - 1:
                    idle[15] = idle_cpu(rot, seconds)
                    print(f"  idle, 15 components: {idle[15]}", flush=True)
                rot.stop()
            rot, took = started(procs, tmp / "hundred", demo_fleet(100), {})
            startup["100 demo components"] = [took]
            print(f"  100 components running after {took:.2f} s", flush=True)
            idle[100] = idle_cpu(rot, seconds)
            print(f"  idle, 100 components: {idle[100]}", flush=True)
            rot.stop()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see handle_sigterm)
        print(f"{NAME}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print()
    print(table(
        ["start-up to all running", "runs", "median s", "min s", "max s"],
        [[k, len(v), f"{median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}"]
         for k, v in startup.items()],
    ))  # fmt: skip
    print()
    print(table(
        ["idle, health every 1 s", "seconds", "daemon % of a core (with spawner)",
         "instances % (all)", "daemon RSS MiB", "spawner RSS MiB"],
        [[f"{n} components", r["seconds"], r["daemon_cpu_pct"], r["instances_cpu_pct"],
          r["daemon_rss_mib"], r["spawner_rss_mib"]] for n, r in idle.items()],
    ))  # fmt: skip
    checks = []
    for n, r in idle.items():
        ok = r["daemon_cpu_pct"] < TARGET_CPU[n]
        checks.append(
            f"idle CPU, {n} components: {r['daemon_cpu_pct']}% of a core "
            f"(target < {TARGET_CPU[n]:g}%): {'ok' if ok else 'MISSED'}"
        )
    print()
    for line in checks:
        print(f"  {line}")
    path = write_result(
        NAME,
        {
            "machine": info,
            "settings": {"idle_seconds": seconds, "settle_seconds": SETTLE, "starts": starts},
            "startup_seconds": {k: [round(x, 3) for x in v] for k, v in startup.items()},
            "startup_median_seconds": {k: round(median(v) or 0, 3) for k, v in startup.items()},
            "idle": {str(n): r for n, r in idle.items()},
            "targets": checks,
        },
    )
    print(f"\n{NAME}: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

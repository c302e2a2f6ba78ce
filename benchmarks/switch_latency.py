"""Switch latency: how soon a new instance gets traffic once it is healthy, seen from the instance.

rotator only. The backend of restart_under_load (benchmarks/backend.py, start-up
delay 1 s) notes, on its own clock, when it started, began listening, first
answered its health check with 200, and got its first request that was not a
health check. Under continuous load (16 keep-alive clients), `rotator restart`
runs 10 times; for each restart:

- switch:          first request - first healthy check (target: median < 50 ms)
- before spawn:    `rotator restart` invoked -> the backend's first line runs
                   (the CLI's own start-up, the admin call, the spawn)
- start-up:        the backend's own: first line -> listening
- healthy after:   listening -> first healthy check (rotator polls every 25 ms)
- after switch:    first request -> `rotator restart` returns (drain, stop, exit)
- wall - start-up: the whole `rotator restart` less the backend's own start-up

With `--ready notify` the component has `health: {ready: notify}` and the backend sends
READY=1 once listening; then also

- READY=1 -> request: the backend's READY=1 -> its first request (target: median < 30 ms)

    python benchmarks/switch_latency.py [--quick] [--restarts N] [--ready poll|notify]
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from benchlib import Processes, handle_sigterm, machine, median, table, workdir, write_result
from restart_under_load import TARGET_SWITCH_MS, RotatorCli, RotatorNotify, run_scenario

from rotator.configfile import parse_duration

NAME = "switch_latency"
# With `ready: notify`: what a restart adds to the app's own start-up before the switch.
TARGET_READY_MS = 30.0
# The daemon's own account of a rotation, from the CLI's event lines.
ROTATION_LINE = re.compile(r"rotation ok after (\S+)")  # a duration as rotator writes it
COLUMNS = {  # key in the per-restart rows: column heading
    "switch_ms": "switch",
    "before_spawn_ms": "before spawn",
    "startup_ms": "start-up",
    "healthy_after_listening_ms": "healthy after",
    "after_switch_ms": "after switch",
    "wall_ms": "wall",
    "wall_minus_startup_ms": "wall - start-up",
    "daemon_ms": "daemon's rotation",
    "ready_to_request_ms": "READY=1 -> request",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 restarts")
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--ready", choices=("poll", "notify"), default="poll", help="health.ready")
    args = p.parse_args(argv)
    scenario = RotatorNotify if args.ready == "notify" else RotatorCli
    restarts = 3 if args.quick else args.restarts
    handle_sigterm()
    info = machine()
    print(
        f"{NAME}: {restarts} restarts under keep-alive load (16 clients), ready: {args.ready}",
        flush=True,
    )
    try:
        with workdir("rotator-bench-") as tmp, Processes(tmp) as procs:
            # About 2 s per restart: 1.5 s of it, and some load at rest in between.
            run = run_scenario(scenario, procs, tmp, "keep-alive", 2.0 * restarts, restarts)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see handle_sigterm)
        print(f"{NAME}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    result = run.result
    rows: list[dict[str, Any]] = result["switch"]["per_restart"]
    for row, restart in zip(rows, result["restarts"], strict=False):
        found = ROTATION_LINE.search(restart["note"])
        row["daemon_ms"] = round(parse_duration(found.group(1)) * 1000, 1) if found else None
    medians = {k: median([r[k] for r in rows if r.get(k) is not None]) for k in COLUMNS}
    medians = {k: None if v is None else round(v, 1) for k, v in medians.items()}
    print()
    print(
        table(
            ["restart", "pid", *(f"{h} ms" for h in COLUMNS.values())],
            [[i, r["pid"], *(r.get(k) for k in COLUMNS)] for i, r in enumerate(rows, 1)]
            + [["median", "", *(medians[k] for k in COLUMNS)]],
        )
    )
    switch = medians["switch_ms"]
    ok = switch is not None and switch < TARGET_SWITCH_MS and len(rows) == restarts
    target = (
        f"switch median {switch} ms over {len(rows)}/{restarts} restarts "
        f"(target < {TARGET_SWITCH_MS:g} ms): {'ok' if ok else 'MISSED'}"
    )
    targets = [target]
    if args.ready == "notify":
        ready = medians["ready_to_request_ms"]
        met = ready is not None and ready < TARGET_READY_MS
        ok = ok and met
        targets.append(
            f"READY=1 -> first request median {ready} ms (target < {TARGET_READY_MS:g} ms): "
            f"{'ok' if met else 'MISSED'}"
        )
    for line in targets:
        print(f"\n  {line}")
    print(
        f"  requests {result['requests']}, failed {result['failed']}, "
        f"longest gap {result['longest_gap_ms']} ms"
    )
    path = write_result(
        NAME,
        {
            "machine": {**info, "rotator_event_loop": result.get("event_loop")},
            "settings": {
                "restarts": restarts,
                "load": "keep-alive",
                "clients": 16,
                "ready": args.ready,
            },
            "medians": medians,
            "restarts": rows,
            "load": {k: result[k] for k in ("requests", "failed", "failures", "longest_gap_ms")},
            "targets": targets,
        },
    )
    print(f"\n{NAME}: results in {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

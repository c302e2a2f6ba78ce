"""Short runs of two benchmarks, so that the scripts keep working; no figure is checked.

The restart benchmark (benchmarks/restart_under_load.py), rotator only: the
benchmark's own load generator, with aiohttp's silent retry turned off, on
keep-alive connections and on a new connection per request, through 3 restarts:
not one request may fail, and every restart must really bring a new backend into
service.

The replicas benchmark (benchmarks/replicas.py), one round of 1 s wrk runs: every
variant reaches every replica and fails no request, and no replica is replaced.
Skipped without wrk; without nginx, rotator alone.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    # The benchmarks are scripts that import their neighbours (benchlib) by name.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.import_module(name)
        # Their ports from the suite's range (ROTATOR_TEST_PORTS), as every test's.
        benchlib = importlib.import_module("benchlib")
        benchlib.PORT_RANGE = benchlib.port_range(
            os.environ.get("ROTATOR_TEST_PORTS", "20000-32000")
        )
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load("restart_under_load")


@pytest.mark.timeout(60)
def test_three_restarts_under_load_fail_no_request(tmp_path: Path, bench: ModuleType) -> None:
    began = time.monotonic()
    result = bench.smoke(tmp_path, restarts=3, duration=5.0)
    took = time.monotonic() - began

    assert result["failed"] == 0, (result["failures"], result["failure_samples"])
    assert [r["ok"] for r in result["restarts"]] == [True] * 3, result["restarts"]
    # The first backend and the three that replaced it all answered clients.
    assert result["backends_seen"] == 4, result["switches_seen_at_s"]
    groups = result["groups"]
    assert set(groups) == {"keep-alive, no retry", "new connection"}
    for name, group in groups.items():
        assert group["failed"] == 0, (name, group)
        assert group["requests"] > 100, (name, group)  # the load really ran
    assert took < 20, f"the smoke run took {took:.1f} s"


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
@pytest.mark.timeout(90)
def test_replicas_benchmark_runs_every_variant_over_the_same_replicas(tmp_path: Path) -> None:
    bench = load("replicas")
    variants = {"rotator"} | ({"nginx least_conn"} if bench.NGINX else set())
    skewed_variants = variants | ({"nginx round-robin"} if bench.NGINX else set())

    result = bench.smoke(tmp_path)

    assert result["replaced"] == {}, result["fleet"]
    assert {name: len(replicas) for name, replicas in result["fleet"].items()} == {
        "r1": 1, "r2": 2, "skewed": 4
    }  # fmt: skip
    runs = result["runs"]
    assert {(r["fleet"], r["variant"]) for r in runs} == {
        *((fleet, v) for fleet in ("r1", "r2") for v in variants),
        *(("skewed", v) for v in skewed_variants),
    }
    for run in runs:
        where = (run["fleet"], run["variant"])
        assert run["errors"] == 0, (where, run["socket_errors"], run["non_2xx"])
        assert run["requests"] > 0, where
        # Every balancer, rotator's and nginx's alike, fed every replica of the fleet.
        assert all(n > 0 for n in run["served"]), (where, run["served"])
    # Least-outstanding: the replica that takes 10x as long gets less than any other.
    skewed = next(r for r in runs if (r["fleet"], r["variant"]) == ("skewed", "rotator"))
    slow = skewed["served"][bench.SLOW_SLOT]
    assert all(slow < n for i, n in enumerate(skewed["served"]) if i != bench.SLOW_SLOT), skewed
    r2 = next(r for r in result["summary"] if (r["fleet"], r["variant"]) == ("r2", "rotator"))
    assert r2["efficiency"] is not None and r2["efficiency"] > 0, r2

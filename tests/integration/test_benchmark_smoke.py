"""A short run of the restart benchmark (benchmarks/restart_under_load.py), rotator only.

The benchmark's own load generator, with aiohttp's silent retry turned off, on
keep-alive connections and on a new connection per request, through 3 restarts:
not one request may fail. The figures are not checked, only that nothing failed
and that every restart really brought a new backend into service.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    # The benchmarks are scripts that import their neighbours (benchlib) by name.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("restart_under_load")
    finally:
        sys.path.remove(str(BENCHMARKS))


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

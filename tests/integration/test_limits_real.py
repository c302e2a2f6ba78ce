"""Limits that trigger a rotation (issue 18), end to end: an instance whose process tree
grows past max_memory, and one that passes restart_every, are replaced with zero
downtime under load; status, the event and the metrics say why.

Real daemons, real instances, real load, the real CLI."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import (
    PY,
    Load,
    RunningDaemon,
    cli,
    component,
    parse_samples,
    sample,
    wait_until,
    write_config,
)

MIB = 1024 * 1024

# A stdlib app: `grower.py PORT`. GET /grow starts a child process that holds 96 MiB
# (written, so resident) until it is killed: the instance's root stays small, its tree
# does not. Every answer carries the root's pid.
GROWER = r"""
import os, subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD = "import sys, time; block = b'x' * (96 * 1024 * 1024); print('holding', flush=True); time.sleep(3600)"
children = []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/grow":
            child = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE)
            child.stdout.readline()  # resident once it says so
            children.append(child)
        body = ("%d\n" % os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.request_queue_size = 128
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
"""


def grower(tmp_path: Path) -> str:
    script = tmp_path / "grower.py"
    script.write_text(GROWER)
    return f"{PY} {script} {{port}}"


def instance(daemon: RunningDaemon) -> dict[str, Any]:
    [one] = daemon.component("web")["instances"]
    return dict(one)


def limit_events(config: Path) -> list[dict[str, Any]]:
    log = config.parent / "state" / "events.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e["kind"] == "limit"]


def metrics(daemon: RunningDaemon) -> dict[Any, float]:
    with urllib.request.urlopen(daemon.admin + "/metrics", timeout=5) as resp:
        return parse_samples(resp.read().decode())


def test_an_instance_whose_tree_grows_past_max_memory_is_rotated_without_a_failed_request(
    tmp_path: Path, daemon_factory: Any
) -> None:
    web = component(command=grower(tmp_path), max_memory="64MiB", limits_interval="200ms")
    config = write_config(tmp_path, {"web": web})
    daemon = daemon_factory(config)
    url = daemon.url("web")
    # Measured while small: a Python http.server's tree is ~20 MiB, under the limit.
    assert wait_until(lambda: instance(daemon)["rss_bytes"] is not None, timeout=5)
    first = instance(daemon)
    assert first["rss_bytes"] < 64 * MIB
    status = daemon.component("web")
    assert status["limits"] == {"max_memory": 64 * MIB, "restart_every": None}
    gauge = sample(metrics(daemon), "rotator_instance_rss_bytes", component="web", replica="0")
    assert gauge is not None and 0 < gauge < 64 * MIB
    with Load(url) as load:
        with urllib.request.urlopen(url + "grow", timeout=10) as resp:
            assert int(resp.read()) == first["pid"]
        assert wait_until(lambda: instance(daemon)["pid"] != first["pid"], timeout=10)
        time.sleep(0.3)  # traffic on the new instance too
    assert load.report.failed == 0, (load.report.failures, load.report.samples[:3])
    assert len(load.report.pids) >= 2  # both instances served the load
    [event] = limit_events(config)
    assert event["reason"] == "memory" and event["pid"] == first["pid"]
    assert event["rss_bytes"] > 64 * MIB and event["max_memory"] == 64 * MIB
    assert event["message"].startswith(f"pid {first['pid']} uses ")
    assert event["message"].endswith(" MiB > 64 MiB, rotating")
    assert f"web: {event['message']}" in daemon.output()
    samples = metrics(daemon)
    assert sample(samples, "rotator_rotation_reasons_total", component="web", reason="memory") == 1
    # The new instance is small again; nothing more is rotated.
    time.sleep(0.6)
    assert len(limit_events(config)) == 1
    table = cli(config, "status").stdout
    assert "web: max_memory 64MiB (pid " in table, table


def test_restart_every_rotates_an_instance_once_it_is_that_old(
    tmp_path: Path, daemon_factory: Any
) -> None:
    web = component(command=grower(tmp_path), restart_every="2s", limits_interval="100ms")
    config = write_config(tmp_path, {"web": web})
    daemon = daemon_factory(config)
    first = instance(daemon)
    assert wait_until(lambda: instance(daemon)["restart_at"] is not None, timeout=5)
    restart_at = instance(daemon)["restart_at"]
    # Its start, 2s, and a jitter of up to 10% of that.
    assert first["since"] + 2.0 <= restart_at <= first["since"] + 2.2
    with Load(daemon.url("web")) as load:
        assert wait_until(lambda: instance(daemon)["pid"] != first["pid"], timeout=10)
    assert load.report.failed == 0, (load.report.failures, load.report.samples[:3])
    [event] = limit_events(config)[:1]
    assert event["reason"] == "age" and event["pid"] == first["pid"]
    assert restart_at <= event["time"] <= restart_at + 1.0  # at the first check after it
    assert "(restart_every 2s), rotating" in event["message"]
    samples = metrics(daemon)
    assert sample(samples, "rotator_rotation_reasons_total", component="web", reason="age") >= 1
    assert sample(samples, "rotator_instance_rss_bytes", component="web", replica="0") is None
    table = cli(config, "status").stdout
    assert "web: restart_every 2s (next: pid " in table, table

"""GET /metrics on a real daemon: requests through the real proxy, rotations, stops and
failures of real demo instances, read back through the Prometheus text parser."""

from __future__ import annotations

import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import rotator
from tests.conftest import (
    DEMO,
    Samples,
    cli,
    component,
    parse_samples,
    wait_until,
    write_config,
)
from tests.conftest import sample as value


def scrape(daemon: Any) -> Samples:
    with urllib.request.urlopen(daemon.admin + "/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    return parse_samples(text)


def metric(daemon: Any, name: str, **labels: str) -> float | None:
    return value(scrape(daemon), name, **labels)


def get(url: str | urllib.request.Request, timeout: float = 10) -> int:
    """The status of a request, its body read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def admin_request(daemon: Any, method: str = "GET", **headers: str) -> int:
    return get(urllib.request.Request(daemon.admin + "/metrics", method=method, headers=headers))


def test_requests_by_status_class_in_flight_and_durations(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    for code in (200, 200, 200, 404, 404, 500):
        assert get(daemon.url("web", f"/status/{code}")) == code
    status = daemon.component("web")
    s = scrape(daemon)
    assert value(s, "rotator_active_instance_port", component="web") == status["active"]["port"]
    assert value(s, "rotator_active_instance_pid", component="web") == status["active"]["pid"]
    assert value(s, "rotator_component_state", component="web", state="running") == 1
    assert value(s, "rotator_requests_in_flight", component="web") == 0

    slow = threading.Thread(target=get, args=(daemon.url("web", "/slow?seconds=2"),))
    slow.start()
    try:
        assert wait_until(
            lambda: metric(daemon, "rotator_requests_in_flight", component="web") == 1
        )
    finally:
        slow.join(15)
    assert metric(daemon, "rotator_requests_in_flight", component="web") == 0

    # Stopped: the proxy itself answers 503, which counts as 5xx too.
    assert cli(config, "stop", "web").returncode == 0
    assert get(daemon.url("web")) == 503
    s = scrape(daemon)
    counts = {
        code: value(s, "rotator_requests_total", component="web", code=code)
        for code in ("1xx", "2xx", "3xx", "4xx", "5xx")
    }
    assert counts == {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 2, "5xx": 2}
    assert value(s, "rotator_request_duration_seconds_count", component="web") == 8
    assert (
        value(s, "rotator_request_duration_seconds_count", component="web")
        == (daemon.component("web")["requests"])
    )
    # Only the /slow request took over a second.
    bucket = "rotator_request_duration_seconds_bucket"
    assert value(s, bucket, component="web", le="1.0") == 7
    assert value(s, bucket, component="web", le="2.5") == 8
    assert value(s, "rotator_request_duration_seconds_sum", component="web") >= 2.0
    assert value(s, "rotator_active_instance_port", component="web") is None
    assert value(s, "rotator_component_state", component="web", state="stopped") == 1
    assert value(s, "rotator_component_state", component="web", state="running") == 0


def test_rotations_stops_and_restarts(tmp_path: Path, daemon_factory) -> None:
    config = write_config(
        tmp_path,
        {
            "web": component(),
            "stubborn": component(command=f"{DEMO} --ignore-sigterm", stop_timeout="500ms"),
        },
    )
    daemon = daemon_factory(config)
    s = scrape(daemon)
    for name in ("web", "stubborn"):  # the first start is a rotation too
        assert value(s, "rotator_rotations_total", component=name, outcome="ok") == 1
        assert value(s, "rotator_instance_restarts_total", component=name) == 0

    result = cli(config, "restart", "web", "stubborn")
    assert result.returncode == 0, result.stderr
    s = scrape(daemon)
    for name in ("web", "stubborn"):
        assert value(s, "rotator_rotations_total", component=name, outcome="ok") == 2
        assert value(s, "rotator_rotations_total", component=name, outcome="failed") == 0
        assert value(s, "rotator_rotation_duration_seconds_count", component=name) == 2
        assert value(s, "rotator_rotation_duration_seconds_sum", component=name) > 0
        assert value(s, "rotator_instance_restarts_total", component=name) == 1
    stops = {
        (name, outcome): value(s, "rotator_instance_stops_total", component=name, outcome=outcome)
        for name in ("web", "stubborn")
        for outcome in ("graceful", "forced", "gone")
    }
    assert stops == {
        ("web", "graceful"): 1,
        ("web", "forced"): 0,
        ("web", "gone"): 0,
        ("stubborn", "graceful"): 0,
        ("stubborn", "forced"): 1,
        ("stubborn", "gone"): 0,
    }
    # The stubborn one took its stop_timeout before the SIGKILL.
    assert value(s, "rotator_rotation_duration_seconds_sum", component="stubborn") >= 0.5

    # A crash: the dead instance's clean-up finds it gone; a replacement is a restart.
    crashed = daemon.component("web")["active"]["pid"]
    os.kill(crashed, signal.SIGKILL)
    assert wait_until(
        lambda: metric(daemon, "rotator_instance_stops_total", component="web", outcome="gone") == 1
    )
    assert wait_until(
        lambda: metric(daemon, "rotator_instance_restarts_total", component="web") == 2
    )
    active = daemon.component("web")["active"]
    assert active["pid"] != crashed
    assert metric(daemon, "rotator_active_instance_port", component="web") == active["port"]


def test_failed_deploy_counts_a_failed_rotation(tmp_path: Path, daemon_factory) -> None:
    # Short enough to wait out, long enough for a healthy start on a busy machine.
    config = write_config(tmp_path, {"web": component(health={"start_timeout": "4s"})})
    daemon = daemon_factory(config)
    before = daemon.component("web")["active"]
    result = cli(config, "deploy", "web", "--command", f"{DEMO} --never-healthy")
    assert result.returncode == 1, result.stdout
    s = scrape(daemon)
    assert value(s, "rotator_rotations_total", component="web", outcome="failed") == 1
    assert value(s, "rotator_rotations_total", component="web", outcome="ok") == 1
    assert value(s, "rotator_rotation_duration_seconds_count", component="web") == 2
    # The failed one waited its start_timeout.
    assert value(s, "rotator_rotation_duration_seconds_sum", component="web") >= 4.0
    # The never-healthy instance was stopped (it exits on SIGTERM).
    assert value(s, "rotator_instance_stops_total", component="web", outcome="graceful") == 1
    assert value(s, "rotator_instance_restarts_total", component="web") == 0
    assert value(s, "rotator_active_instance_pid", component="web") == before["pid"]
    assert value(s, "rotator_active_instance_port", component="web") == before["port"]


def test_metrics_is_read_only_and_behind_the_host_guard(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    port = daemon.admin.rsplit(":", 1)[1]
    assert admin_request(daemon) == 200
    assert admin_request(daemon, Host=f"rebound.example:{port}") == 403
    assert admin_request(daemon, Origin="http://evil.example") == 403
    assert admin_request(daemon, "POST") == 401
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    assert admin_request(daemon, "POST", Authorization=f"Bearer {token}") == 405
    s = scrape(daemon)  # the daemon is unharmed
    loop = daemon.status()["daemon"]["event_loop"]
    assert value(s, "rotator_info", version=rotator.__version__, event_loop=loop) == 1
    if sys.platform == "linux":  # ProcessCollector reads /proc: nothing on macOS
        assert (value(s, "process_resident_memory_bytes") or 0) > 10 * 2**20
        assert (value(s, "process_cpu_seconds_total") or 0) > 0

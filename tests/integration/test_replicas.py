"""Replicas end to end (issue 16's proof): several instances of one component behind its
address, balanced by requests in flight, replaced one at a time, supervised, scaled and
adopted per replica.

Real daemons, real instances, real load, the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.conftest import (
    DEMO,
    PY,
    Load,
    RunningDaemon,
    alive,
    cli,
    component,
    parse_samples,
    sample,
    wait_until,
    write_config,
)

# A stdlib backend: `backend.py PORT DELAYS REPLICA [threads]`. It sleeps DELAYS[REPLICA]
# seconds (DELAYS: comma-separated) per request but /health, and answers with its pid.
# Without `threads` it is single-threaded (http.server.HTTPServer): one request at a
# time, as a Python app held by the GIL to one core. HTTP/1.0 (a connection per
# request), since a single-threaded server that kept a connection open would serve no
# other connection meanwhile.
BACKEND = r"""
import os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

port, delay = int(sys.argv[1]), float(sys.argv[2].split(",")[int(sys.argv[3])])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health":
            time.sleep(delay)
        body = ("%d\n" % os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


Server = ThreadingHTTPServer if sys.argv[4:] == ["threads"] else HTTPServer
Server.request_queue_size = 128  # the proxy opens a connection per request in flight
server = Server(("127.0.0.1", port), Handler)
server.daemon_threads = True
print("backend pid %d on %d, %gs per request" % (os.getpid(), port, delay), flush=True)
server.serve_forever()
"""


def backend(tmp_path: Path, delays: str, threads: bool = False) -> str:
    """The command of a BACKEND instance: DELAYS[{replica}] seconds per request."""
    script = tmp_path / "backend.py"
    script.write_text(BACKEND)
    return f"{PY} {script} {{port}} {delays} {{replica}}" + (" threads" if threads else "")


def instances(daemon: RunningDaemon, name: str = "web") -> list[dict[str, Any]]:
    return list(daemon.component(name)["instances"])


def slots(daemon: RunningDaemon, name: str = "web") -> dict[int, int]:
    """pid by replica slot."""
    return {i["replica"]: i["pid"] for i in instances(daemon, name)}


def recorded(config: Path, name: str = "web") -> dict[int, tuple[int, float]]:
    """(pid, create time) by slot, as the state file holds them."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        state = json.loads((config.parent / "state" / "state.json").read_text())
        return {
            r["replica"]: (r["pid"], r["create_time"])
            for r in state["components"][name]["instances"]
        }
    return {}


def rate(load: Load, seconds: float) -> float:
    """Requests per second the load gets answered over the next `seconds`."""
    ok, began = load.report.ok, time.monotonic()
    time.sleep(seconds)
    return (load.report.ok - ok) / (time.monotonic() - began)


def running(daemon: RunningDaemon, name: str = "web", replicas: int = 3) -> bool:
    c = daemon.component(name)
    return c["state"] == "running" and sum(i["healthy"] for i in c["instances"]) == replicas


def outcome(load: Load) -> str:
    """What the load got, for a failed assertion."""
    return f"{load.report.ok} ok, {load.report.failures}, {load.report.samples[:3]}"


def post(daemon: RunningDaemon, path: str, body: bytes, token: str) -> tuple[int, str]:
    request = urllib.request.Request(
        daemon.admin + path,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- balancing -----------------------------------------------------------------------------


def test_three_single_threaded_replicas_serve_at_least_two_and_a_half_times_one(
    tmp_path: Path, daemon_factory: Any
) -> None:
    # 50 ms per request, one at a time: one replica answers 20 requests/s at most,
    # whatever the concurrency; the proxy must spread 16 clients' requests over three.
    # (A health check waits behind the requests queued before it: up to 16 x 50 ms.)
    spec = component(pool=4, command=backend(tmp_path, "0.05,0.05,0.05"), health={"timeout": "3s"})
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    with Load(daemon.url("web"), clients=16) as load:
        one = rate(load, 1.5)
        scaled = cli(config, "scale", "web", "3")
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr
        assert "web: scaled in" in scaled.stdout
        assert len(instances(daemon)) == 3
        time.sleep(0.3)  # the first replica's backlog spreads out
        three = rate(load, 1.5)
    assert load.report.failed == 0, outcome(load)
    assert three >= 2.5 * one, f"1 replica: {one:.1f}/s, 3 replicas: {three:.1f}/s"
    assert one < 25, one  # the backend really is one request at a time
    # Every replica answered.
    assert set(slots(daemon).values()) <= set(load.report.pids)


def test_a_slow_replica_gets_fewer_requests(tmp_path: Path, daemon_factory: Any) -> None:
    # Replica 0 takes 300 ms per request, the others 10 ms (through `{replica}`):
    # least-outstanding balancing leaves requests in flight piling up on the slow one,
    # so it gets far fewer new ones; round-robin would give it a third.
    command = backend(tmp_path, "0.3,0.01,0.01", threads=True)
    config = write_config(tmp_path, {"web": component(pool=4, command=command, replicas=3)})
    daemon = daemon_factory(config)
    with Load(daemon.url("web"), clients=16) as load:
        time.sleep(1)
    assert load.report.failed == 0, outcome(load)
    served = {i["replica"]: i["requests"] for i in instances(daemon)}
    total = sum(served.values())
    assert total > 200, served
    assert served[0] < 0.15 * total, served
    assert served[1] > 3 * served[0] and served[2] > 3 * served[0], served
    by_pid = {i["pid"]: i["requests"] for i in instances(daemon)}
    assert {pid: load.report.pids[pid] for pid in by_pid} == by_pid  # what the clients saw


# -- rotations keep capacity -----------------------------------------------------------------


class HealthyPoll:
    """Polls the status every ~20 ms from a thread: the fewest healthy instances seen."""

    def __init__(self, daemon: RunningDaemon, name: str = "web") -> None:
        self.daemon, self.name = daemon, name
        self.fewest: int | None = None
        self.polls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with urllib.request.urlopen(self.daemon.admin + "/v1/status", timeout=5) as r:
                    status = json.load(r)
            except OSError as exc:
                self.errors.append(repr(exc))
                continue
            c = next(c for c in status["components"] if c["name"] == self.name)
            self.daemon.pids_seen.update(i["pid"] for i in c["instances"])
            healthy = sum(1 for i in c["instances"] if i["healthy"])
            self.fewest = healthy if self.fewest is None else min(self.fewest, healthy)
            self.polls += 1

    def __enter__(self) -> HealthyPoll:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_five_restarts_of_three_replicas_keep_three_healthy_and_lose_nothing(
    tmp_path: Path, daemon_factory: Any
) -> None:
    # A pool of replicas + 1 ports: each old replica stops before the next slot starts,
    # so the one free port carries every step.
    spec = component(pool=4, replicas=3, drain_timeout="2s")
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    assert wait_until(lambda: running(daemon))
    seen = {*slots(daemon).values()}
    with HealthyPoll(daemon) as poll, Load(daemon.url("web"), clients=16) as load:
        for n in range(5):
            result = cli(config, "restart", "web")
            assert result.returncode == 0, f"restart {n}: {result.stdout}{result.stderr}"
            # Each replica's step is printed, one at a time.
            for slot in range(3):
                assert f"(replica {slot} of 3)" in result.stdout, result.stdout
            seen.update(slots(daemon).values())
    assert load.report.failed == 0, outcome(load)
    assert poll.errors == [] and poll.polls > 50, (poll.polls, poll.errors[:3])
    assert poll.fewest == 3, poll.fewest
    status = daemon.component("web")
    assert status["state"] == "running" and status["restarts"] == 5
    assert len(seen) == 3 + 5 * 3  # every replica replaced every time
    now = {*slots(daemon).values()}
    assert not [pid for pid in seen - now if alive(pid)]
    assert len(set(load.report.pids) & (seen - now)) >= 9  # traffic followed the rotations


def test_a_killed_replica_is_replaced_in_its_slot_without_a_failed_request(
    tmp_path: Path, daemon_factory: Any
) -> None:
    spec = component(pool=4, replicas=3, restart_backoff="100ms")
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    assert wait_until(lambda: running(daemon))
    before = slots(daemon)
    with Load(daemon.url("web"), clients=16) as load:
        assert wait_until(lambda: load.report.ok > 200)
        os.kill(before[1], signal.SIGKILL)
        assert wait_until(lambda: slots(daemon).get(1) not in (None, before[1]), timeout=10)
        served = load.report.ok
        assert wait_until(lambda: load.report.ok > served + 100)
    assert load.report.failed == 0, outcome(load)
    after = slots(daemon)
    assert after[0] == before[0] and after[2] == before[2]  # the others untouched
    assert load.report.pids[after[1]] > 0
    assert wait_until(lambda: running(daemon))
    status = daemon.component("web")
    assert status["restarts"] == 1 and status["last_exit"] == -9
    assert f"pid {before[1]} exited with code -9" in daemon.output()
    assert "starting a replacement for replica 1" in daemon.output()


def instances_running(daemon: RunningDaemon, name: str = "web") -> set[int]:
    """The pids of every process running an instance command on one of the pool's ports."""
    ports = {str(p) for p in daemon.data["components"][name]["ports"]}
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "rotator.demo" in cmd and ports & set(cmd):
            found.add(proc.pid)
    return found


def test_a_replica_killed_during_a_restart_gets_the_restart_s_new_instance(
    tmp_path: Path, daemon_factory: Any
) -> None:
    # Replica 2 dies while the roll is at replica 0: when the roll reaches its empty
    # slot, the new instance started for it fills it; none is left running unrouted.
    spec = component(pool=5, replicas=3, drain_timeout="2s", restart_backoff="100ms")
    config = write_config(tmp_path, {"web": spec})
    daemon = daemon_factory(config)
    assert wait_until(lambda: running(daemon))
    before = slots(daemon)
    with Load(daemon.url("web"), clients=8) as load:
        restart = subprocess.Popen(
            [PY, "-m", "rotator", "-c", str(config), "restart", "web"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert restart.stdout is not None
        first = restart.stdout.readline()  # replica 0's new instance is starting
        assert "(replica 0 of 3)" in first, first
        os.kill(before[2], signal.SIGKILL)
        out, err = restart.communicate(timeout=60)
    assert restart.returncode == 0, first + out + err
    assert load.report.failed == 0, outcome(load)
    assert wait_until(lambda: running(daemon))
    after = slots(daemon)
    assert not set(after.values()) & set(before.values())
    assert wait_until(lambda: instances_running(daemon) == set(after.values())), (
        instances_running(daemon),
        after,
    )


def test_a_failed_deploy_leaves_every_replica_on_the_old_definition(
    tmp_path: Path, daemon_factory: Any
) -> None:
    health = {"start_timeout": "2s"}  # a never-healthy instance's cost; three demo starts' bound
    config = write_config(
        tmp_path, {"web": component(pool=5, replicas=3, health=health, drain_timeout="2s")}
    )
    daemon = daemon_factory(config)
    assert wait_until(lambda: running(daemon))
    before = slots(daemon)

    # 1. The first new instance is never healthy: no replica is touched.
    never = f"{PY} -m rotator.demo --port {{port}} --never-healthy"
    with Load(daemon.url("web"), clients=16) as load:
        result = cli(config, "deploy", "web", "--command", never)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rotator: web: deploy failed:" in result.stderr
    assert "not healthy within start_timeout 2s" in result.stderr
    assert load.report.failed == 0, outcome(load)
    assert slots(daemon) == before
    assert daemon.component("web")["definition"]["source"] == "config"

    # 2. Replica 1's new instance exits: replica 0, already on the new definition, goes
    # back to the old one; replica 2 is never touched.
    fails_on_1 = shlex.join(
        [
            "sh",
            "-c",
            "if [ {replica} = 1 ]; then echo 'boom: replica {replica}' >&2; exit 4; fi; "
            f"exec {PY} -m rotator.demo --port {{port}} --name new",
        ]
    )
    with Load(daemon.url("web"), clients=16) as load:
        result = cli(config, "deploy", "web", "--command", fails_on_1)
        served = load.report.ok
        assert wait_until(lambda: load.report.ok > served + 100)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "exited with code 4 before becoming healthy" in result.stderr
    assert "replica(s) 0 went back to the previous definition" in result.stderr
    assert "boom: replica 1" in result.stderr  # the failed instance's own log lines
    assert load.report.failed == 0, outcome(load)
    after = slots(daemon)
    assert after[1] == before[1] and after[2] == before[2]
    assert after[0] != before[0]
    # Replica 0 ran the new definition for a while (the switch to it), then went back.
    switched = [line for line in result.stdout.splitlines() if "switched" in line]
    assert len(switched) == 2 and all("(replica 0 of 3)" in line for line in switched)
    deployed = int(switched[0].split("(pid ")[1].split(")")[0])
    assert wait_until(lambda: not alive(deployed))
    for pid in after.values():
        cmdline = psutil.Process(pid).cmdline()
        assert cmdline[-2:] == ["--name", "web"], cmdline  # the config's command
    for _ in range(20):
        with urllib.request.urlopen(daemon.url("web"), timeout=5) as resp:
            assert json.load(resp)["name"] == "web"
    status = daemon.component("web")
    assert status["definition"]["source"] == "config" and status["state"] == "running"
    assert status["definition"]["can_roll_back"] is False


# -- scale, adoption, takeover -------------------------------------------------------------------


def test_scale_up_and_down_under_load_and_the_count_survives_kill_and_takeover(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = write_config(tmp_path, {"web": component(pool=5, drain_timeout="2s")})
    daemon = daemon_factory(config)
    first = slots(daemon)
    with Load(daemon.url("web"), clients=16) as load:
        up = cli(config, "scale", "web", "4")
        assert up.returncode == 0, up.stdout + up.stderr
        four = slots(daemon)
        assert sorted(four) == [0, 1, 2, 3] and four[0] == first[0]
        assert wait_until(lambda: all(load.report.pids[p] > 0 for p in four.values()))
        down = cli(config, "scale", "web", "1")
        assert down.returncode == 0, down.stdout + down.stderr
        assert slots(daemon) == {0: first[0]}  # the highest slots retired
        served = load.report.ok
        assert wait_until(lambda: load.report.ok > served + 50)
    assert load.report.failed == 0, outcome(load)
    assert "scaling 1 -> 4" in up.stdout and "scaling 4 -> 1" in down.stdout
    assert not [pid for slot, pid in four.items() if slot > 0 and alive(pid)]
    assert daemon.component("web")["restarts"] == 0

    # Three replicas where the config says one: a daemon killed and started again
    # adopts all three (pid and create time), and keeps the count.
    assert cli(config, "scale", "web", "3").returncode == 0
    three = slots(daemon)
    identity = {slot: (pid, psutil.Process(pid).create_time()) for slot, pid in three.items()}
    assert wait_until(lambda: recorded(config) == identity), recorded(config)
    daemon.proc.kill()
    daemon.proc.wait(10)
    daemon.log = daemon.log.rename(daemon.log.with_name("daemon-killed.out"))
    assert all(alive(pid) for pid in three.values())
    second = daemon_factory(config)
    assert wait_until(lambda: running(second)), second.output()
    status = second.component("web")
    assert status["replicas"] == 3 and status["restarts"] == 0
    assert slots(second) == three
    assert all(i["adopted"] for i in status["instances"])
    assert all(psutil.Process(pid).create_time() == identity[s][1] for s, pid in three.items())
    for pid in three.values():
        assert f"adopted pid {pid}" in second.output()

    # A takeover keeps them too.
    third = RunningDaemon(config, "--takeover", log_name="daemon-takeover.out")
    try:
        assert wait_until(lambda: second.proc.poll() is not None, timeout=30), second.output()
        third.wait_running()
        assert wait_until(lambda: running(third)), third.output()
        status = third.component("web")
        assert status["replicas"] == 3 and slots(third) == three
        assert all(i["adopted"] for i in status["instances"])
    finally:
        third.stop()
        third.kill_everything()
        print(f"---- {third.log.name}:\n{third.output()}")


def test_a_scaled_count_holds_until_a_reload_changes_replicas(
    tmp_path: Path, daemon_factory: Any
) -> None:
    config = write_config(tmp_path, {"web": component(pool=5, replicas=2, drain_timeout="2s")})
    daemon = daemon_factory(config)
    assert cli(config, "scale", "web", "3").returncode == 0
    three = slots(daemon)

    def reload_with(**changes: Any) -> str:
        data = yaml.safe_load(config.read_text())
        data["components"]["web"].update(changes)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        result = cli(config, "reload")
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    # A file whose pool is too small for its `replicas` is refused, nothing changed.
    data = yaml.safe_load(config.read_text())
    data["components"]["web"]["replicas"] = 5
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    refused = cli(config, "reload")
    assert refused.returncode == 2, refused
    assert re.search(
        r"rotator.yaml:\d+: components.web.ports: 5 ports for replicas: 5; a rotation needs"
        r" replicas \+ 1 = 6",
        refused.stderr,
    ), refused.stderr
    assert slots(daemon) == three and daemon.component("web")["replicas"] == 3
    data["components"]["web"]["replicas"] = 2
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    # A reload that leaves `replicas` as it was keeps the scaled count.
    assert "updated in place web" in reload_with(drain_timeout="3s")
    assert slots(daemon) == three and daemon.component("web")["replicas"] == 3
    # One that changes it applies the file's count over the scaled one, as a scale.
    with Load(daemon.url("web"), clients=8) as load:
        out = reload_with(replicas=1)
    assert "scaled web" in out and "scaling 3 -> 1" in out, out
    assert load.report.failed == 0, outcome(load)
    assert slots(daemon) == {0: three[0]}
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["components"]["web"]["replicas"] is None  # the config's count again


# Passes when the instance on PORT says it is replica SLOT: an exec check that a slot's
# instance passes and no other slot's does.
CHECK = r"""
import json, sys, urllib.request
port, slot = sys.argv[1], sys.argv[2]
with urllib.request.urlopen("http://127.0.0.1:%s/" % port, timeout=2) as resp:
    name = json.load(resp)["name"]
sys.exit(0 if name == "web-" + slot else "replica %s answered as %s" % (slot, name))
"""


def test_a_killed_daemon_s_successor_adopts_every_replica_as_its_own_slot(
    tmp_path: Path, daemon_factory: Any
) -> None:
    # Each replica is checked as what it is: an exec check given `{replica}` passes only
    # for the instance of that slot, at its start and when a new daemon adopts it.
    check = tmp_path / "check.py"
    check.write_text(CHECK)
    health = {"exec": f"{PY} {check} {{port}} {{replica}}", "interval": "1s", "timeout": "3s"}
    spec = component(pool=4, replicas=3, command=DEMO + "-{replica}", health=health)
    config = write_config(tmp_path, {"web": spec})
    first = daemon_factory(config)
    assert wait_until(lambda: running(first)), first.output()
    before = slots(first)
    identity = {slot: (pid, psutil.Process(pid).create_time()) for slot, pid in before.items()}
    assert wait_until(lambda: recorded(config) == identity), recorded(config)
    first.proc.kill()
    first.proc.wait(10)
    first.log = first.log.rename(first.log.with_name("daemon-killed.out"))

    second = daemon_factory(config)
    assert wait_until(lambda: running(second)), second.output()
    status = second.component("web")
    assert "not adopting" not in second.output(), second.output()
    assert slots(second) == before and status["restarts"] == 0
    assert all(i["adopted"] for i in status["instances"])
    assert all(psutil.Process(pid).create_time() == identity[s][1] for s, pid in before.items())
    with Load(second.url("web"), clients=4) as load:
        assert wait_until(lambda: all(load.report.pids[p] > 0 for p in before.values()))
    assert load.report.failed == 0, outcome(load)


# -- bad input, and the table ------------------------------------------------------------


def test_scale_errors_the_status_table_and_a_failed_slot_retried(
    tmp_path: Path, daemon_factory: Any
) -> None:
    # Slot 2's instance does not start while the flag file is there: a scale to 3 fails.
    flag = tmp_path / "slot-2-broken"
    flag.touch()
    command = shlex.join(
        [
            "sh",
            "-c",
            f"if [ {{replica}} = 2 ] && [ -e {flag} ]; then echo 'boom: no slot 2' >&2; exit 4;"
            " fi; exec " + DEMO,
        ]
    )
    config = write_config(tmp_path, {"web": component(pool=4, replicas=2, command=command)})
    daemon = daemon_factory(config)
    assert wait_until(lambda: running(daemon, replicas=2))
    before = slots(daemon)

    too_many = cli(config, "scale", "web", "5")
    assert too_many.returncode == 1, too_many
    assert too_many.stderr == (
        "rotator: web: scale failed: 4 ports in the pool of web for 5 replicas; a rotation"
        " needs replicas + 1 = 6 (change `ports` in the config)\n"
    )
    for bad in ("0", "abc", "-1", "1000"):
        usage = cli(config, "scale", "web", bad)
        assert usage.returncode == 2, usage
        assert usage.stderr.startswith("rotator: ") and usage.stderr.count("\n") == 1, usage
        assert bad in usage.stderr or "from 1 to 999" in usage.stderr, usage
    unknown = cli(config, "scale", "nope", "2")
    assert unknown.returncode == 2 and "unknown component 'nope'" in unknown.stderr
    # The API says the same to a script: a malformed count is 400, too many a failure.
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    for body in (b"{}", b'{"replicas": 0}', b'{"replicas": "2"}', b'{"replicas": true}'):
        code, answer = post(daemon, "/v1/components/web/scale", body, token)
        assert code == 400 and "'replicas'" in answer, (body, code, answer)
    code, answer = post(daemon, "/v1/components/web/scale", b'{"replicas": 5}', token)
    result = json.loads(answer.splitlines()[-1])
    assert code == 200 and result["result"] == "failed", answer
    assert "4 ports in the pool of web for 5 replicas" in result["error"]
    assert slots(daemon) == before  # nothing changed

    with Load(daemon.url("web"), clients=8) as load:
        failed = cli(config, "scale", "web", "3")
    assert failed.returncode == 1, failed
    assert "exited with code 4 before becoming healthy" in failed.stderr
    assert "boom: no slot 2" in failed.stderr
    assert load.report.failed == 0, outcome(load)
    # The others serve on, untouched; the count asked for stands, its slot 2 empty and
    # retried with backoff (restart_backoff 0.5 s, doubling), as a crashed replica's.
    assert slots(daemon) == before
    status = daemon.component("web")
    assert status["state"] == "degraded" and status["replicas"] == 3, status
    with urllib.request.urlopen(daemon.admin + "/metrics", timeout=5) as resp:
        samples = parse_samples(resp.read().decode())
    assert sample(samples, "rotator_replicas", component="web") == 3
    assert sample(samples, "rotator_replicas_healthy", component="web") == 2
    assert sample(samples, "rotator_component_state", component="web", state="degraded") == 1

    table = cli(config, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("web "))
    assert "degraded (2/3 healthy)" in lines[at]
    for slot, line in enumerate(lines[at + 1 : at + 3]):
        replica = status["instances"][slot]
        words = [f"[{slot}]", "healthy", str(replica["pid"]), str(replica["port"])]
        assert line.split()[:4] == words, line
    assert "exited with code 4" in lines[at + 3]  # the last error, below the replicas

    flag.unlink()  # the cause passes: a retry fills the slot, the others untouched
    assert wait_until(lambda: running(daemon, replicas=3), timeout=15), daemon.component("web")
    assert {slot: pid for slot, pid in slots(daemon).items() if slot < 2} == before
    back = cli(config, "scale", "web", "2")
    assert back.returncode == 0, back.stdout + back.stderr
    status = daemon.component("web")
    assert status["state"] == "running" and status["replicas"] == 2
    assert "running (2/2 healthy)" in cli(config, "status").stdout

"""The spawner process (rotator/spawner.py): real processes, started, reaped, reported."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from rotator.config import Endpoint
from rotator.instance import Instance, SpawnError
from rotator.spawner import Spawner, SpawnerGone

PY = sys.executable
Scenario = Callable[[Spawner, Path], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    """Run `scenario` with a started spawner and a log file; kill whatever it started."""
    log = tmp_path / "out.log"
    log.write_bytes(b"header\n")
    tag = uuid.uuid4().hex

    async def main() -> None:
        spawner = Spawner()
        await spawner.start()
        try:
            await scenario(spawner, log)
        finally:
            await spawner.close()

    env_tag = {"SPAWNER_TEST": tag}
    os.environ.update(env_tag)  # every child inherits it through env(): found and killed below
    try:
        asyncio.run(main())
    finally:
        del os.environ["SPAWNER_TEST"]
        for proc in tagged(tag):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("SPAWNER_TEST") == tag and proc.status() != "zombie":
                found.append(proc)
    return found


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_exit_code_and_output_come_back(tmp_path: Path) -> None:
    async def scenario(spawner: Spawner, log: Path) -> None:
        script = "import os, sys; print('ppid', os.getppid(), 'sid', os.getsid(0)); sys.exit(3)"
        child = await spawner.spawn([PY, "-c", script], tmp_path, env(), log)
        assert await asyncio.wait_for(child.wait(), 10) == 3
        assert child.returncode == 3
        header, line = log.read_text().splitlines()
        # Appended after what the daemon wrote; the spawner is its parent; its own session.
        assert header == "header"
        assert line == f"ppid {spawner.pid} sid {child.pid}"

    run(tmp_path, scenario)


def test_death_by_signal_is_reported_as_minus_the_signal(tmp_path: Path) -> None:
    async def scenario(spawner: Spawner, log: Path) -> None:
        child = await spawner.spawn(["sleep", "30"], tmp_path, env(), log)
        assert child.returncode is None
        os.kill(child.pid, signal.SIGTERM)
        assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGTERM

    run(tmp_path, scenario)


def test_quick_exits_are_not_missed(tmp_path: Path) -> None:
    """A child that exits at once: its exit may come in the same read as its pid."""

    async def scenario(spawner: Spawner, log: Path) -> None:
        children = await asyncio.gather(
            *(spawner.spawn(sh(f"exit {n}"), tmp_path, env(), log) for n in range(20))
        )
        assert len({c.pid for c in children}) == 20
        codes = await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), 10)
        assert codes == list(range(20))

    run(tmp_path, scenario)


def test_errors_come_back_as_the_os_would_raise_them(tmp_path: Path) -> None:
    async def scenario(spawner: Spawner, log: Path) -> None:
        with pytest.raises(FileNotFoundError) as missing:
            await spawner.spawn([str(tmp_path / "nope")], tmp_path, env(), log)
        assert missing.value.filename == str(tmp_path / "nope")
        with pytest.raises(FileNotFoundError) as no_dir:
            await spawner.spawn(["true"], tmp_path / "gone", env(), log)
        assert no_dir.value.filename == str(tmp_path / "gone")
        with pytest.raises(PermissionError):
            await spawner.spawn([str(log)], tmp_path, env(), log)  # not executable
        with pytest.raises(OSError, match="embedded null byte"):
            await spawner.spawn(["tr\0ue"], tmp_path, env(), log)
        with pytest.raises(FileNotFoundError):  # its log file is gone
            await spawner.spawn(["true"], tmp_path, env(), tmp_path / "no" / "log")
        # None of it hurt the spawner.
        child = await spawner.spawn(["true"], tmp_path, env(), log)
        assert await asyncio.wait_for(child.wait(), 10) == 0

    run(tmp_path, scenario)


def test_environment_bytes_pass_unchanged(tmp_path: Path) -> None:
    """An environment value that is not UTF-8 (os.environ holds it surrogate-escaped)."""

    async def scenario(spawner: Spawner, log: Path) -> None:
        value = os.fsdecode(b"caf\xe9")
        script = "import os, sys; sys.stdout.buffer.write(os.environb[b'V'])"
        child = await spawner.spawn([PY, "-c", script], tmp_path, env(V=value), log)
        assert await asyncio.wait_for(child.wait(), 10) == 0
        assert log.read_bytes() == b"header\ncaf\xe9"

    run(tmp_path, scenario)


def test_a_killed_spawner_is_replaced_and_its_children_run_on(tmp_path: Path) -> None:
    async def scenario(spawner: Spawner, log: Path) -> None:
        first = spawner.pid
        assert first is not None
        orphan = await spawner.spawn(["sleep", "30"], tmp_path, env(), log)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(SpawnerGone):
            await asyncio.wait_for(orphan.wait(), 10)
        assert psutil.pid_exists(orphan.pid)
        child = await spawner.spawn(["true"], tmp_path, env(), log)
        assert spawner.pid not in (None, first)
        assert await asyncio.wait_for(child.wait(), 10) == 0
        assert not psutil.pid_exists(first)  # reaped, not a zombie

    run(tmp_path, scenario)


def test_an_instance_whose_spawner_died_still_learns_of_its_exit(tmp_path: Path) -> None:
    async def scenario(spawner: Spawner, log: Path) -> None:
        inst = await Instance.spawn(
            "web",
            Endpoint("127.0.0.1"),
            ["sleep", "30"],
            {},
            tmp_path,
            tmp_path / "logs",
            spawner=spawner,
        )
        assert spawner.pid is not None
        os.kill(spawner.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        assert inst.returncode is None
        os.kill(inst.pid, signal.SIGKILL)
        assert await asyncio.wait_for(inst.wait(), 10) == -1  # not our child: code unknown
        assert inst.returncode == -1

    run(tmp_path, scenario)


def test_an_instance_that_cannot_start_is_a_spawn_error(tmp_path: Path) -> None:
    async def scenario(spawner: Spawner, log: Path) -> None:
        logs = tmp_path / "logs"
        with pytest.raises(SpawnError, match="command not found: no-such-command"):
            await Instance.spawn(
                "web",
                Endpoint("127.0.0.1"),
                ["no-such-command"],
                {},
                tmp_path,
                logs,
                spawner=spawner,
            )
        gone = tmp_path / "gone"
        with pytest.raises(SpawnError, match=f"working directory not found: {gone}$"):
            await Instance.spawn(
                "web", Endpoint("127.0.0.1"), ["true"], {}, gone, logs, spawner=spawner
            )
        assert list(logs.iterdir()) == []  # the log of a command that never ran is removed

    run(tmp_path, scenario)


def test_a_cancelled_spawn_leaves_no_process(tmp_path: Path) -> None:
    """The daemon told to stop while it starts a component: what started must not run."""
    tag = uuid.uuid4().hex

    async def scenario(spawner: Spawner, log: Path) -> None:
        spawning = asyncio.ensure_future(
            spawner.spawn(["sleep", "30"], tmp_path, env(CANCELLED=tag), log)
        )
        await asyncio.sleep(0)  # the request is on its way
        spawning.cancel()
        with pytest.raises(asyncio.CancelledError):
            await spawning
        # Replies come in order: once this one is in, so was the cancelled one's.
        await spawner.spawn(["true"], tmp_path, env(), log)
        for _ in range(100):
            if not cancelled():
                break
            await asyncio.sleep(0.05)
        assert not cancelled()

    def cancelled() -> list[Any]:
        return [
            p
            for p in psutil.process_iter()
            if _env(p).get("CANCELLED") == tag and p.status() != psutil.STATUS_ZOMBIE
        ]

    run(tmp_path, scenario)


def _env(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def test_closing_lets_the_spawner_go_and_leaves_children_running(tmp_path: Path) -> None:
    async def scenario(spawner: Spawner, log: Path) -> None:
        child = await spawner.spawn(["sleep", "30"], tmp_path, env(), log)
        pid = spawner.pid
        assert pid is not None
        await spawner.close()
        assert not psutil.pid_exists(pid)  # exited, and reaped
        assert psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE
        with pytest.raises(SpawnerGone):
            await child.wait()

    run(tmp_path, scenario)

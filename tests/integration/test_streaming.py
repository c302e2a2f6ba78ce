"""Long streaming responses (server-sent events and the like) across a rotation:
they flow chunk by chunk, stay on their instance while it drains, and are cut
only at drain_timeout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.conftest import cli_started, component, write_config


async def stream_during_restart(config: Path, url: str) -> tuple[list[bytes], float, str, bool]:
    """Read a chunked stream while `rotator restart` runs: the lines that arrived, the
    longest wait between two of them, the restart's output, and whether the stream
    ended cleanly."""
    lines: list[bytes] = []
    longest = 0.0
    complete = True
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        lines.append(await resp.content.readline())
        restart = await cli_started(config, "restart", "web")
        last = time.monotonic()
        try:
            while line := await resp.content.readline():
                now = time.monotonic()
                longest, last = max(longest, now - last), now
                lines.append(line)
        except aiohttp.ClientPayloadError:
            complete = False
        out, err = await restart.communicate()
        assert restart.returncode == 0, err
    return lines, longest, out.decode(), complete


def test_a_stream_finishes_on_its_instance_while_it_drains(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component(drain_timeout="10s")})
    daemon = daemon_factory(config)
    lines, longest, out, complete = asyncio.run(
        stream_during_restart(config, daemon.url("web", "/chunked?n=150"))
    )
    assert complete and lines == [f"chunk {i}\n".encode() for i in range(150)]
    assert longest < 0.5  # chunk by chunk (10 ms apart): nothing held back during the rotation
    assert "drained 1 request(s)" in out


def test_a_stream_outliving_drain_timeout_is_cut(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component(drain_timeout="500ms")})
    daemon = daemon_factory(config)
    lines, _, out, complete = asyncio.run(
        stream_during_restart(config, daemon.url("web", "/chunked?n=1000"))
    )
    assert not complete and 1 < len(lines) < 1000  # cut, and visibly so (no last chunk)
    assert "cut 1 request(s)" in out

"""WebSockets through the proxy: tunnelled untouched, drained like requests, and
closed with 1001 (going away) when they outlive their instance's drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from rotator.proxy.websocket import FrameBoundary
from tests.conftest import cli_started, component, write_config


def test_frame_boundary_follows_frames_of_every_length() -> None:
    frames = FrameBoundary()
    small = b"\x81\x05hello"
    medium = b"\x82\x7e" + (300).to_bytes(2, "big") + b"x" * 300
    large = b"\x82\x7f" + (70000).to_bytes(8, "big") + b"y" * 70000
    masked = b"\x81\x85" + b"\x01\x02\x03\x04" + b"abcde"
    stream = small + medium + large + masked
    for i in range(len(stream)):  # byte by byte: every split point is between or inside
        frames.feed(stream[i : i + 1])
        ends = {len(small), len(small + medium), len(small + medium + large), len(stream)}
        assert frames.between_frames == (i + 1 in ends), i


def test_websocket_echo_and_rotation(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component(drain_timeout="1500ms")})
    daemon = daemon_factory(config)
    url = daemon.url("web", "/ws")
    old = daemon.component("web")["active"]["pid"]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url)
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            await ws.send_bytes(b"\x00\x01\xff" * 50000)  # larger than one read
            assert (await ws.receive(timeout=5)).data == b"\x00\x01\xff" * 50000
            await ws.send_str("pid")
            assert (await ws.receive(timeout=5)).data == str(old)
            assert daemon.component("web")["in_flight"] == 1  # an open websocket counts

            restart = await cli_started(config, "restart", "web")
            # While the old instance drains, its websocket keeps working...
            for _ in range(100):
                status = daemon.component("web")
                if status["active"]["pid"] != old:
                    break
                await asyncio.sleep(0.05)
            new = daemon.component("web")["active"]["pid"]
            assert new != old
            await ws.send_str("pid")
            assert (await ws.receive(timeout=5)).data == str(old)
            # ...new websockets reach the new instance...
            fresh = await session.ws_connect(url)
            await fresh.send_str("pid")
            assert (await fresh.receive(timeout=5)).data == str(new)
            # ...and at drain_timeout the old one is told to go away (1001).
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
            out, err = await restart.communicate()
            assert restart.returncode == 0, err
            assert b"cut 1 request(s)" in out
            await fresh.send_str("still here")
            assert (await fresh.receive(timeout=5)).data == "still here"
            await fresh.close()
            await ws.close()

    asyncio.run(scenario())
    assert daemon.component("web")["in_flight"] == 0


def test_a_declined_upgrade_is_an_ordinary_answer(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as declined:
                await session.ws_connect(daemon.url("web", "/headers"))
            assert declined.value.status == 200
            async with session.get(daemon.url("web", "/")) as resp:  # the proxy is fine
                assert resp.status == 200

    asyncio.run(scenario())


def test_ping_pong_and_close_codes_pass_through(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(daemon.url("web", "/ws"), autoping=False)
            await ws.ping(b"are you there")
            pong = await ws.receive(timeout=5)
            assert pong.type == aiohttp.WSMsgType.PONG and pong.data == b"are you there"
            await ws.send_str("close:4001")  # the instance closes with its own code
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001
            await ws.close()

    asyncio.run(scenario())
    assert daemon.component("web")["in_flight"] == 0

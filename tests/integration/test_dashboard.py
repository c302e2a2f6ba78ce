"""The dashboard without a browser: the page is self-contained, and the one-time link
is the only way to restart rights, against a real daemon and the real CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web

from rotator.admin import guard
from rotator.config import Address
from rotator.dashboard import (
    CODE_LIFETIME,
    SESSION_LIFETIME,
    RedirectPages,
    Sessions,
    add_routes,
)
from tests.conftest import PY, cli, component, free_ports, wait_until, write_config


def test_the_page_is_self_contained_and_its_policy_allows_only_itself(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)

    async def scenario() -> tuple[int, str, str, str]:
        async with aiohttp.ClientSession() as session, session.get(daemon.admin + "/") as resp:
            return (
                resp.status,
                resp.content_type,
                resp.headers["Content-Security-Policy"],
                await resp.text(),
            )

    status, content_type, policy, page = asyncio.run(scenario())
    assert status == 200 and content_type == "text/html"
    assert re.findall(r"https?://", page) == []
    links = re.findall(r"\s(?:src|href|action)=[\"']?([^\"'\s>]*)", page)
    assert links and all(link.startswith("data:") for link in links), links
    # Daemon data reaches the page as text only.
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", page)
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy


def test_a_one_time_link_gives_a_session_that_may_restart_with_its_own_origin_only(
    tmp_path: Path, daemon_factory
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    admin = daemon.admin
    port = daemon.data["admin"]["listen"].rsplit(":", 1)[1]
    cookie_name = f"rotator_session_{port}"
    restart = f"{admin}/v1/components/web/restart?wait=0"
    pid = daemon.component("web")["active"]["pid"]

    async def scenario() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:

            async def post(url: str, **headers: str) -> int:
                async with s.post(url, headers=headers) as resp:
                    return resp.status

            assert await post(f"{admin}/v1/dashboard/link") == 401
            async with s.post(
                f"{admin}/v1/dashboard/link", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 200
                url = (await resp.json())["url"]
            assert url.startswith(f"{admin}/dashboard/login?code=")

            async with s.get(url, allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/"
                morsel = resp.cookies[cookie_name]
            assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
            cookie = {"Cookie": f"{cookie_name}={morsel.value}"}

            for used_or_wrong in (url, url + "x", f"{admin}/dashboard/login"):
                async with s.get(used_or_wrong, allow_redirects=False) as resp:
                    assert resp.status == 403 and resp.content_type == "text/html"
                    assert "rotator dashboard" in await resp.text()
                    assert cookie_name not in resp.cookies

            async with s.get(f"{admin}/v1/dashboard/session", headers=cookie) as resp:
                assert (await resp.json())["session"] is True
            async with s.get(f"{admin}/v1/dashboard/session") as resp:
                assert (await resp.json())["session"] is False

            # The cookie alone is what a cross-site form would send: refused without Origin.
            assert await post(restart, **cookie) == 403
            assert await post(restart, **cookie, Origin="http://evil.example") == 403
            assert await post(restart, Origin=admin) == 401
            assert await post(restart, Cookie=f"{cookie_name}=forged", Origin=admin) == 401
            # A session restarts; it cannot stop, shut down or mint itself new links.
            for path in ("/v1/components/web/stop", "/v1/shutdown", "/v1/dashboard/link"):
                assert await post(admin + path, **cookie, Origin=admin) == 401
            assert await post(restart, **cookie, Origin=admin) == 202

    asyncio.run(scenario())
    assert wait_until(lambda: daemon.component("web")["active"]["pid"] != pid, timeout=20)
    assert daemon.component("web")["state"] in ("running", "rotating")
    assert daemon.proc.poll() is None


async def _served(sessions: Sessions, listen: Address, pages: RedirectPages) -> web.AppRunner:
    """The dashboard's routes behind the admin guard, on a real socket, without a daemon."""
    app = web.Application(middlewares=[guard(listen, "token", sessions)])
    add_routes(app, sessions, listen, pages)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, listen.host, listen.port).start()
    return runner


def test_codes_and_sessions_expire(tmp_path: Path) -> None:
    now = [1000.0]
    listen = Address("127.0.0.1", free_ports(1)[0])
    sessions = Sessions(listen, clock=lambda: now[0])

    async def scenario() -> None:
        runner = await _served(sessions, listen, RedirectPages(tmp_path))
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:

                async def link() -> str:
                    async with s.post(
                        f"http://{listen}/v1/dashboard/link",
                        headers={"Authorization": "Bearer token"},
                    ) as resp:
                        return str((await resp.json())["url"])

                async def has_session() -> bool:
                    async with s.get(f"http://{listen}/v1/dashboard/session") as resp:
                        return bool((await resp.json())["session"])

                late = await link()
                now[0] += CODE_LIFETIME + 0.5
                async with s.get(late, allow_redirects=False) as resp:
                    assert resp.status == 403
                in_time = await link()
                now[0] += CODE_LIFETIME - 0.5
                async with s.get(in_time, allow_redirects=False) as resp:
                    assert resp.status == 303
                assert await has_session()
                now[0] += SESSION_LIFETIME
                assert not await has_session()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_link_is_refused_from_a_peer_that_is_not_loopback(tmp_path: Path) -> None:
    own = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    ]
    if not own:
        pytest.skip("this machine has no IPv4 address besides loopback")
    listen = Address(own[0], free_ports(1)[0])
    sessions = Sessions(listen)

    async def scenario() -> None:
        runner = await _served(sessions, listen, RedirectPages(tmp_path))
        try:
            url = f"http://{listen}/dashboard/login?code={sessions.new_code()}"
            async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False) as resp:
                assert resp.status == 403
                assert "in a browser on the daemon" in await resp.text()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_the_cli_prints_a_working_link_and_opens_it(tmp_path: Path, daemon_factory) -> None:
    config = write_config(tmp_path, {"web": component()})
    down = cli(config, "dashboard")
    assert down.returncode == 1 and down.stderr.startswith("rotator: ")
    assert len(down.stderr.strip().splitlines()) == 1
    daemon = daemon_factory(config)

    printed = cli(config, "dashboard")
    assert printed.returncode == 0, printed.stderr
    assert re.fullmatch(r"http://\S+/dashboard/login\?code=\S+\n", printed.stdout)
    # $BROWSER is what webbrowser.open runs: here, a script that records its command line
    # (what every local user can read) and reads the file it was given, as a browser would.
    record = tmp_path / "opened.json"
    browser = tmp_path / "browser.py"
    browser.write_text(
        "import json, os, sys, urllib.request\n"
        "path = urllib.request.url2pathname(sys.argv[1].removeprefix('file://'))\n"
        "page = urllib.request.urlopen(sys.argv[1]).read().decode()\n"
        f"open({str(record)!r}, 'w').write(json.dumps("
        "{'argv': sys.argv, 'page': page, 'mode': os.stat(path).st_mode & 0o777}))\n"
    )
    opened = subprocess.run(
        [PY, "-m", "rotator", "-c", str(config), "dashboard", "--open"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BROWSER": f"{PY} {browser} %s"},
    )
    assert opened.returncode == 0, opened.stderr
    seen = json.loads(record.read_text())
    url = opened.stdout.strip()
    code = url.split("code=")[1]
    assert code not in " ".join(seen["argv"]) and "code=" not in " ".join(seen["argv"])
    (page_url,) = seen["argv"][1:]
    page = Path(urllib.request.url2pathname(page_url.removeprefix("file://")))
    assert page.parent == tmp_path / "state" and seen["mode"] == 0o600
    assert f'content="0;url={url}"' in seen["page"]  # the page sends the browser on

    async def follow(url: str) -> tuple[int, str]:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(url) as resp:  # the redirect lands on the page
                assert resp.history[0].status == 303
                await resp.read()
            async with s.get(f"{daemon.admin}/v1/dashboard/session") as resp:
                return resp.status, str((await resp.json())["session"])

    assert page.exists()
    for link in (printed.stdout.strip(), url):
        assert asyncio.run(follow(link)) == (200, "True")
    assert not page.exists()  # gone with its code


def test_a_redirect_page_lives_as_long_as_its_code(tmp_path: Path) -> None:
    listen = Address("127.0.0.1", free_ports(1)[0])
    sessions = Sessions(listen)
    stale = tmp_path / "dashboard-0123456789abcdef.html"  # left by a daemon killed early
    stale.write_text("old")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    kept = tmp_path / "unrelated.html"
    kept.write_text("not ours to remove")

    async def scenario() -> None:
        runner = await _served(sessions, listen, RedirectPages(tmp_path, lifetime=0.5))
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:

                async def page() -> tuple[str, Path]:
                    async with s.post(
                        f"http://{listen}/v1/dashboard/link?page=1",
                        headers={"Authorization": "Bearer token"},
                    ) as resp:
                        answer = await resp.json()
                    return answer["url"], Path(answer["page"])

                url, used = await page()
                assert used.parent == tmp_path and used.stat().st_mode & 0o777 == 0o600
                assert not stale.exists() and kept.exists()
                async with s.get(url, allow_redirects=False) as resp:
                    assert resp.status == 303
                assert not used.exists()
                _, unused = await page()
                assert unused.exists()
                await asyncio.sleep(0.7)
                assert not unused.exists()
                async with s.post(f"http://{listen}/v1/dashboard/link?page=1") as resp:
                    assert resp.status == 401  # a page, like a link, needs the token
        finally:
            await runner.cleanup()

    asyncio.run(scenario())

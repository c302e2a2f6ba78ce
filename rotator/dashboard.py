"""The browser dashboard: its page, and the one-time links that give a browser restart rights.

The page (dashboard.html, shipped in the package) polls the read-only status API.
Restart rights come only through a link that `rotator dashboard`, which holds the
admin token, asks for: its code works once, within CODE_LIFETIME, and only from a
loopback peer, where it becomes a session cookie (random, HttpOnly, SameSite=Strict).
admin.guard() accepts that cookie for requests that change state only together with
an Origin header naming the admin address itself: a page elsewhere can neither send
the cookie along (SameSite) nor forge Origin; and a session may only restart
(SESSION_MAY), never stop, deploy or mint more links. Sessions live in the daemon's memory, so
a daemon restart ends them. For `rotator dashboard --open`, a link also comes as a
private file that redirects to it (RedirectPages): the browser is started on that file,
so that the code is on no command line. What the guard leaves to this module: codes,
sessions, those pages, and the routes (`GET /`, `GET /dashboard/login`,
`GET /v1/dashboard/session`, `POST /v1/dashboard/link`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import html
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from aiohttp import web

from rotator.config import Address

CODE_LIFETIME = 60.0
# The redirect pages of `rotator dashboard --open`, in the state_dir.
PAGE_PREFIX = "dashboard-"
# A browser left open keeps its rights this long at most; a new link starts a new session.
SESSION_LIFETIME = 12 * 3600.0
# Only token holders make sessions, but a loop in a script must not grow memory for ever.
MAX_SESSIONS = 64
# What a session may POST: the page's Restart button. Everything else needs the token.
SESSION_MAY = re.compile(r"/v1/components/[^/]+/restart")


class Sessions:
    """One-time login codes and the sessions they become, with their deadlines."""

    def __init__(self, listen: Address, clock: Callable[[], float] = time.monotonic) -> None:
        # Browsers send a cookie to every port of a host: one name per admin port keeps two
        # daemons on one machine from overwriting each other's sessions.
        self.cookie = f"rotator_session_{listen.port}"
        self._codes: dict[str, float] = {}
        self._sessions: dict[str, float] = {}
        self._clock = clock

    def new_code(self) -> str:
        now = self._clock()
        self._codes = {c: t for c, t in self._codes.items() if t > now}
        code = secrets.token_urlsafe(24)
        self._codes[code] = now + CODE_LIFETIME
        return code

    def redeem(self, code: str) -> str | None:
        """A new session for a valid code, which is used up; None if unknown, used or expired."""
        deadline = self._codes.pop(code, None)
        now = self._clock()
        if deadline is None or deadline <= now:
            return None
        self._sessions = {s: t for s, t in self._sessions.items() if t > now}
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]  # the oldest
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_LIFETIME
        return session

    def valid(self, request: web.Request) -> bool:
        deadline = self._sessions.get(request.cookies.get(self.cookie, ""))
        return deadline is not None and deadline > self._clock()

    def grants(self, request: web.Request) -> bool:
        """Whether the request's session may do what it asks: restarts, nothing else."""
        return SESSION_MAY.fullmatch(request.path) is not None and self.valid(request)


class RedirectPages:
    """Files that send a browser on to a one-time link, so that `rotator dashboard --open`
    can hand the browser a file:// URL instead of the code: a browser's command line is
    there for every local user to read (ps), and a code read there can be used first from
    any loopback connection. Each page is 0600 in the state_dir (0700): only its user's
    browser can read it. A page lives as long as its code: it is removed when the code is
    used or expires; one a daemon left when it stopped (its code died with it) goes when
    the next page is made."""

    def __init__(self, directory: Path, lifetime: float = CODE_LIFETIME) -> None:
        self.directory = directory
        self.lifetime = lifetime  # the codes'
        self._pages: dict[str, Path] = {}  # by code

    def write(self, code: str, url: str) -> Path:
        self._prune()
        path = self.directory / f"{PAGE_PREFIX}{secrets.token_hex(8)}.html"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_redirect_page(url))
        self._pages[code] = path
        asyncio.get_running_loop().call_later(self.lifetime, self.discard, code)
        return path

    def discard(self, code: str) -> None:
        """Remove the page of `code` (used up or expired), if it has one."""
        path = self._pages.pop(code, None)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def _prune(self) -> None:
        """Remove pages older than any code could be (left by a daemon that stopped)."""
        for path in self.directory.glob(f"{PAGE_PREFIX}*.html"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > self.lifetime:
                    path.unlink()


def _redirect_page(url: str) -> str:
    target = html.escape(url)
    script = json.dumps(url).replace("<", "\\u003c")
    return (
        "<!doctype html><meta charset=utf-8><meta name=referrer content=no-referrer>"
        f'<meta http-equiv=refresh content="0;url={target}">'
        "<title>rotator dashboard</title>"
        # replace(): the page leaves no entry in the history to come back to.
        f"<script>location.replace({script})</script>"
        f'<p><a href="{target}">Open the rotator dashboard</a> (a one-time link)</p>\n'
    )


def add_routes(
    app: web.Application, sessions: Sessions, listen: Address, pages: RedirectPages
) -> None:
    routes = web.RouteTableDef()

    @routes.get("/")
    async def page(request: web.Request) -> web.Response:
        text, policy = _page()
        return web.Response(
            text=text,
            content_type="text/html",
            headers={**_NO_STORE, "Content-Security-Policy": policy},
        )

    @routes.get("/v1/dashboard/session")
    async def session(request: web.Request) -> web.Response:
        return web.json_response({"session": sessions.valid(request)}, headers=_NO_STORE)

    @routes.post("/v1/dashboard/link")
    async def link(request: web.Request) -> web.Response:
        code = sessions.new_code()
        url = f"http://{_browser_address(listen)}/dashboard/login?code={code}"
        if request.query.get("page", "0") not in ("1", "true", "yes"):
            return web.json_response({"url": url})
        try:
            page = pages.write(code, url)
        except OSError as exc:
            return web.json_response(
                {"error": f"cannot write a page into {pages.directory}: {exc.strerror or exc}"},
                status=500,
            )
        return web.json_response({"url": url, "page": str(page)})

    @routes.get("/dashboard/login")
    async def login(request: web.Request) -> web.Response:
        if not _loopback(request.remote):
            return _refused("A dashboard link works only in a browser on the daemon's machine.")
        code = request.query.get("code", "")
        session = sessions.redeem(code)
        pages.discard(code)
        if session is None:
            return _refused("This link is wrong, used up or older than 60 seconds.")
        resp = web.Response(status=303, headers={**_NO_STORE, "Location": "/"})
        resp.set_cookie(sessions.cookie, session, path="/", httponly=True, samesite="Strict")
        return resp

    app.add_routes(routes)


def _loopback(remote: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:  # a Unix socket, or nothing known
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _browser_address(listen: Address) -> str:
    """The admin address as a browser on this machine reaches it."""
    if listen.host in ("0.0.0.0", ""):
        return f"127.0.0.1:{listen.port}"
    if listen.host == "::":
        return f"[::1]:{listen.port}"
    return str(listen)


def _refused(reason: str) -> web.Response:
    return web.Response(
        status=403,
        content_type="text/html",
        headers={**_NO_STORE, "Content-Security-Policy": "default-src 'none'"},
        text=(
            "<!doctype html><meta charset=utf-8><title>rotator: link refused</title>"
            f"<p>{html.escape(reason)}</p>"
            "<p>Run <code>rotator dashboard</code> again for a new one-time link.</p>"
        ),
    )


_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


@functools.cache
def _page() -> tuple[str, str]:
    """The page and a Content-Security-Policy that lets only its own inline script and
    style run and lets it talk only to the admin address."""
    text = resources.files("rotator").joinpath("dashboard.html").read_text(encoding="utf-8")
    (script,) = re.findall(r"<script>(.*?)</script>", text, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", text, re.DOTALL)
    policy = (
        f"default-src 'none'; script-src '{_sha256(script)}'; style-src '{_sha256(style)}'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return text, policy


def _sha256(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()

"""The demo component: a small aiohttp app for the example config, tests and benchmarks.

Run as `python -m rotator.demo --port P`, or `--unix PATH` to listen on a Unix
socket instead. Flags make it misbehave on purpose (slow start, crash, never
healthy, ignore SIGTERM, leave a child process, close every connection, share its
port with SO_REUSEPORT) or speak sd_notify to $NOTIFY_SOCKET (READY=1 some time after
listening, WATCHDOG=1 for a while, STATUS=); routes echo what they received so tests can check what
the proxy forwarded. Every response carries X-Instance-Pid/-Port (and
X-Instance-Socket on a Unix socket).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

CHUNK = 64 * 1024
PATTERN = bytes(range(256)) * (CHUNK // 256)  # /bytes body: byte i is i % 256


@dataclass
class Config:
    name: str
    host: str
    port: int  # the bound port once listening (matters for --port 0); 0 on a Unix socket
    close: bool
    never_healthy: bool
    unix: str | None = None  # the Unix socket path, with --unix
    fail_every: int = 0  # --fail-every: every Nth request of the index answers 500
    served: int = 0


CONFIG = web.AppKey("config", Config)


def say(line: str) -> None:
    print(line, flush=True)


def query_num(request: web.Request, key: str, default: float) -> float:
    try:
        return max(0.0, float(request.query.get(key, default)))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be a number") from None


async def health(request: web.Request) -> web.Response:
    if request.app[CONFIG].never_healthy:
        return web.Response(status=503, text="never healthy")
    return web.Response(text="ok")


async def index(request: web.Request) -> web.Response:
    cfg, url = request.app[CONFIG], request.rel_url
    cfg.served += 1
    if cfg.fail_every and cfg.served % cfg.fail_every == 0:
        return web.json_response({"error": "--fail-every", "pid": os.getpid()}, status=500)
    info = {"name": cfg.name, "pid": os.getpid(), "port": cfg.port, "method": request.method}
    if cfg.unix is not None:
        info["socket"] = cfg.unix
    return web.json_response({**info, "path": url.path, "query": url.raw_query_string})


async def slow(request: web.Request) -> web.Response:
    seconds = query_num(request, "seconds", 1)
    await asyncio.sleep(seconds)
    port = request.app[CONFIG].port
    return web.json_response({"pid": os.getpid(), "port": port, "slept": seconds})


async def some_bytes(request: web.Request) -> web.StreamResponse:
    n = int(query_num(request, "n", 0))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = n
    await resp.prepare(request)
    while n > 0:
        await resp.write(PATTERN[: min(n, CHUNK)])
        n -= CHUNK
    await resp.write_eof()
    return resp


async def echo(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    if "Content-Type" in request.headers:
        resp.headers["Content-Type"] = request.headers["Content-Type"]
    if request.content_length is not None:
        resp.content_length = request.content_length
        resp.headers["X-Echo-Length"] = str(request.content_length)
    await resp.prepare(request)
    async for data in request.content.iter_any():
        await resp.write(data)
    await resp.write_eof()
    return resp


async def headers(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "method": request.method,
            "path_qs": request.raw_path,
            "http_version": f"{request.version.major}.{request.version.minor}",
        }
    )


async def chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(int(query_num(request, "n", 3))):
        if i:
            await asyncio.sleep(0.01)
        await resp.write(f"chunk {i}\n".encode())
    await resp.write_eof()
    return resp


async def cookies(request: web.Request) -> web.Response:
    resp = web.Response(text="cookies")
    resp.set_cookie("a", "1")
    resp.set_cookie("b", "2")
    return resp


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Echo: text and binary frames come back as sent; the text "pid" gets this
    instance's pid (to see which instance a websocket is on), "close:CODE" a close
    frame with that code."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == web.WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]))
                break
            await ws.send_str(str(os.getpid()) if msg.data == "pid" else msg.data)
        elif msg.type == web.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be 200-599")
    return web.Response(status=code)


async def on_prepare(request: web.Request, resp: web.StreamResponse) -> None:
    cfg = request.app[CONFIG]
    resp.headers["X-Instance-Pid"] = str(os.getpid())
    resp.headers["X-Instance-Port"] = str(cfg.port)
    if cfg.unix is not None:
        resp.headers["X-Instance-Socket"] = cfg.unix
    if cfg.close:  # like gunicorn sync workers: the server closes, TIME_WAIT stays on our port
        resp.force_close()  # headers are computed before this hook: say it ourselves too
        resp.headers["Connection"] = "close"


def make_app(cfg: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = cfg
    app.on_response_prepare.append(on_prepare)
    app.router.add_get("/health", health)
    app.router.add_get("/slow", slow)
    # Streaming handlers write their body themselves: no HEAD for them, since
    # aiohttp would send that body even in reply to HEAD.
    app.router.add_get("/bytes", some_bytes, allow_head=False)
    app.router.add_post("/echo", echo)
    app.router.add_get("/headers", headers)
    app.router.add_get("/chunked", chunked, allow_head=False)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/ws", websocket)
    app.router.add_get(r"/status/{code:\d+}", status)
    app.router.add_get("/{tail:.*}", index)  # "/" and any other path
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m rotator.demo", description="The rotator demo component."
    )
    p.add_argument(
        "--port", type=int, default=env.get("PORT") or None, help="default: $PORT (0: any)"
    )
    p.add_argument("--host", default=env.get("HOST", "127.0.0.1"))
    p.add_argument("--unix", metavar="PATH", help="listen on this Unix socket, not host:port")
    p.add_argument("--name", default=env.get("NAME", "demo"))
    p.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--close", action="store_true", help="answer with Connection: close")
    p.add_argument("--crash-on-start", action="store_true", help="exit 3 before binding")
    p.add_argument("--never-healthy", action="store_true", help="/health answers 503")
    p.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops it")
    p.add_argument("--spawn-child", action="store_true", help="leave a child in our group")
    p.add_argument("--reuse-port", action="store_true", help="bind with SO_REUSEPORT")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS")
    p.add_argument(
        "--notify-after", type=float, metavar="SECONDS", help="READY=1 this long after listening"
    )
    p.add_argument(
        "--watchdog-for", type=float, metavar="SECONDS", help="WATCHDOG=1 every 0.1 s, then stop"
    )
    p.add_argument("--status", help="STATUS= to send once listening")
    p.add_argument(
        "--fail-every", type=int, default=0, metavar="N", help="every Nth request answers 500"
    )
    args = p.parse_args(argv)
    if args.unix is not None:
        args.port = 0
    elif args.port is None:
        p.error("--port or $PORT is required (or --unix PATH)")
    return args


def sd_notify(message: str) -> bool:
    """One datagram to $NOTIFY_SOCKET, as sd_notify(3) sends it; False without one."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
    return True


async def speak_sd_notify(args: argparse.Namespace, tag: str) -> None:
    """What --status, --notify-after and --watchdog-for ask for, once listening."""
    if args.status:
        sd_notify(f"STATUS={args.status}")
    if args.watchdog_for is not None:
        asyncio.get_running_loop().create_task(_watchdog(args.watchdog_for, tag))
    if args.notify_after is not None:
        await asyncio.sleep(args.notify_after)
        if sd_notify("READY=1"):
            say(f"{tag} sent READY=1 at {time.time():.6f}")


async def _watchdog(seconds: float, tag: str) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(0.1)
    say(f"{tag} stopped sending WATCHDOG=1")


def spawn_child() -> int:
    """A long sleeper in our process group, with SIGTERM's default action restored."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_DFL); time.sleep(3600)"
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return child.pid


async def serve(args: argparse.Namespace) -> int:
    cfg = Config(
        args.name, args.host, args.port, args.close, args.never_healthy, args.unix, args.fail_every
    )
    tag = f"demo {cfg.name} pid {os.getpid()}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if sig == signal.SIGTERM and args.ignore_sigterm:
            signal.signal(sig, signal.SIG_IGN)
            continue
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)

    if args.spawn_child:
        say(f"{tag} spawned child pid {spawn_child()}")
    if args.startup_delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.startup_delay)
        if stop.is_set():
            say(f"{tag} stopping")
            return 0
    if args.crash_on_start:
        say(f"{tag} crashing on start (--crash-on-start)")
        return 3

    access: dict[str, Any] = {} if args.access_log else {"access_log": None}
    if args.access_log:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    runner = web.AppRunner(make_app(cfg), shutdown_timeout=args.shutdown_timeout, **access)
    await runner.setup()
    try:
        site: web.BaseSite = (
            web.UnixSite(runner, cfg.unix)
            if cfg.unix is not None
            else web.TCPSite(runner, cfg.host, cfg.port, reuse_port=args.reuse_port or None)
        )
        where = cfg.unix if cfg.unix is not None else f"{cfg.host}:{cfg.port}"
        try:
            await site.start()
        except OSError as exc:
            say(f"{tag} cannot listen on {where}: {exc}")
            return 1
        if cfg.unix is None:
            cfg.port = int(runner.addresses[0][1])
            where = f"{cfg.host}:{cfg.port}"
        say(f"{tag} listening on {where}")
        notifying = asyncio.ensure_future(speak_sd_notify(args, tag))
        await stop.wait()
        notifying.cancel()
        say(f"{tag} stopping")
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

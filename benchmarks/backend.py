"""The backend of the restart benchmarks: a small aiohttp app that notes when things first happen.

    python benchmarks/backend.py --port P [--startup-delay S] [--record DIR]

It waits `--startup-delay` seconds before it binds its port (an app that loads
before it listens), then answers `GET /health` with 200 and every other path,
any method, with a short body and an X-Instance-Pid header. With `--record`, it
writes DIR/<pid>.json whenever one of these happens for the first time, as
time.time() values, so that a benchmark can see a switch from the backend's
side: `started` (before aiohttp is imported; the interpreter's own ~20 ms
start-up is not in it: psutil's process create time is not on time.time()'s
clock on Linux, where it derives from a boot time in whole seconds),
`listening`, `first_health_ok` and `first_request` (the first request that is
not a health check). With `--notify` it sends sd_notify's READY=1 to $NOTIFY_SOCKET
once listening (`health: {ready: notify}`) and records `notified`.

Plain asyncio, like rotator's demo app: the benchmarks compare ways of
restarting a typical Python app, not a tuned one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

STARTED = time.time()  # before aiohttp's import: that is most of this app's start-up

from aiohttp import web  # noqa: E402

BODY = b'{"ok": true}'


class Record:
    """First-time events of this process, written to a file as they happen."""

    def __init__(self, directory: str | None) -> None:
        self.path = Path(directory) / f"{os.getpid()}.json" if directory else None
        self.times: dict[str, float] = {"started": STARTED}

    def first(self, event: str) -> None:
        if event in self.times:
            return
        self.times[event] = time.time()
        if self.path is not None:
            # Two or three small writes per process: cheap enough for the request path.
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), **self.times}))
            tmp.replace(self.path)


RECORD = web.AppKey("record", Record)
PID = str(os.getpid())


async def health(request: web.Request) -> web.Response:
    request.app[RECORD].first("first_health_ok")
    return web.Response(text="ok", headers={"X-Instance-Pid": PID})


async def anything(request: web.Request) -> web.Response:
    request.app[RECORD].first("first_request")
    await request.read()
    return web.Response(body=BODY, content_type="application/json", headers={"X-Instance-Pid": PID})


async def serve(args: argparse.Namespace) -> int:
    record = Record(args.record)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.startup_delay)
    if stop.is_set():
        return 0
    app = web.Application()
    app[RECORD] = record
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=args.shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        record.first("listening")
        if args.notify and (address := os.environ.get("NOTIFY_SOCKET")):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"READY=1", address)
            record.first("notified")
        print(f"backend pid {os.getpid()} listening on {args.host}:{args.port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--startup-delay", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--record", metavar="DIR", help="write DIR/<pid>.json with first-event times")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--notify", action="store_true", help="READY=1 to $NOTIFY_SOCKET once listening")
    return asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""The admin HTTP API (aiohttp): what the CLI talks to.

Thin handlers, one daemon call each. Every request must name the admin
address in its Host header (a web page that rebinds a DNS name to 127.0.0.1
cannot) and carry no foreign Origin; every request that changes state must
carry the token from state_dir/admin.token, which only the daemon's user can
read. A bad request gets a JSON error and never harms the daemon.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rotator.component import RotationFailed
from rotator.config import Address
from rotator.events import Event

if TYPE_CHECKING:
    from rotator.daemon import Daemon

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def allowed_hosts(listen: Address) -> frozenset[str]:
    port = listen.port
    names = {str(listen), f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    return frozenset(names)


def guard(listen: Address, token: str) -> Any:
    hosts = allowed_hosts(listen)
    origins = frozenset(f"http://{h}" for h in hosts)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Host", "") not in hosts:
            return error(403, "Host header does not name the admin address")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in origins:
            return error(403, "cross-origin requests are refused")
        if request.method not in SAFE_METHODS:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong token (see state_dir/admin.token)")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return error(exc.status, exc.reason)

    return middleware


def make_app(daemon: Daemon, token: str) -> web.Application:
    app = web.Application(middlewares=[guard(daemon.config.admin.listen, token)])
    routes = web.RouteTableDef()

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(daemon.status())

    @routes.post("/v1/components/{name}/restart")
    async def restart(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        component = daemon.components.get(name)
        if component is None:
            return error(404, f"no component named {name!r} (have: {', '.join(daemon.components)})")
        return await _stream_progress(request, name, component.rotate)

    @routes.post("/v1/shutdown")
    async def shutdown(request: web.Request) -> web.Response:
        daemon.request_shutdown()
        return web.json_response({"result": "shutting down"}, status=202)

    app.add_routes(routes)
    return app


async def _stream_progress(
    request: web.Request, name: str, operation: Callable[[], Awaitable[None]]
) -> web.StreamResponse:
    """Run `operation`, streaming the component's events as JSON lines, then a result line.
    The operation runs to its end even if the client goes away."""
    daemon: Daemon = request.app["daemon"]
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def on_event(event: Event) -> None:
        if event.component == name:
            queue.put_nowait({"event": event.to_json()})

    unsubscribe = daemon.bus.subscribe(on_event)
    task = asyncio.ensure_future(operation())
    # Queued after every event the operation published: the stream's end marker.
    task.add_done_callback(lambda _: queue.put_nowait(None))
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    try:
        await resp.prepare(request)
        while (item := await queue.get()) is not None:
            await _write_line(resp, item)
        await _write_line(resp, _outcome(task))
    except (ConnectionResetError, RuntimeError):
        task.add_done_callback(_outcome)  # the client left; the operation goes on
    finally:
        unsubscribe()
    return resp


def _outcome(task: asyncio.Future[None]) -> dict[str, Any]:
    exc = task.exception()
    if exc is None:
        return {"result": "ok"}
    if isinstance(exc, RotationFailed):
        return {"result": "failed", "error": exc.reason, "log_tail": exc.log_tail}
    return {"result": "failed", "error": f"{type(exc).__name__}: {exc}"}


async def _write_line(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(json.dumps(obj).encode() + b"\n")

"""The admin HTTP API (aiohttp): what the CLI talks to.

Thin handlers, one component call each. Every request must name the admin
address in its Host header (a web page that rebinds a DNS name to 127.0.0.1
cannot) and carry no foreign Origin; every request that changes state must
carry the token from state_dir/admin.token, which only the daemon's user can
read. A bad request gets a JSON error and never harms the daemon.

Operations on a component stream their progress as JSON lines (one
`{"event": ...}` per step, then `{"result": "ok"|"failed", ...}`); with
`?wait=0` they answer 202 at once and run on in the daemon.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from rotator.component import Component, RotationFailed
from rotator.config import Address, with_overrides
from rotator.events import Event

if TYPE_CHECKING:
    from rotator.daemon import Daemon

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Operation = Callable[[], Awaitable[None]]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY = 64 * 1024


class BadRequest(Exception):
    """A request the API cannot act on; the message says why (answered 400)."""


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def allowed_hosts(listen: Address) -> frozenset[str]:
    port = listen.port
    return frozenset({str(listen), f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"})


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
        except BadRequest as exc:
            return error(400, str(exc))
        except web.HTTPException as exc:
            return error(exc.status, exc.reason)

    return middleware


def make_app(daemon: Daemon, token: str) -> web.Application:
    app = web.Application(
        middlewares=[guard(daemon.config.admin.listen, token)], client_max_size=MAX_BODY
    )
    routes = web.RouteTableDef()

    def component(request: web.Request) -> Component:
        name = request.match_info["name"]
        found = daemon.components.get(name)
        if found is None:
            raise web.HTTPNotFound(
                reason=f"no component named {name!r} (have: {', '.join(daemon.components)})"
            )
        return found

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(daemon.status())

    @routes.post("/v1/components/{name}/restart")
    async def restart(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        await body(request, {})
        return await run(request, daemon, comp.name, comp.rotate)

    @routes.post("/v1/components/{name}/start")
    async def start(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        await body(request, {})
        return await run(request, daemon, comp.name, comp.start)

    @routes.post("/v1/components/{name}/stop")
    async def stop(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        args = await body(request, {"force": bool})
        return await run(
            request, daemon, comp.name, lambda: comp.stop(force=args.get("force", False))
        )

    @routes.post("/v1/components/{name}/deploy")
    async def deploy(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        args = await body(request, {"command": (str, list), "cwd": str, "env": dict})
        try:
            spec = with_overrides(
                comp.spec,
                command=args.get("command"),
                cwd=args.get("cwd"),
                env=args.get("env"),
                base=daemon.config.path.parent,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return await run(request, daemon, comp.name, lambda: comp.deploy(spec))

    @routes.post("/v1/components/{name}/rollback")
    async def rollback(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        await body(request, {})
        if comp.previous is None:
            raise BadRequest(f"{comp.name}: nothing to roll back to (no definition was deployed)")
        return await run(request, daemon, comp.name, comp.rollback)

    @routes.post("/v1/shutdown")
    async def shutdown(request: web.Request) -> web.Response:
        await body(request, {})
        daemon.request_shutdown()
        return web.json_response({"result": "shutting down"}, status=202)

    app.add_routes(routes)
    return app


async def body(request: web.Request, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """The request's JSON object body (empty allowed), with only these fields of these types."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise BadRequest(f"unknown field {key!r} (allowed: {allowed})")
        if not isinstance(value, fields[key]):
            raise BadRequest(f"field {key!r} has the wrong type")
    return data


async def run(
    request: web.Request, daemon: Daemon, name: str, operation: Operation
) -> web.StreamResponse:
    """Run `operation` to its end, whatever the client does; stream its events unless
    the client asked not to wait."""
    if request.query.get("wait", "1") in ("0", "false", "no"):
        task = asyncio.ensure_future(operation())
        task.add_done_callback(_outcome)  # retrieved, so a failure is not "never retrieved"
        return web.json_response({"result": "accepted"}, status=202)
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
    if task.cancelled():
        return {"result": "failed", "error": "cancelled (the daemon is shutting down)"}
    exc = task.exception()
    if exc is None:
        return {"result": "ok"}
    if isinstance(exc, RotationFailed):
        return {"result": "failed", "error": exc.reason, "log_tail": exc.log_tail}
    return {"result": "failed", "error": f"{type(exc).__name__}: {exc}"}


async def _write_line(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(json.dumps(obj).encode() + b"\n")

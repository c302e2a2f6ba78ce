"""The admin HTTP API (aiohttp): what the CLI talks to.

Thin handlers, one call each to the daemon, which they reach only through `Control`:
a restart from the CLI and one from the dashboard take the same path. Every request
must name the admin
address in its Host header (a web page that rebinds a DNS name to 127.0.0.1
cannot) and carry no foreign Origin; every request that changes state must
carry the token from state_dir/admin.token, which only the daemon's user can
read, or a dashboard session cookie together with the admin address as Origin
(sessions and the dashboard's routes: dashboard.py). A bad request gets a JSON
error and never harms the daemon.

Operations on a component stream their progress as JSON lines (one
`{"event": ...}` per step, then `{"result": "ok"|"failed", ...}`); with
`?wait=0` they answer 202 at once and run on in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rotator import logs
from rotator.canary import from_request
from rotator.component import Component, RotationFailed
from rotator.config import Address, CanarySpec, ComponentSpec, Config, with_overrides
from rotator.configfile import MAX_REPLICAS
from rotator.dashboard import RedirectPages, Sessions, add_routes
from rotator.events import Event, EventBus
from rotator.fleet import ReloadRejected
from rotator.logs import LogReader
from rotator.printer import error_text
from rotator.reload import Reload


class Control(Protocol):
    """What the admin API may ask of the daemon (daemon.Daemon): every operation, on one
    component or many, goes through here."""

    config: Config
    bus: EventBus

    @property
    def components(self) -> Mapping[str, Component]: ...

    def status(self) -> dict[str, Any]: ...
    def exposition(self) -> bytes: ...  # the Prometheus metrics
    async def restart(self, names: Sequence[str] | None, parallel: int = 1) -> dict[str, Any]: ...
    async def start(self, name: str) -> None: ...
    async def stop(self, name: str, force: bool) -> None: ...
    async def deploy(self, name: str, spec: ComponentSpec) -> None: ...
    async def rollback(self, name: str) -> None: ...
    async def scale(self, name: str, replicas: int) -> None: ...
    async def canary(
        self, name: str, spec: ComponentSpec, weight: int, rule: CanarySpec
    ) -> None: ...
    async def promote(self, name: str) -> None: ...
    async def prepare_reload(self) -> Reload: ...
    async def apply_reload(self, reload: Reload) -> dict[str, Any]: ...
    async def settled(self) -> str | None: ...  # once the state file has every change
    def request_shutdown(self) -> None: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# An operation may return a summary: it is merged into the final result line.
Operation = Callable[[], Awaitable[dict[str, Any] | None]]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Routes that only read but need the token all the same: what they show (an app's
# output) may contain secrets.
SECRET_READS = frozenset({"component-logs", "events"})
# The most history lines one logs request may ask for.
MAX_LOG_LINES = 10_000
# Set when the admin API shuts down: long streams end instead of holding the daemon up.
CLOSING = web.AppKey("closing", asyncio.Event)
# Whether the request carried the admin token (set by the guard for every request).
HAS_TOKEN = web.RequestKey("has_token", bool)
MAX_BODY = 64 * 1024
# Following events: a client that falls this far behind misses events rather than
# growing the daemon's memory; a blank line this often detects a client that left.
FOLLOW_BACKLOG = 10_000
HEARTBEAT = 15.0


class BadRequest(Exception):
    """A request the API cannot act on; the message says why (answered 400)."""


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def allowed_hosts(listen: Address) -> frozenset[str]:
    port = listen.port
    return frozenset({str(listen), f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"})


def guard(listen: Address, token: str, sessions: Sessions) -> Any:
    hosts = allowed_hosts(listen)
    origins = frozenset(f"http://{h}" for h in hosts)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Host", "") not in hosts:
            return error(403, "Host header does not name the admin address")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in origins:
            return error(403, "cross-origin requests are refused")
        given = request.headers.get("Authorization", "")
        request[HAS_TOKEN] = hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
        if request.match_info.route.name in SECRET_READS and not request[HAS_TOKEN]:
            return error(401, "missing or wrong token (see state_dir/admin.token)")
        if request.method not in SAFE_METHODS:
            given = request.headers.get("Authorization", "")
            by_token = hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
            if not by_token and not sessions.grants(request):
                return error(401, "missing or wrong token (see state_dir/admin.token)")
            # The CSRF defence: a browser names the page's origin on every POST.
            if not by_token and origin != f"http://{request.host}":
                return error(403, "a dashboard session needs the admin address as Origin")
        try:
            return await handler(request)
        except BadRequest as exc:
            return error(400, str(exc))
        except web.HTTPException as exc:
            return error(exc.status, exc.reason)

    return middleware


def make_app(daemon: Control, token: str) -> web.Application:
    listen = daemon.config.admin.listen
    sessions = Sessions(listen)
    app = web.Application(middlewares=[guard(listen, token, sessions)], client_max_size=MAX_BODY)
    add_routes(app, sessions, listen, RedirectPages(daemon.config.state_dir))
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
        # Readable by anyone on the machine, but for the log lines of a failed
        # component: an app's output may hold secrets (as for logs and events).
        found = daemon.status()
        if not request[HAS_TOKEN]:
            for comp in found["components"]:
                comp["log_tail"] = []
        return web.json_response(found)

    @routes.get("/metrics")
    async def metrics(request: web.Request) -> web.Response:
        # Read-only like /v1/status: no token, so Prometheus needs no secret.
        return web.Response(body=daemon.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.post("/v1/components/{name}/restart")
    async def restart(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        await body(request, {})
        return await run(request, daemon, comp.name, partial(_restart_one, daemon, comp.name))

    @routes.post("/v1/components/{name}/start")
    async def start(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        await body(request, {})
        return await run(request, daemon, comp.name, partial(daemon.start, comp.name))

    @routes.post("/v1/components/{name}/stop")
    async def stop(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        args = await body(request, {"force": bool})
        force = args.get("force", False)
        return await run(request, daemon, comp.name, partial(daemon.stop, comp.name, force))

    @routes.post("/v1/components/{name}/deploy")
    async def deploy(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        args = await body(
            request, {"command": (str, list), "cwd": str, "env": dict, "canary": dict}
        )
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
        if "canary" in args:
            try:
                weight, rule = from_request(args["canary"], spec.canary)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            operation = partial(daemon.canary, comp.name, spec, weight, rule)
            return await run(request, daemon, comp.name, operation)
        return await run(request, daemon, comp.name, partial(daemon.deploy, comp.name, spec))

    @routes.post("/v1/components/{name}/promote")
    async def promote(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        await body(request, {})
        if comp.canary is None:
            raise BadRequest(f"{comp.name}: no canary is running")
        return await run(request, daemon, comp.name, partial(daemon.promote, comp.name))

    @routes.post("/v1/components/{name}/rollback")
    async def rollback(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        await body(request, {})
        if comp.previous is None and comp.canary is None:
            raise BadRequest(f"{comp.name}: nothing to roll back to (no definition was deployed)")
        return await run(request, daemon, comp.name, partial(daemon.rollback, comp.name))

    @routes.post("/v1/components/{name}/scale")
    async def scale(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        args = await body(request, {"replicas": int})
        replicas = args.get("replicas")
        if replicas is None or isinstance(replicas, bool) or not 1 <= replicas <= MAX_REPLICAS:
            raise BadRequest(f"field 'replicas' must be a whole number from 1 to {MAX_REPLICAS}")
        return await run(request, daemon, comp.name, partial(daemon.scale, comp.name, replicas))

    @routes.get("/v1/events", name="events")
    async def events(request: web.Request) -> web.StreamResponse:
        n = _whole(request.query.get("n", "100"), "n")
        only = request.query.get("component")
        if only is not None and only not in daemon.components:
            raise BadRequest(f"no component named {only!r} (have: {', '.join(daemon.components)})")
        follow = request.query.get("follow", "0") in ("1", "true", "yes")
        return await stream_events(request, daemon, n, only, follow)

    @routes.post("/v1/restart")
    async def restart_many(request: web.Request) -> web.StreamResponse:
        args = await body(request, {"components": list, "parallel": int})
        names = args.get("components")
        if names is not None:
            if not names or not all(isinstance(n, str) for n in names):
                raise BadRequest("field 'components' must be a non-empty list of names")
            for name in names:
                if name not in daemon.components:
                    raise BadRequest(
                        f"no component named {name!r} (have: {', '.join(daemon.components)})"
                    )
        parallel = args.get("parallel", 1)
        if isinstance(parallel, bool) or parallel < 1:
            raise BadRequest("field 'parallel' must be a whole number of at least 1")
        involved = set(names) if names is not None else None
        return await run(request, daemon, involved, partial(daemon.restart, names, parallel))

    @routes.post("/v1/reload")
    async def reload(request: web.Request) -> web.StreamResponse:
        await body(request, {})
        try:
            prepared = await daemon.prepare_reload()
        except ReloadRejected as exc:
            return web.json_response(
                {"error": "the config was not reloaded: nothing changed", "problems": exc.problems},
                status=400,
            )
        return await run(request, daemon, None, partial(daemon.apply_reload, prepared))

    @routes.get("/v1/components/{name}/logs", name="component-logs")
    async def component_logs(request: web.Request) -> web.StreamResponse:
        comp = component(request)
        n = _whole(request.query.get("n", "100"), "n")
        if n > MAX_LOG_LINES:
            raise BadRequest(f"query parameter 'n' must be at most {MAX_LOG_LINES}")
        text = request.query.get("instance")
        pid = None if text is None else _whole(text, "instance")
        follow = request.query.get("follow", "0") in ("1", "true", "yes")
        reader = LogReader(daemon.config.log_dir(comp.name), pid)
        loop = asyncio.get_running_loop()
        history = await loop.run_in_executor(None, lambda: reader.history(n, follow=follow))
        if pid is not None and not reader.files:
            have = ", ".join(map(str, logs.pids(reader.log_dir))) or "none"
            return error(
                404, f"{comp.name}: no log of an instance with pid {pid} (logs kept for: {have})"
            )
        return await stream_logs(request, reader, history, follow)

    @routes.post("/v1/shutdown")
    async def shutdown(request: web.Request) -> web.Response:
        await body(request, {})
        daemon.request_shutdown()
        return web.json_response({"result": "shutting down"}, status=202)

    app.add_routes(routes)
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    return app


async def _closing(app: web.Application) -> None:
    app[CLOSING].set()


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
    request: web.Request, daemon: Control, names: str | Collection[str] | None, operation: Operation
) -> web.StreamResponse:
    """Run `operation` to its end, whatever the client does; stream the events of the
    component(s) it concerns (None: all) unless the client asked not to wait."""
    if request.query.get("wait", "1") in ("0", "false", "no"):
        task = asyncio.ensure_future(operation())
        task.add_done_callback(_outcome)  # retrieved, so a failure is not "never retrieved"
        return web.json_response({"result": "accepted"}, status=202)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    wanted = {names} if isinstance(names, str) else names

    def on_event(event: Event) -> None:
        if wanted is None or event.component in wanted:
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
        outcome = _outcome(task)
        # What the operation changed is on record only once the state file has it.
        if (unsaved := await daemon.settled()) is not None:
            outcome["state_file_error"] = unsaved
        await _write_line(resp, outcome)
    except (ConnectionResetError, RuntimeError):
        task.add_done_callback(_outcome)  # the client left; the operation goes on
    finally:
        unsubscribe()
    return resp


def _whole(text: str, field: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise BadRequest(f"query parameter {field!r} must be a whole number, not {text!r}")
    return value


async def stream_events(
    request: web.Request, daemon: Control, n: int, only: str | None, follow: bool
) -> web.StreamResponse:
    """The newest `n` events as JSON lines, then (following) each new one as it happens,
    until the client leaves or the admin API shuts down. A blank line every HEARTBEAT
    seconds finds a client that left while nothing happened."""
    queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=FOLLOW_BACKLOG)

    def on_event(event: Event) -> None:
        if (only is None or event.component == only) and queue.qsize() < FOLLOW_BACKLOG - 1:
            queue.put_nowait(event)

    closing = asyncio.ensure_future(request.app[CLOSING].wait())
    closing.add_done_callback(lambda _: queue.put_nowait(None))  # a place is kept for it

    unsubscribe = daemon.bus.subscribe(on_event) if follow else (lambda: None)
    past = [e for e in daemon.bus.history if only is None or e.component == only]
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    try:
        await resp.prepare(request)
        for event in past[len(past) - n :] if n else []:
            await _write_line(resp, event.to_json())
        while follow:
            try:
                item = await asyncio.wait_for(queue.get(), HEARTBEAT)
            except TimeoutError:
                await resp.write(b"\n")
                continue
            if item is None:
                break
            await _write_line(resp, item.to_json())
    except (ConnectionResetError, RuntimeError):
        pass  # the client left
    finally:
        unsubscribe()
        closing.cancel()
    return resp


async def stream_logs(
    request: web.Request, reader: LogReader, history: list[logs.Line], follow: bool
) -> web.StreamResponse:
    """`history`, then (following) the lines written since, as JSON lines
    `{"pid": ..., "line": ...}`, until the client leaves or the admin API shuts down
    (after one last read, and a line `{"end": ...}` saying so)."""
    closing = request.app[CLOSING]
    loop = asyncio.get_running_loop()
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    try:
        await resp.prepare(request)
        await _write_log_lines(resp, history)
        while follow:
            final = closing.is_set()
            lines, behind = await loop.run_in_executor(None, partial(reader.poll, final=final))
            await _write_log_lines(resp, lines)
            if final:
                await _write_line(resp, {"end": "the daemon is shutting down"})
                break
            if request.transport is None or request.transport.is_closing():
                break  # the client left while nothing was written
            if not behind:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), logs.FOLLOW_POLL)
    except (ConnectionResetError, RuntimeError):
        pass  # the client left
    return resp


async def _write_log_lines(resp: web.StreamResponse, lines: list[logs.Line]) -> None:
    if lines:
        await resp.write(
            b"".join(json.dumps({"pid": pid, "line": text}).encode() + b"\n" for pid, text in lines)
        )


async def _restart_one(control: Control, name: str) -> None:
    """One component's restart: the rolling restart of one, its failure told as a
    single operation's (RotationFailed), as the API documents."""
    summary = await control.restart([name])
    if name in summary["failed"]:
        raise RotationFailed(summary["failed"][name], summary["log_tail"].get(name, []))


def _outcome(task: asyncio.Future[dict[str, Any] | None]) -> dict[str, Any]:
    if task.cancelled():
        return {"result": "failed", "error": "cancelled (the daemon is shutting down)"}
    exc = task.exception()
    if exc is None:
        return {"result": "ok", **(task.result() or {})}
    if isinstance(exc, RotationFailed):
        return {"result": "failed", "error": exc.reason, "log_tail": exc.log_tail}
    return {"result": "failed", "error": error_text(exc)}


async def _write_line(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(json.dumps(obj).encode() + b"\n")

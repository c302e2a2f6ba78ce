"""The `rotator` command line.

`up` runs the daemon in the foreground and `check` validates a config
locally; every other command is one call to the running daemon's admin API
(stdlib HTTP only: the CLI never loads the daemon stack except for `up`).
Exit codes: 0 success, 1 the operation failed, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rotator import __version__, printer
from rotator.config import Config, ConfigError, default_path, load, parse_env_assignments

OK, FAILED, USAGE = 0, 1, 2


class CommandError(Exception):
    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="config file (default: $ROTATOR_CONFIG, else ./rotator.yaml)",
    )
    parser = argparse.ArgumentParser(
        prog="rotator",
        parents=[common],
        description="Zero-downtime port rotation for local HTTP services.",
        epilog="exit codes: 0 ok, 1 operation failed, 2 usage or config error",
    )
    parser.add_argument("--version", action="version", version=f"rotator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", parents=[common], help="run the daemon in the foreground")
    status = sub.add_parser("status", parents=[common], help="show components and their instances")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    restart = sub.add_parser(
        "restart", parents=[common], help="rotate components with zero downtime"
    )
    restart.add_argument("names", nargs="+", metavar="NAME")
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow the operation to its end (default) or return once the daemon took it",
    )
    deploy = sub.add_parser(
        "deploy",
        parents=[common, wait],
        help="blue-green upgrade: a new definition, rolled back on failure",
    )
    deploy.add_argument("name", metavar="NAME")
    deploy.add_argument(
        "--command", dest="new_command", metavar="CMD", help="the new command (shell words)"
    )
    deploy.add_argument("--cwd", metavar="DIR", help="the new working directory")
    deploy.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable (repeatable)",
    )
    rollback = sub.add_parser(
        "rollback", parents=[common, wait], help="return to the previous definition"
    )
    rollback.add_argument("name", metavar="NAME")
    start = sub.add_parser(
        "start", parents=[common, wait], help="start a stopped or failed component"
    )
    start.add_argument("name", metavar="NAME")
    stop = sub.add_parser(
        "stop", parents=[common, wait], help="drain and stop a component (503 meanwhile)"
    )
    stop.add_argument("name", metavar="NAME")
    stop.add_argument(
        "--force", action="store_true", help="no drain, no grace: SIGKILL the whole tree now"
    )
    sub.add_parser("down", parents=[common], help="stop the daemon gracefully")
    sub.add_parser("check", parents=[common], help="validate the config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = getattr(args, "config", None) or default_path(os.environ)
    try:
        config = load(path)
        return COMMANDS[args.command](config, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return USAGE
    except CommandError as exc:
        print(f"rotator: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return FAILED


# -- commands -------------------------------------------------------------------
def cmd_up(config: Config, args: argparse.Namespace) -> int:
    from rotator.daemon import run  # the daemon stack loads only here

    return run(config)


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    print(f"{config.path}: ok, {len(config.components)} component(s): {', '.join(config.names)}")
    return OK


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    status = Admin(config).get("/v1/status")
    print(json.dumps(status, indent=2) if args.json else printer.status_table(status))
    return OK


def cmd_restart(config: Config, args: argparse.Namespace) -> int:
    for name in args.names:
        known(config, name)
    admin = Admin(config)
    for i, name in enumerate(args.names):
        if operate(admin, name, "restart", {}, wait=True) != OK:
            rest = args.names[i + 1 :]
            if rest:
                print(f"rotator: not restarted: {', '.join(rest)}", file=sys.stderr)
            return FAILED
    return OK


def cmd_deploy(config: Config, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.new_command is not None:
        body["command"] = args.new_command
    if args.cwd is not None:
        body["cwd"] = str(Path(args.cwd).expanduser().resolve())  # relative to where the user is
    if args.env:
        try:
            body["env"] = parse_env_assignments(args.env)
        except ValueError as exc:
            raise CommandError(str(exc), USAGE) from None
    return operate(Admin(config), known(config, args.name), "deploy", body, wait=args.wait)


def cmd_rollback(config: Config, args: argparse.Namespace) -> int:
    return operate(Admin(config), known(config, args.name), "rollback", {}, wait=args.wait)


def cmd_start(config: Config, args: argparse.Namespace) -> int:
    return operate(Admin(config), known(config, args.name), "start", {}, wait=args.wait)


def cmd_stop(config: Config, args: argparse.Namespace) -> int:
    body = {"force": True} if args.force else {}
    return operate(Admin(config), known(config, args.name), "stop", body, wait=args.wait)


def known(config: Config, name: str) -> str:
    if name not in config.names:
        raise CommandError(f"unknown component {name!r} (have: {', '.join(config.names)})", USAGE)
    return name


PAST = {
    "restart": "restarted",
    "deploy": "deployed",
    "rollback": "rolled back",
    "start": "started",
    "stop": "stopped",
}


def operate(admin: Admin, name: str, op: str, body: dict[str, Any], *, wait: bool) -> int:
    """One component operation: print its steps as they happen; the exit code."""
    path = f"/v1/components/{name}/{op}"
    if not wait:
        admin.post(path + "?wait=0", body)
        print(f"{name}: {op} accepted; follow it with: rotator status")
        return OK
    began = time.time()
    result: dict[str, Any] = {}
    for line in admin.stream(path, body):
        if "event" in line:
            if line["event"]["kind"] != "state":
                print(printer.event_line(line["event"], since=began), flush=True)
        else:
            result = line
    if result.get("result") != "ok":
        print(
            f"rotator: {name}: {op} failed: {result.get('error', 'no result from the daemon')}",
            file=sys.stderr,
        )
        for log_line in result.get("log_tail", []):
            print(f"    | {log_line}", file=sys.stderr)
        return FAILED
    print(f"{name}: {PAST[op]} in {printer.duration(time.time() - began)}", flush=True)
    return OK


def cmd_down(config: Config, args: argparse.Namespace) -> int:
    admin = Admin(config)
    pid = admin.get("/v1/status")["daemon"]["pid"]
    admin.post("/v1/shutdown")
    longest = max((c.drain_timeout + c.stop_timeout for c in config.components), default=0.0)
    deadline = time.monotonic() + longest + 10
    while time.monotonic() < deadline:
        try:
            admin.get("/v1/status")
        except CommandError:
            print(f"rotator: daemon {pid} stopped")
            return OK
        time.sleep(0.1)
    raise CommandError(f"daemon {pid} is still running after {longest + 10:g}s")


COMMANDS = {
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "start": cmd_start,
    "stop": cmd_stop,
    "up": cmd_up,
    "check": cmd_check,
    "status": cmd_status,
    "restart": cmd_restart,
    "down": cmd_down,
}


# -- the admin API, over stdlib HTTP --------------------------------------------
class Admin:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.base = f"http://{config.admin.listen}"

    def get(self, path: str) -> Any:
        with self._open(path, "GET") as resp:
            return json.load(resp)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._open(path, "POST", body=body) as resp:
            return json.load(resp)

    def stream(self, path: str, body: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        with self._open(path, "POST", timeout=None, body=body) as resp:
            for raw in resp:
                if raw.strip():
                    yield json.loads(raw)

    def _open(
        self, path: str, method: str, timeout: float | None = 30, body: dict[str, Any] | None = None
    ) -> Any:
        data = json.dumps(body).encode() if body else None
        request = urllib.request.Request(self.base + path, method=method, data=data)
        if data:
            request.add_header("Content-Type", "application/json")
        if method != "GET":
            request.add_header("Authorization", f"Bearer {self._token()}")
        try:
            return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                request, timeout=timeout
            )
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise CommandError(
                    f"the daemon at {self.base} did not accept the token in {self.config.token_path} "
                    "(stale? is that daemon running from another config with the same admin address?)"
                ) from None
            # 400: the daemon found the request itself wrong (a bad --cwd, say): a usage error.
            raise CommandError(_error_text(exc), USAGE if exc.code == 400 else FAILED) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            raise CommandError(
                f"daemon not running (nothing answers at {self.base}; start it with: rotator up -c {self.config.path})"
            ) from exc

    def _token(self) -> str:
        try:
            return self.config.token_path.read_text().strip()
        except OSError as exc:
            raise CommandError(
                f"cannot read the admin token {self.config.token_path}: {exc.strerror} (is the daemon running?)"
            ) from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.load(exc)["error"])
    except (ValueError, KeyError, TypeError):
        return f"admin API answered {exc.code} {exc.reason}"

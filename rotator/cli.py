"""The `rotator` command line.

`up` runs the daemon in the foreground and `check` validates a config
locally; every other command is one call to the running daemon's admin API
(stdlib HTTP only: the CLI never loads the daemon stack except for `up`).
Exit codes: 0 success, 1 the operation failed, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rotator import __version__, canary, envfile, fleet, printer, private
from rotator.config import Config, ConfigError
from rotator.configfile import default_path, load, parse_duration, parse_env_assignments

if TYPE_CHECKING:
    from rotator.export import Export

OK, FAILED, USAGE = 0, 1, 2
LOST = "lost the connection to the daemon (did it exit? see: rotator status)"


class CommandError(Exception):
    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (exit 2), like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"rotator: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="config file (default: $ROTATOR_CONFIG, else ./rotator.yaml)",
    )
    parser = Parser(
        prog="rotator",
        parents=[common],
        description="Zero-downtime port rotation for local HTTP services.",
        epilog="exit codes: 0 ok, 1 operation failed, 2 usage or config error",
    )
    parser.add_argument("--version", action="version", version=f"rotator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", parents=[common], help="run the daemon in the foreground")
    up.add_argument(
        "--log-format",
        choices=("human", "json"),
        default="human",
        help="the daemon's output: lines for people (default) or one JSON object per line",
    )
    up.add_argument(
        "--takeover",
        action="store_true",
        help="take over from the daemon running for this state_dir without closing a "
        "public port or restarting an instance (an upgrade of rotator itself)",
    )
    up.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not restart components when their `watch` files change (for this run)",
    )
    status = sub.add_parser("status", parents=[common], help="show components and their instances")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    restart = sub.add_parser(
        "restart",
        parents=[common],
        help="rotate components with zero downtime, one at a time in dependency order",
    )
    restart.add_argument("names", nargs="*", metavar="NAME")
    restart.add_argument("--all", action="store_true", help="every component (not stopped ones)")
    restart.add_argument(
        "--parallel",
        type=_positive,
        default=1,
        metavar="N",
        help="rotate up to N at once, each still after what it depends on (default 1)",
    )
    sub.add_parser(
        "reload",
        parents=[common],
        help="re-read the config and apply the difference (the daemon also does on SIGHUP)",
    )
    events = sub.add_parser("events", parents=[common], help="the daemon's event history")
    events.add_argument("-f", "--follow", action="store_true", help="go on printing new events")
    events.add_argument(
        "-n", "--lines", type=_whole, default=50, metavar="N", help="how many past events (50)"
    )
    events.add_argument("--component", metavar="NAME", help="only this component's events")
    events.add_argument("--json", action="store_true", help="one JSON object per event")
    logs = sub.add_parser(
        "logs", parents=[common], help="a component's output across its instances"
    )
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="go on printing new lines")
    logs.add_argument(
        "-n", "--lines", type=_whole, default=50, metavar="N", help="how many past lines (50)"
    )
    logs.add_argument("--instance", type=_whole, metavar="PID", help="only this instance's lines")
    logs.add_argument(
        "--no-prefix", action="store_true", help="leave out the [pid] in front of each line"
    )
    wait = Parser(add_help=False)
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
    deploy.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="FILE",
        help="set the variables of a dotenv file (repeatable; later files, then --env, win)",
    )
    deploy.add_argument(
        "--canary",
        type=_weight,
        metavar="PERCENT",
        help="first send PERCENT %% of the requests (1-99) to the new definition, and promote"
        " or roll back by its figures at the end of the window (exit 0 promoted, 1 rolled back)",
    )
    deploy.add_argument(
        "--for",
        dest="window",
        type=_window,
        metavar="DURATION",
        help="with --canary: how long it takes traffic before the verdict (canary.duration)",
    )
    deploy.add_argument(
        "--min-requests",
        type=_whole,
        metavar="N",
        help="with --canary: fewer answered in the window roll back; 0: no minimum"
        " (canary.min_requests)",
    )
    rollback = sub.add_parser(
        "rollback",
        parents=[common, wait],
        help="return to the previous definition (during a canary: end it, rolled back)",
    )
    rollback.add_argument("name", metavar="NAME")
    promote = sub.add_parser(
        "promote", parents=[common, wait], help="end a running canary now, promoted"
    )
    promote.add_argument("name", metavar="NAME")
    scale = sub.add_parser(
        "scale",
        parents=[common, wait],
        help="run N replicas of a component (start or retire some; the others are untouched)",
    )
    scale.add_argument("name", metavar="NAME")
    scale.add_argument("replicas", metavar="N", type=_positive)
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
    dashboard = sub.add_parser(
        "dashboard", parents=[common], help="print a one-time link to the live dashboard"
    )
    dashboard.add_argument("--open", action="store_true", help="also open it in the browser")
    sub.add_parser("check", parents=[common], help="validate the config and exit")
    exporting = sub.add_parser(
        "export", parents=[common], help="write the fleet as manifests for another platform"
    )
    exporting.add_argument("target", choices=("kubernetes",), help="the platform")
    exporting.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help="write one file per component and NOTES.md into DIR (default: all to stdout)",
    )
    exporting.add_argument(
        "--image", metavar="NAME", help="every component's image (instead of the config's)"
    )
    svc = sub.add_parser(
        "service", parents=[common], help="write systemd units or a launchd plist for `up`"
    )
    svc.add_argument("manager", choices=("systemd", "launchd"))
    scope = svc.add_mutually_exclusive_group()
    scope.add_argument(
        "--user", dest="system", action="store_false", default=False, help="for you (default)"
    )
    scope.add_argument("--system", action="store_true", help="at boot: a system unit/daemon")
    svc.add_argument("--dry-run", action="store_true", help="print the files, write nothing")
    svc.add_argument("-o", "--output", type=Path, metavar="DIR", help="write into DIR instead")
    svc.add_argument("--name", help="rotator-NAME.service (default: the config file's name)")
    svc.add_argument(
        "--no-sockets",
        dest="sockets",
        action="store_false",
        help="systemd: no socket units (rotator binds its addresses itself)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(config_path(getattr(args, "config", None), os.environ))
        code = COMMANDS[args.command](config, args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then a BrokenPipeError below
        return code
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return USAGE
    except CommandError as exc:
        print(f"rotator: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return FAILED
    except BrokenPipeError:
        # `rotator status | head -3`: the reader has gone. Quietly, as `ls | head`; the
        # recipe of Python's docs ("Note on SIGPIPE"): what is still buffered goes to
        # /dev/null, or Python would complain again when it flushes at exit. Exit 1 like
        # Python's own: the output, perhaps the result, was not all delivered.
        printer.silence_stdout()
        return FAILED


def config_path(given: Path | None, env: Mapping[str, str]) -> Path:
    """The config file: -c, else $ROTATOR_CONFIG, else ./rotator.yaml; a CommandError
    (usage) saying where it looked when the file is not there and -c was not given."""
    path = given or default_path(env)
    if given is None and not path.exists():
        if env.get("ROTATOR_CONFIG"):
            where = f"$ROTATOR_CONFIG is {path}, which does not exist; point it elsewhere"
        else:
            where = f"no {path} in {Path.cwd()} and $ROTATOR_CONFIG is not set; give one"
        raise CommandError(f"no config file ({where} with -c FILE or ROTATOR_CONFIG=FILE)", USAGE)
    return path


# -- commands -------------------------------------------------------------------
def cmd_up(config: Config, args: argparse.Namespace) -> int:
    from rotator.daemon import run  # the daemon stack loads only here

    return run(config, log_format=args.log_format, takeover=args.takeover, watch=args.watch)


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    print(f"{config.path}: ok, {len(config.components)} component(s): {', '.join(config.names)}")
    return OK


def cmd_export(config: Config, args: argparse.Namespace) -> int:
    from rotator import export  # only here: it costs every other command 65 ms to import

    try:
        result = export.kubernetes(config, image=args.image)
    except export.ExportError as exc:
        raise CommandError(str(exc), USAGE) from None
    if args.output is None:
        sys.stdout.write(result.stream())
    else:
        _write_export(args.output, result, config)
    for note in result.notes:
        print(note, file=sys.stderr)
    return OK


def _write_export(directory: Path, result: Export, config: Config) -> None:
    """The files into `directory`; earlier exported files no longer in the fleet are
    removed, so that `kubectl apply -f DIR` does not bring back a removed component."""
    from rotator.export import GENERATED

    files = {**result.files, "NOTES.md": result.notes_markdown(config.path.name)}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stale = [
            path
            for path in sorted(directory.glob("*.yaml"))
            if path.name not in files and path.read_text().startswith(GENERATED)
        ]
        for path in stale:
            path.unlink()
            print(f"rotator: removed {path} (not in the config any more)", file=sys.stderr)
        for name, text in files.items():
            (directory / name).write_text(text)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = getattr(exc, "filename", None) or directory
        raise CommandError(f"cannot write the export to {where}: {reason}") from None
    print(
        f"{directory}: {len(result.files)} manifest file(s) and NOTES.md;"
        f" apply with: kubectl apply -f {directory}"
    )


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    status = Admin(config).get("/v1/status", token=True)
    print(json.dumps(status, indent=2) if args.json else printer.status_table(status))
    return OK


def cmd_restart(config: Config, args: argparse.Namespace) -> int:
    if args.all == bool(args.names):
        raise CommandError("name the components to restart, or give --all (not both)", USAGE)
    body: dict[str, Any] = {"parallel": args.parallel}
    if args.names:
        body["components"] = [known(config, name) for name in dict.fromkeys(args.names)]
    began = time.time()
    result = follow(Admin(config).stream("/v1/restart", body), began, {"state"}, "restart")
    warn_unsaved(result, "restart")
    took = printer.duration(time.time() - began)
    done, skipped = result.get("restarted", []), result.get("skipped", [])
    if skipped:
        print(f"not restarted (stopped on purpose): {', '.join(skipped)}")
    if result.get("result") == "ok":
        print(f"restarted {len(done)} component(s) in {took}: {', '.join(done) or 'none'}")
        return OK
    if not result.get("failed"):  # it failed as a whole, not one component
        print(
            f"rotator: restart failed: {result.get('error') or 'no reason given'}", file=sys.stderr
        )
    for name, why in (result.get("failed") or {}).items():
        print(f"rotator: restart failed: {name}: {why}", file=sys.stderr)
        for line in (result.get("log_tail") or {}).get(name, []):
            print(f"    | {line}", file=sys.stderr)
    print(f"restarted: {', '.join(done) or 'none'}", file=sys.stderr)
    if result.get("not_restarted"):
        print(f"not restarted: {', '.join(result['not_restarted'])}", file=sys.stderr)
    return FAILED


def cmd_reload(config: Config, args: argparse.Namespace) -> int:
    began = time.time()
    result = follow(Admin(config).stream("/v1/reload", {}), began, {"state"}, "reload")
    warn_unsaved(result, "reload")
    for note in result.get("ignored", []):
        print(f"note: {note}")
    summary = fleet.reload_summary(result)
    if result.get("result") == "ok":
        print(f"reloaded {config.path} in {printer.duration(time.time() - began)}: {summary}")
        return OK
    print(f"rotator: reload failed: {result.get('error') or summary}", file=sys.stderr)
    return FAILED


def cmd_events(config: Config, args: argparse.Namespace) -> int:
    if args.component is not None:
        known(config, args.component)
    query = f"?n={args.lines}&follow={int(args.follow)}"
    if args.component:
        query += f"&component={args.component}"
    try:
        for event in Admin(config).stream("/v1/events" + query, method="GET"):
            print(json.dumps(event) if args.json else printer.history_line(event), flush=True)
    except KeyboardInterrupt:
        pass  # the way to stop following
    except BrokenPipeError:  # as in `logs`: the reader has all it wanted
        printer.silence_stdout()
    except (http.client.HTTPException, OSError, ValueError):
        raise CommandError(LOST) from None
    return OK


def cmd_logs(config: Config, args: argparse.Namespace) -> int:
    query = f"?n={args.lines}&follow={int(args.follow)}"
    if args.instance is not None:
        query += f"&instance={args.instance}"
    path = f"/v1/components/{known(config, args.name)}/logs{query}"
    try:
        for item in Admin(config).stream(path, method="GET"):
            if "line" in item:
                line = item["line"] if args.no_prefix else f"[{item['pid']}] {item['line']}"
                print(line, flush=args.follow)
            elif "end" in item:
                print(f"rotator: {item['end']}", file=sys.stderr)
    except KeyboardInterrupt:
        pass  # the way to stop following
    except BrokenPipeError:  # `rotator logs -f | grep -m1 ready`: the reader has all it wanted
        printer.silence_stdout()
    except (http.client.HTTPException, OSError):
        raise CommandError(LOST) from None
    return OK


def cmd_deploy(config: Config, args: argparse.Namespace) -> int:
    body = deploy_body(args)
    return operate(Admin(config), known(config, args.name), "deploy", body, wait=args.wait)


def deploy_body(args: argparse.Namespace) -> dict[str, Any]:
    """The deploy request's body from the parsed arguments: only what was given. Reads
    the --env-file files; a CommandError (usage) for a bad one, or for --for and
    --min-requests without --canary."""
    body: dict[str, Any] = {}
    if args.new_command is not None:
        body["command"] = args.new_command
    if args.cwd is not None:
        body["cwd"] = str(Path(args.cwd).expanduser().resolve())  # relative to where the user is
    if args.env or args.env_file:
        try:
            env = {}
            for file in args.env_file:  # relative to where the user is, like --cwd
                env.update(envfile.read(Path(file).expanduser()))
            body["env"] = env | parse_env_assignments(args.env)
        except FileNotFoundError as exc:
            raise CommandError(f"--env-file {exc.filename}: no such file", USAGE) from None
        except ValueError as exc:
            raise CommandError(str(exc), USAGE) from None
    given = {"duration": args.window, "min_requests": args.min_requests}
    if args.canary is not None:
        body["canary"] = {"weight": args.canary} | {
            key: value for key, value in given.items() if value is not None
        }
    elif (args.window, args.min_requests) != (None, None):
        option = "--for" if args.window is not None else "--min-requests"
        raise CommandError(f"{option} goes with --canary PERCENT", USAGE)
    return body


def cmd_rollback(config: Config, args: argparse.Namespace) -> int:
    return operate(Admin(config), known(config, args.name), "rollback", {}, wait=args.wait)


def cmd_promote(config: Config, args: argparse.Namespace) -> int:
    return operate(Admin(config), known(config, args.name), "promote", {}, wait=args.wait)


def cmd_scale(config: Config, args: argparse.Namespace) -> int:
    body = {"replicas": args.replicas}
    return operate(Admin(config), known(config, args.name), "scale", body, wait=args.wait)


def cmd_start(config: Config, args: argparse.Namespace) -> int:
    return operate(Admin(config), known(config, args.name), "start", {}, wait=args.wait)


def cmd_stop(config: Config, args: argparse.Namespace) -> int:
    body = {"force": True} if args.force else {}
    return operate(Admin(config), known(config, args.name), "stop", body, wait=args.wait)


def _whole(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(text)


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _weight(text: str) -> int:
    """A canary's share: a whole number of percent, 1-99, with or without the % sign."""
    number = text.strip().removesuffix("%").rstrip()
    if not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"not a whole number of percent: {text!r} (e.g. 10%)")
    if not canary.MIN_WEIGHT <= int(number) <= canary.MAX_WEIGHT:
        raise argparse.ArgumentTypeError(
            f"must be from {canary.MIN_WEIGHT} to {canary.MAX_WEIGHT} percent: {text!r}"
        )
    return int(number)


def _window(text: str) -> float:
    """A canary's window: a duration above 0, as the config writes it (30s, 2m, 1m30s)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds == 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return seconds


def known(config: Config, name: str) -> str:
    if name not in config.names:
        raise CommandError(f"unknown component {name!r} (have: {', '.join(config.names)})", USAGE)
    return name


PAST = {
    "restart": "restarted",
    "deploy": "deployed",
    "rollback": "rolled back",
    "promote": "promoted",
    "scale": "scaled",
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
    result = follow(admin.stream(path, body), began, {"state", "rotated"}, op)
    warn_unsaved(result, op)
    if result.get("result") != "ok":
        print(
            f"rotator: {name}: {op} failed: {result.get('error') or 'no reason given'}",
            file=sys.stderr,
        )
        for log_line in result.get("log_tail", []):
            print(f"    | {log_line}", file=sys.stderr)
        return FAILED
    print(f"{name}: {PAST[op]} in {printer.duration(time.time() - began)}", flush=True)
    return OK


def follow(
    lines: Iterator[dict[str, Any]], began: float, quiet: set[str], op: str
) -> dict[str, Any]:
    """Print an operation's events as they come (but the `quiet` kinds); its result line.
    A stream cut before the result (the daemon died, say) is a CommandError saying so."""
    result: dict[str, Any] | None = None
    try:
        for line in lines:
            if "event" in line:
                if line["event"]["kind"] not in quiet:
                    print(printer.event_line(line["event"], since=began), flush=True)
            else:
                result = line
    except (http.client.HTTPException, OSError, ValueError):  # ValueError: a line cut short
        result = None
    if result is None:
        raise CommandError(
            f"the daemon closed the connection before the {op} finished "
            "(did it exit? see: rotator status)"
        )
    return result


def warn_unsaved(result: dict[str, Any], op: str) -> None:
    """The daemon did what it did, but could not record it in its state file: say so
    (the operation's own outcome and exit code stand)."""
    if error := result.get("state_file_error"):
        print(
            f"rotator: warning: the {op} is done as reported, but the daemon {error}; "
            "a daemon started after this one dies would not know what runs now "
            "(see: rotator status)",
            file=sys.stderr,
        )


def cmd_down(config: Config, args: argparse.Namespace) -> int:
    admin = Admin(config)
    pid = admin.get("/v1/status")["daemon"]["pid"]
    admin.post("/v1/shutdown")
    budget = fleet.stop_budget(config)
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        try:
            admin.get("/v1/status")
        except CommandError:
            print(f"rotator: daemon {pid} stopped")
            return OK
        time.sleep(0.1)
    raise CommandError(f"daemon {pid} is still running after {printer.duration(budget)}")


def cmd_dashboard(config: Config, args: argparse.Namespace) -> int:
    # With --open, the browser gets a file that redirects to the link, never the link:
    # any local user can read a command line, and use a code read there first.
    answer = Admin(config).post("/v1/dashboard/link" + ("?page=1" if args.open else ""))
    print(answer["url"], flush=True)
    # On stderr, so that `$(rotator dashboard)` is the link alone.
    print("one-time link: open it within 60 s, in a browser on this machine", file=sys.stderr)
    if not args.open:
        return OK
    if "page" not in answer:
        raise CommandError(
            "the daemon made no page for the browser (an older rotator?): "
            "open the link above yourself"
        )
    if not webbrowser.open(Path(answer["page"]).as_uri()):
        raise CommandError("no browser could be started; open the link above yourself")
    return OK


def cmd_service(config: Config, args: argparse.Namespace) -> int:
    from rotator import service  # stdlib only, and only this command needs it

    try:  # under sudo, the user who ran it
        user: str | None = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # a uid without a name (some containers)
        user = None
    options = service.Options(
        name=service.safe_name(args.name) if args.name else service.default_name(config),
        rotator=service.rotator_command(sys.argv[0], sys.executable),
        home=Path.home(),
        system=args.system,
        user=None if user == "root" else user,
        path=os.environ.get("PATH"),
        sockets=args.sockets,
    )
    rendered = service.render(args.manager, config, options)
    if args.dry_run:
        for name, content in rendered.files.items():
            print(f"# ---- {rendered.directory / name}\n{content.decode()}")
        print("".join(f"# note: {note}\n" for note in rendered.notes), end="")
        return OK
    native = {"systemd": "linux", "launchd": "darwin"}[args.manager]
    if args.output is None and not sys.platform.startswith(native):
        raise CommandError(
            f"{args.manager} is not this system's service manager: use --dry-run or -o DIR", USAGE
        )
    directory = args.output or rendered.directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in rendered.files.items():
            (directory / name).write_bytes(content)
            print(f"wrote {directory / name}")
    except OSError as exc:
        hint = " (as root, or without --system)" if args.system else ""
        raise CommandError(f"cannot write {exc.filename}: {exc.strerror}{hint}") from None
    moved = args.output is not None and args.output.resolve() != rendered.directory
    print(f"copy them to {rendered.directory}, then:" if moved else "to enable and start:")
    print("".join(f"  {line}\n" for line in rendered.enable), end="")
    print("".join(f"note: {note}\n" for note in rendered.notes), end="")
    return OK


COMMANDS = {
    "service": cmd_service,
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "promote": cmd_promote,
    "scale": cmd_scale,
    "start": cmd_start,
    "stop": cmd_stop,
    "up": cmd_up,
    "check": cmd_check,
    "export": cmd_export,
    "status": cmd_status,
    "restart": cmd_restart,
    "reload": cmd_reload,
    "events": cmd_events,
    "logs": cmd_logs,
    "down": cmd_down,
    "dashboard": cmd_dashboard,
}


# -- the admin API, over stdlib HTTP --------------------------------------------
class Admin:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.base = f"http://{config.admin.listen}"

    def get(self, path: str, token: bool = False) -> Any:
        """GET; with `token`, the token goes along if it can be read (what the answer
        leaves out for others, the token holder sees)."""
        with self._open(path, "GET", token=token and self._readable_token()) as resp:
            return json.load(resp)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._open(path, "POST", body=body) as resp:
            return json.load(resp)

    def stream(
        self, path: str, body: dict[str, Any] | None = None, method: str = "POST"
    ) -> Iterator[dict[str, Any]]:
        """JSON lines as the daemon sends them (blank keep-alive lines skipped). A GET
        stream carries the token too: what it streams may be private."""
        with self._open(path, method, timeout=None, body=body, token=True) as resp:
            for raw in resp:
                if raw.strip():
                    yield json.loads(raw)

    def _open(
        self,
        path: str,
        method: str,
        timeout: float | None = 30,
        body: dict[str, Any] | None = None,
        token: bool = False,
    ) -> Any:
        data = json.dumps(body).encode() if body else None
        request = urllib.request.Request(self.base + path, method=method, data=data)
        if data:
            request.add_header("Content-Type", "application/json")
        if method != "GET" or token:
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
            # 400: the daemon found the request itself wrong (a bad --cwd, say); 404: it names
            # a component or instance the daemon does not know. Usage errors both.
            usage = exc.code in (400, 404)
            raise CommandError(_error_text(exc), USAGE if usage else FAILED) from None
        except urllib.error.URLError as exc:
            reason = exc.reason if isinstance(exc.reason, OSError) else exc
            raise self._unreachable(reason, timeout) from None
        except (OSError, http.client.HTTPException) as exc:  # after the request was sent
            raise self._unreachable(exc, timeout) from None

    def _unreachable(self, exc: Exception, timeout: float | None) -> CommandError:
        """Refused: nobody listens, the daemon is not running. Anything else (a reset, a
        close without an answer, a timeout) means something listens but cannot serve:
        a daemon out of file descriptors closes what it cannot accept (uvloop) or leaves
        it waiting (asyncio)."""
        if isinstance(exc, ConnectionRefusedError):
            return CommandError(
                f"daemon not running (nothing answers at {self.base}; start it with: rotator up -c {self.config.path})"
            )
        if isinstance(exc, TimeoutError):
            what = f"did not answer within {timeout or 0:g} s"
        elif isinstance(exc, http.client.RemoteDisconnected):
            what = "closed the connection without answering"
        else:
            what = f"failed to answer ({printer.error_text(exc)})"
        return CommandError(
            f"the daemon at {self.base} {what}: something listens there but cannot serve "
            "(a daemon out of file descriptors? overloaded?); see the daemon's output "
            f"(its pid is in {self.config.state_dir / 'daemon.lock'})"
        )

    def _readable_token(self) -> bool:
        try:
            self._token()
        except CommandError:
            return False
        return True

    def _token(self) -> str:
        """The admin token, if the file is ours and private to us: one someone else wrote
        may lead the CLI astray, one others can read may already have been used."""
        try:
            return private.read_token(self.config.token_path)
        except private.NotPrivate as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            raise CommandError(
                f"cannot read the admin token {self.config.token_path}: {exc.strerror} (is the daemon running?)"
            ) from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The daemon's error, and each of its `problems` (a config error) on a line of its own."""
    try:
        body = json.load(exc)
        return "\n".join([str(body["error"]), *(str(p) for p in body.get("problems", []))])
    except (ValueError, KeyError, TypeError):
        return f"admin API answered {exc.code} {exc.reason}"

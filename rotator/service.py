"""Service-manager files that run `rotator up` for one config: systemd units and a
launchd plist.

Pure renderers: everything they need from the environment (the rotator command,
the user, PATH, the home directory) comes in through Options; writing the files
and telling the user how to enable them is the CLI's job.

systemd gets a `rotator-NAME.service` and, per component, a
`rotator-NAME-COMPONENT.socket` that binds the component's public address and
hands it to rotator (FileDescriptorName= is the component's name: one socket
unit per component, because the name applies to every socket of a unit). The
sockets stay bound while the service restarts, so clients queue instead of
being refused. launchd gets a plist that runs `rotator up`; rotator binds its
addresses itself there (launchd's activation needs launch_activate_socket).
"""

from __future__ import annotations

import ipaddress
import math
import os
import plistlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rotator import fleet
from rotator.config import Config

MANAGERS = ("systemd", "launchd")
# Between a crash and the restart; the restarted daemon adopts the running instances.
RESTART_DELAY = 2
# The start budget (TimeoutStartSec=, Type=notify waits for READY=1): each adopted instance
# is health-checked once (adoption.ADOPT_CHECK_TIMEOUT), and a margin for everything else.
ADOPT_CHECK = 3.0
START_MARGIN = 10.0
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class ServiceError(Exception):
    """The files cannot be rendered as asked; the message says why."""


@dataclass(frozen=True)
class Options:
    name: str  # rotator-NAME.service, com.rotator.NAME
    rotator: tuple[str, ...]  # the words that run rotator: an executable, or python -m rotator
    home: Path  # the user's home directory
    system: bool = False  # a system unit / LaunchDaemon rather than a user one
    user: str | None = None  # whom a system service runs as (None: root)
    path: str | None = None  # PATH for the components' commands
    sockets: bool = True  # systemd: socket units for the public addresses


@dataclass(frozen=True)
class Rendered:
    files: dict[str, bytes]  # file name -> content
    directory: Path  # where they belong
    enable: list[str]  # the commands that install and start them
    notes: list[str]


def default_name(config: Config) -> str:
    """The config file's name without .yaml; its directory's name for a plain rotator.yaml."""
    stem = config.path.stem
    if stem == "rotator" and config.path.parent.name:
        stem = config.path.parent.name
    return safe_name(stem)


def safe_name(name: str) -> str:
    """`name` in the characters unit names and launchd labels both take."""
    return _UNSAFE_NAME.sub("-", name).strip("-.") or "rotator"


def rotator_command(argv0: str, executable: str) -> tuple[str, ...]:
    """How this rotator was started, as absolute words a service manager can run."""
    if os.sep not in argv0:
        argv0 = shutil.which(argv0) or argv0
    path = Path(argv0)
    if path.suffix != ".py" and path.is_file() and os.access(path, os.X_OK):
        return (str(path.absolute()),)
    # `python -m rotator`: argv0 is rotator/__main__.py, not a program to run.
    return (executable, "-m", "rotator")


def render(manager: str, config: Config, options: Options) -> Rendered:
    renderers: dict[str, Callable[[Config, Options], Rendered]] = {
        "systemd": systemd,
        "launchd": launchd,
    }
    if manager not in renderers:
        raise ServiceError(f"unknown service manager {manager!r} (have: {', '.join(MANAGERS)})")
    return renderers[manager](config, options)


# -- systemd ----------------------------------------------------------------------
def systemd(config: Config, options: Options) -> Rendered:
    service = f"rotator-{options.name}.service"
    sockets: dict[str, str] = {}
    notes: list[str] = []
    for spec in config.components if options.sockets else ():
        if not _is_address(spec.listen.host):
            notes.append(
                f"{spec.name}: listen host {spec.listen.host!r} is a name, not an address: "
                "no socket unit (rotator binds it itself)"
            )
            continue
        unit = f"rotator-{options.name}-{spec.name}.socket"
        sockets[unit] = _socket_unit(config, spec.name, str(spec.listen), service)
    files = {service: _service_unit(config, options, list(sockets))}
    files.update(sockets)
    systemctl = "systemctl" if options.system else "systemctl --user"
    directory = (
        Path("/etc/systemd/system")
        if options.system
        else options.home / ".config" / "systemd" / "user"
    )
    enable = [f"{systemctl} daemon-reload", f"{systemctl} enable --now {' '.join(files)}"]
    if not options.system:
        notes.append(
            "a user service runs while you are logged in; to start it at boot: "
            "loginctl enable-linger $USER"
        )
    return Rendered({k: v.encode() for k, v in files.items()}, directory, enable, notes)


def _service_unit(config: Config, options: Options, sockets: list[str]) -> str:
    rotator = [*options.rotator]
    cfg = str(config.path)
    unit = [f"Description=rotator for {_escape(cfg)}"]
    if options.system:
        unit.append("After=network.target")
    if sockets:
        unit += [f"Requires={' '.join(sockets)}", f"After={' '.join(sockets)}"]
    service = [
        # notify: started once every component is up (READY=1); it also says RELOADING=1
        # around a reload, STOPPING=1, a STATUS= line, and MAINPID= after a takeover.
        "Type=notify",
        # all, not main: MAINPID= comes from the new daemon of a takeover, which is not the
        # main process yet. Instances cannot reach this socket by accident: rotator hands
        # them its own NOTIFY_SOCKET instead.
        "NotifyAccess=all",
        f"TimeoutStartSec={math.ceil(start_budget(config))}s",
        f"ExecStart={_command([*rotator, 'up', '-c', cfg])}",
        # Graceful: drain, stop every instance. `-`: after a crash there is no daemon to ask.
        f"ExecStop=-{_command([*rotator, 'down', '-c', cfg])}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        # Only the daemon is signalled. Its instances are rotator's to stop (ExecStop did),
        # and after a crash the restarted daemon adopts them instead of starting anew;
        # whatever an earlier daemon left behind, the next `rotator up` stops.
        "KillMode=process",
        # The daemon makes a cgroup per instance under its own (see cgroups.py): systemd
        # hands it that subtree.
        "Delegate=yes",
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY}s",
        "RestartPreventExitStatus=2",  # a config error: restarting cannot help
        f"TimeoutStopSec={math.ceil(fleet.stop_budget(config))}s",
        f"WorkingDirectory={_escape(str(config.path.parent))}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if options.path:
        service.append(f"Environment={_quote('PATH=' + options.path)}")
    if sockets:
        service.append(f"Sockets={' '.join(sockets)}")
    if options.system and options.user:
        service.append(f"User={options.user}")
    install = [f"WantedBy={'multi-user.target' if options.system else 'default.target'}"]
    return _unit_file(config, {"Unit": unit, "Service": service, "Install": install})


def start_budget(config: Config) -> float:
    """The longest `rotator up` may take before READY=1: the adopted instances' checks,
    then each component's start after its dependencies', where a start may wait
    start_timeout for its health gate and again for its own port (component._own_port)."""
    specs = {spec.name: spec for spec in config.components}
    chain: dict[str, float] = {}

    def until_started(name: str) -> float:
        if name not in chain:
            own = 2 * specs[name].health.start_timeout
            chain[name] = own + max(map(until_started, specs[name].depends_on), default=0.0)
        return chain[name]

    adopt = ADOPT_CHECK * sum(spec.replicas for spec in specs.values())
    return adopt + max(map(until_started, specs), default=0.0) + START_MARGIN


def _socket_unit(config: Config, name: str, address: str, service: str) -> str:
    # No PartOf= the service: restarting the service must not close the socket.
    sock = [
        f"ListenStream={address}",
        f"FileDescriptorName={name}",
        f"Service={service}",
        "Backlog=1024",  # as rotator's own listen(); systemd sets SO_REUSEADDR itself
    ]
    if address.startswith("["):
        sock.append("BindIPv6Only=ipv6-only")  # as rotator's own bind of an IPv6 address
    return _unit_file(
        config,
        {
            "Unit": [
                f"Description=rotator: public address of {name} ({_escape(str(config.path))})"
            ],
            "Socket": sock,
            "Install": ["WantedBy=sockets.target"],
        },
    )


def _unit_file(config: Config, sections: dict[str, list[str]]) -> str:
    head = (
        f"# Written by `rotator service systemd` for {config.path}.\n"
        "# Write it again after changing components or their listen addresses.\n"
    )
    return head + "\n".join(
        f"[{title}]\n" + "".join(f"{line}\n" for line in lines) for title, lines in sections.items()
    )


def _command(words: list[str]) -> str:
    # $ would expand a variable in Exec lines, % a specifier everywhere.
    return " ".join(_quote(word.replace("$", "$$")) for word in words)


def _quote(word: str) -> str:
    word = _escape(word)
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- launchd ----------------------------------------------------------------------
def launchd(config: Config, options: Options) -> Rendered:
    label = f"com.rotator.{options.name}"
    # ~/Library/Logs exists on every Mac; launchd would not create a directory of ours.
    logs = Path("/Library/Logs") if options.system else options.home / "Library" / "Logs"
    log = str(logs / f"rotator-{options.name}.log")
    env = {"PYTHONUNBUFFERED": "1"}
    if options.path:
        env["PATH"] = options.path
    plist: dict[str, object] = {
        "Label": label,
        "ProgramArguments": [*options.rotator, "up", "-c", str(config.path)],
        "RunAtLoad": True,
        # Restarted when it fails; `rotator down` (exit 0) stays down.
        "KeepAlive": {"SuccessfulExit": False},
        "WorkingDirectory": str(config.path.parent),
        "EnvironmentVariables": env,
        "StandardOutPath": log,
        "StandardErrorPath": log,
        # SIGTERM is a graceful `rotator down`; SIGKILL only after this.
        "ExitTimeOut": math.ceil(fleet.stop_budget(config)),
    }
    if options.system and options.user:
        plist["UserName"] = options.user
    filename = f"{label}.plist"
    if options.system:
        directory = Path("/Library/LaunchDaemons")
        domain = "system"
        sudo = "sudo "
    else:
        directory = options.home / "Library" / "LaunchAgents"
        domain = "gui/$(id -u)"
        sudo = ""
    enable = [f"{sudo}launchctl bootstrap {domain} {directory / filename}"]
    notes = [
        f"logs: {log}",
        f"stop and unload: {sudo}launchctl bootout {domain}/{label}",
    ]
    return Rendered({filename: plistlib.dumps(plist)}, directory, enable, notes)

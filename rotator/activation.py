"""Socket activation: listening sockets handed over by a service manager.

systemd's protocol (sd_listen_fds(3)): the manager binds the sockets, starts us
with them open from fd 3 on, and sets LISTEN_PID (our pid: anyone else's
variables are not for us), LISTEN_FDS (how many) and LISTEN_FDNAMES (their
names, colon-separated; rotator expects component names, set with
FileDescriptorName= in the .socket units). listen_fds() reads and removes the
variables, so instances do not inherit them; assign() matches the sockets to
components. A socket named after no component is closed with a warning (the
others still work); anything that would make a component serve another
address than its config says is an ActivationError, fatal at startup.

launchd's equivalent (launch_activate_socket) needs ctypes; under launchd
rotator binds its addresses itself. Binding and serving are left to the daemon.
"""

from __future__ import annotations

import fcntl
import socket
from collections.abc import Iterable, MutableMapping

from rotator.config import Address, ComponentSpec

FIRST_FD = 3  # SD_LISTEN_FDS_START
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# Not every platform's socket module has it (it is 0x0002 on macOS, 30 on Linux).
_SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", None)


class ActivationError(Exception):
    """The handed-over sockets cannot be used as they are; the message says why."""


def listen_fds(environ: MutableMapping[str, str], pid: int) -> dict[str, socket.socket]:
    """The listening sockets passed to process `pid`, by name; {} when none were.

    The variables are removed from `environ` in every case, as sd_listen_fds does.
    """
    values = {name: environ.pop(name, None) for name in VARIABLES}
    if values["LISTEN_PID"] is None or values["LISTEN_FDS"] is None:
        return {}
    if values["LISTEN_PID"].strip() != str(pid):
        return {}  # meant for another process (a parent that did not unset them)
    try:
        count = int(values["LISTEN_FDS"])
    except ValueError:
        raise ActivationError(
            f"LISTEN_FDS={values['LISTEN_FDS']!r} is not a number of sockets"
        ) from None
    names = _names(values["LISTEN_FDNAMES"], count)
    sockets: dict[str, socket.socket] = {}
    for fd, name in enumerate(names, FIRST_FD):
        if name in sockets:
            raise ActivationError(
                f"two activated sockets are named {name!r} (fd {sockets[name].fileno()} and "
                f"fd {fd}): a component takes one; give each .socket unit one ListenStream="
            )
        sockets[name] = _listening_socket(fd, name)
    return sockets


def assign(
    sockets: dict[str, socket.socket], specs: Iterable[ComponentSpec]
) -> tuple[dict[str, socket.socket], list[str]]:
    """(component name -> its socket, warnings). Sockets named after no component
    are closed; a socket bound elsewhere than its component's listen address is an
    ActivationError naming the component."""
    by_name = {spec.name: spec for spec in specs}
    claimed: dict[str, socket.socket] = {}
    warnings: list[str] = []
    for name, sock in sockets.items():
        spec = by_name.get(name)
        if spec is None:
            warnings.append(
                f"activated socket fd {sock.fileno()} ({_bound(sock)}) is named {name!r}, which "
                f"is no component (have: {', '.join(by_name)}); closing it"
            )
            sock.close()
            continue
        if not serves(sock, spec.listen):
            raise ActivationError(
                f"components.{name}.listen is {spec.listen} but the socket activated as "
                f"{name!r} (fd {sock.fileno()}) is bound to {_bound(sock)}; make the "
                ".socket unit's ListenStream= and the config agree"
            )
        claimed[name] = sock
    return claimed, warnings


def _names(raw: str | None, count: int) -> list[str]:
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={count} is negative")
    if raw is None:
        return ["unknown"] * count  # what sd_listen_fds_with_names reports
    names = raw.split(":")
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES has {len(names)} name(s) for LISTEN_FDS={count} socket(s)"
        )
    return names


def _listening_socket(fd: int, name: str) -> socket.socket:
    what = f"the activated socket {name!r} (fd {fd})"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"{what} is not a socket: {exc.strerror or exc}") from None
    problem = None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        problem = "not a TCP socket"
    elif sock.type != socket.SOCK_STREAM:
        problem = "not a stream socket (ListenStream= in the .socket unit)"
    elif _SO_ACCEPTCONN is not None and not sock.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN):
        problem = "not listening"
    if problem is not None:
        sock.detach()  # the descriptor is not ours to close
        raise ActivationError(f"{what} is {problem}")
    sock.setblocking(False)
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return sock


def serves(sock: socket.socket, listen: Address) -> bool:
    host, port = sock.getsockname()[:2]
    if port != listen.port:
        return False
    if host == listen.host:
        return True
    try:  # a name (localhost) or another spelling of the same address
        infos = socket.getaddrinfo(listen.host, port, sock.family, socket.SOCK_STREAM)
    except OSError:
        return False
    return any(info[4][0] == host for info in infos)


def _bound(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))


def matching(
    sockets: dict[str, socket.socket], specs: Iterable[ComponentSpec]
) -> dict[str, socket.socket]:
    """The sockets (handed over by a daemon being taken over) of components that keep
    their name and address; the others are closed (the old daemon closes its copies as
    it exits), and a component with a new address binds it itself."""
    by_name = {spec.name: spec for spec in specs}
    kept = {}
    for name, sock in sockets.items():
        spec = by_name.get(name)
        if spec is not None and serves(sock, spec.listen):
            kept[name] = sock
        else:
            sock.close()
    return kept

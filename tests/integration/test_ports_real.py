"""probe_port / port_holders / listens_alone / port_listeners / choose_port against real
sockets on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from rotator import ports
from rotator.ports import (
    Choice,
    PortState,
    choose_port,
    listens_alone,
    port_holders,
    port_listeners,
    probe_port,
)

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A foreign listening socket (as another program would hold it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen()
    yield sock
    sock.close()


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def test_foreign_listener_is_busy(listener: socket.socket) -> None:
    assert probe_port(HOST, port_of(listener)) is PortState.BUSY


def test_wildcard_listener_makes_loopback_busy() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        assert probe_port(HOST, port_of(sock)) is PortState.BUSY


def test_port_holders_names_this_process(listener: socket.socket) -> None:
    port = port_of(listener)
    holders = port_holders([port, free_port()])
    assert holders == {port: [(os.getpid(), psutil.Process().name())]}


def test_port_holders_falls_back_to_per_process_scan(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(kind: str = "inet") -> list[object]:
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil, "net_connections", denied)
    port = port_of(listener)
    assert (os.getpid(), psutil.Process().name()) in port_holders([port]).get(port, [])


def test_port_holders_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(kind: str = "inet") -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(psutil, "net_connections", broken)
    assert port_holders([1, 2]) == {}


def test_port_listeners_names_the_listening_process_only(listener: socket.socket) -> None:
    port = port_of(listener)
    me = (os.getpid(), psutil.Process().name())
    # An accepted connection and a client bound to the port are not listeners.
    with socket.create_connection((HOST, port)) as client, listener.accept()[0]:
        assert port_listeners(port, []) == [me]
        assert port_listeners(client.getsockname()[1], []) == []


def test_port_listeners_sees_only_the_tree_where_the_system_hides_the_rest(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(kind: str = "inet") -> list[object]:
        raise psutil.AccessDenied()  # macOS without root

    monkeypatch.setattr(ports, "_listening_inodes", lambda port: None)  # no sock_diag
    monkeypatch.setattr(psutil, "net_connections", denied)
    port = port_of(listener)
    assert not listens_alone(port, [os.getpid()])  # no quick look: psutil is asked
    assert port_listeners(port, [psutil.Process()]) == [(os.getpid(), psutil.Process().name())]
    assert port_listeners(port, []) == []


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")


@LINUX
def test_listens_alone_tells_a_listener_of_ours_from_anothers(listener: socket.socket) -> None:
    port = port_of(listener)
    assert listens_alone(port, [os.getpid()])
    assert not listens_alone(port, [os.getppid()])
    assert not listens_alone(free_port(), [os.getpid()])  # nobody listens
    with socket.socket(socket.AF_INET6) as six:
        six.bind(("::1", 0))
        six.listen()
        assert listens_alone(port_of(six), [os.getpid()])


@LINUX
def test_a_port_shared_with_so_reuseport_is_not_ours_alone() -> None:
    sockets = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, port_of(sockets[0]) if sockets else 0))
        sock.listen()
        sockets.append(sock)
    # The second one is held by another process alone.
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=(sockets[1].fileno(),)
    )
    sockets.pop().close()
    try:
        port = port_of(sockets[0])
        assert listens_alone(port, [os.getpid(), other.pid])
        assert not listens_alone(port, [os.getpid()])
        me = (os.getpid(), psutil.Process().name())
        theirs = (other.pid, psutil.Process(other.pid).name())
        assert sorted(port_listeners(port, [])) == sorted([me, theirs])
    finally:
        other.kill()
        other.wait()
        sockets[0].close()


def test_closed_never_listened_port_is_free() -> None:
    assert probe_port(HOST, free_port()) is PortState.FREE


def test_unresolvable_host_is_busy() -> None:
    assert probe_port("no-such-host.invalid", free_port()) is PortState.BUSY


def make_time_wait() -> int:
    """Leave the SERVER side of a connection in TIME_WAIT on a port nobody listens on.

    The listener sets SO_REUSEADDR as nearly every server framework does: on Linux a
    TIME_WAIT socket only yields to a SO_REUSEADDR bind if its own socket had it too.
    """
    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((HOST, 0))
        lsock.listen()
        port = port_of(lsock)
        client = socket.create_connection((HOST, port))
        server, _ = lsock.accept()
        server.close()  # the server closes first: its side will hold TIME_WAIT
        client.settimeout(2)
        assert client.recv(1) == b""  # FIN arrived
        client.close()
    return port


def server_side_time_wait(port: int) -> bool:
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return True  # cannot check; trust the sequence above
    return any(
        getattr(c.laddr, "port", None) == port and c.status == psutil.CONN_TIME_WAIT for c in conns
    )


def test_server_side_close_leaves_time_wait() -> None:
    port = make_time_wait()
    deadline = time.monotonic() + 2
    while not server_side_time_wait(port) and time.monotonic() < deadline:
        time.sleep(0.01)
    state = probe_port(HOST, port)
    if state is PortState.FREE and not sys.platform.startswith("linux"):
        pytest.skip(f"{sys.platform} lets a plain bind through next to TIME_WAIT")
    assert state is PortState.TIME_WAIT
    # A plain bind fails, a SO_REUSEADDR bind (what servers do) succeeds.
    with socket.socket() as sock, pytest.raises(OSError):
        sock.bind((HOST, port))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))


def test_choose_port_with_real_probe_skips_foreign_port(listener: socket.socket) -> None:
    held, free = port_of(listener), free_port()
    choice = choose_port([held, free], None, (), lambda p: probe_port(HOST, p))
    assert choice == Choice(free, PortState.FREE)


def test_choose_port_with_real_probe_prefers_free_over_time_wait() -> None:
    lingering, free = make_time_wait(), free_port()
    choice = choose_port([lingering, free], None, (), lambda p: probe_port(HOST, p))
    assert choice.port == free

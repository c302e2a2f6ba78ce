"""What the CLI says when the daemon cannot be reached, by what the socket did: refused
(nothing listens: not running) against silence (something listens but does not answer).
In-process, against real sockets: the CLI's own 30 s timeout would make a test through
`python -m rotator` wait that long (the reset case runs through the real CLI in
tests/integration/test_faults.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rotator.cli import Admin, CommandError
from rotator.configfile import load
from tests.conftest import component, free_ports, write_config


def admin_for(tmp_path: Path, port: int) -> Admin:
    config = write_config(tmp_path, {"web": component()}, admin={"listen": f"127.0.0.1:{port}"})
    return Admin(load(config))


def test_nothing_listening_is_not_running(tmp_path: Path) -> None:
    admin = admin_for(tmp_path, free_ports(1)[0])
    with pytest.raises(CommandError, match=r"^daemon not running \(nothing answers at "):
        admin.get("/v1/status")


def test_a_listener_that_never_answers_is_not_called_not_running(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    with socket.create_server(("127.0.0.1", port)):  # listens (the kernel accepts), never serves
        admin = admin_for(tmp_path, port)
        with pytest.raises(CommandError) as caught:
            admin._open("/v1/status", "GET", timeout=0.3)
    message = str(caught.value)
    assert message.startswith(f"the daemon at http://127.0.0.1:{port} did not answer")
    assert "did not answer within 0.3 s" in message and "not running" not in message
    assert "file descriptors" in message and str(tmp_path / "state" / "daemon.lock") in message

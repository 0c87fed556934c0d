"""sd_notify: READY=1 reaches a datagram socket named by NOTIFY_SOCKET; without one nothing happens."""

from __future__ import annotations

import os
import socket
import tempfile

from rabbitproxy.app import sd_notify as notify


def test_ready_reaches_the_notify_socket() -> None:
    with tempfile.TemporaryDirectory() as d, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        path = os.path.join(d, "notify")
        s.bind(path)
        assert notify("READY=1", {"NOTIFY_SOCKET": path}) is True
        assert s.recv(64) == b"READY=1"


def test_abstract_namespace_socket() -> None:
    name = f"rabbitproxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert s.recv(64) == b"STOPPING=1"


def test_no_socket_or_a_vanished_one_is_not_an_error() -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"}) is False

"""sd_notify: READY=1 reaches a datagram socket named by NOTIFY_SOCKET; without one nothing happens. While the
proxy runs, STATUS= and (under WatchdogSec) WATCHDOG=1 follow (issue 26, item 6)."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Callable

import pytest

from rabbitproxy.app import sd_notify as notify
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.systemd_notify import watchdog_interval
from tests.support.net import echo_handler, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


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


def test_the_watchdog_interval_is_half_of_watchdog_usec_and_only_for_the_watched_process() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    # Another process is the one systemd watches (this one inherited the variables): not ours to answer.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


@pytest.mark.asyncio
async def test_status_and_watchdog_come_from_the_running_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as d, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        path = os.path.join(d, "notify")
        s.bind(path)
        s.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        # WatchdogSec=0.4 s: a keep-alive every 0.2 s, each with the STATUS= line.
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        messages: list[str] = []

        def seen(predicate: Callable[[], bool]) -> bool:
            # The socket is non-blocking: read what has arrived, then judge.
            while True:
                try:
                    messages.append(s.recv(512).decode())
                except BlockingIOError:
                    return bool(messages) and predicate()

        async with tcp_server(echo_handler) as port:
            backends = [
                {"name": "up1", "address": "127.0.0.1", "port": port},
                {"name": "up2", "address": "127.0.0.1", "port": port},
            ]
            async with run_proxy(service_config(backends)) as proxy:
                await wait_for(
                    lambda: seen(lambda: sum(m.startswith("WATCHDOG=1\n") for m in messages) >= 3),
                    what="three WATCHDOG=1",
                )
                assert messages[0] == "READY=1"
                assert messages[-1] == "WATCHDOG=1\nSTATUS=1 service(s), 2/2 backend(s) up, 0 connection(s)"
                proxy.services["amqp"].pool.by_name["up2"].set_operator_state("maint", CloseReason.BACKEND_MAINT)
                reader, writer = await asyncio.open_connection(*listen_addr(proxy))
                writer.write(b"x")
                await reader.readexactly(1)
                await wait_for(
                    lambda: seen(lambda: messages[-1].endswith("1/2 backend(s) up, 1 connection(s)")),
                    what="STATUS= with the change",
                )
                writer.close()
        messages.clear()
        seen(lambda: True)
        assert "STOPPING=1" in messages

"""Clients and backends that misbehave: slowloris, limits, descriptor exhaustion, floods of resets.

The process-level tests run ``rabbitproxy serve`` as a subprocess on the same event loop kind as the test, so its
descriptors and memory can be counted from /proc and it can be started with a low descriptor limit.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rabbitproxy.balancing.reasons import CloseReason
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.process import ProxyProcess, open_fds, running_loop_name
from tests.support.proxy import listen_addr, proxy_config, run_proxy, service_config
from tests.support.waiting import wait_for

HELLO = b"AMQP\x00\x00\x09\x01"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def reset_socket(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def closed_by_proxy(reader: asyncio.StreamReader) -> bool:
    """True when the proxy ends the connection without relaying anything (a FIN, or an RST if bytes were unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 30) == b""
    except ConnectionResetError:
        return True


@pytest.mark.asyncio
async def test_slowloris_is_closed_after_the_hello_timeout() -> None:
    open_backend: set[asyncio.StreamWriter] = set()

    async def tracking_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_backend.add(writer)
        try:
            await echo_handler(reader, writer)
        finally:
            open_backend.discard(writer)

    async with (
        tcp_server(tracking_echo) as port,
        run_proxy(
            service_config([{"name": "echo", "address": "127.0.0.1", "port": port}], client_hello_timeout=2.0)
        ) as p,
    ):
        service = p.services["amqp"]
        slow_r, slow_w = await asyncio.open_connection(*listen_addr(p))
        slow_w.write(HELLO[:3])
        # A well-behaved client beside it is not affected.
        good_r, good_w = await asyncio.open_connection(*listen_addr(p))
        good_w.write(HELLO)
        assert await good_r.readexactly(8) == HELLO
        assert await asyncio.wait_for(slow_r.read(), 30) == b"AMQ"  # the echo of what it sent, then EOF
        await wait_for(lambda: service.ended[CloseReason.HELLO_TIMEOUT] == 1, what="hello timeout counted")
        # Its backend connection is gone with it; only the good client's remains.
        await wait_for(lambda: len(open_backend) == 1, what="slowloris' backend connection closed")
        assert service.pool.by_name["echo"].active == 1
        good_w.write(b"still here")
        assert await good_r.readexactly(10) == b"still here"
        for w in (slow_w, good_w):
            w.close()


@pytest.mark.asyncio
async def test_backend_max_connections_skips_full_backends_then_closes_and_counts() -> None:
    async with (
        tcp_server(echo_handler) as port1,
        tcp_server(echo_handler) as port2,
        run_proxy(
            service_config(
                [
                    {"name": "b1", "address": "127.0.0.1", "port": port1, "max_connections": 1},
                    {"name": "b2", "address": "127.0.0.1", "port": port2, "max_connections": 2},
                ]
            )
        ) as p,
    ):
        service = p.services["amqp"]
        held = []
        for _ in range(3):
            r, w = await asyncio.open_connection(*listen_addr(p))
            w.write(HELLO)
            assert await r.readexactly(8) == HELLO
            held.append((r, w))
        assert {b.name: b.active for b in service.pool.backends} == {"b1": 1, "b2": 2}
        r4, w4 = await asyncio.open_connection(*listen_addr(p))
        w4.write(HELLO)
        assert await closed_by_proxy(r4)
        w4.close()
        await wait_for(lambda: service.ended[CloseReason.LIMIT] == 1, what="limit counted")
        for r, w in held:
            w.write(b"ok")
            assert await r.readexactly(2) == b"ok"
        held[0][1].close()
        await wait_for(lambda: service.pool.active == 2, what="a slot freed")
        r5, w5 = await asyncio.open_connection(*listen_addr(p))
        w5.write(HELLO)
        assert await r5.readexactly(8) == HELLO
        for _, w in [*held[1:], (r5, w5)]:
            w.close()


class LimitedProxy(ProxyProcess):
    """``rabbitproxy serve`` under ``prlimit --nofile``."""

    def __init__(self, config: dict[str, Any], tmp_path: Path, loop: str, nofile: int) -> None:
        super().__init__(config, tmp_path, loop=loop, log_level="info")
        self.nofile = nofile

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", *super().argv()]


async def echoes(addr: tuple[str, int]) -> bool:
    try:
        async with asyncio.timeout(2):
            r, w = await asyncio.open_connection(*addr)
            try:
                w.write(HELLO)
                return await r.readexactly(8) == HELLO
            finally:
                w.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


@pytest.mark.asyncio
async def test_running_out_of_descriptors_does_not_stop_the_listener(tmp_path: Path) -> None:
    async with tcp_server(echo_handler) as echo:
        cfg = proxy_config(service_config([{"name": "echo", "address": "127.0.0.1", "port": echo}]))
        with LimitedProxy(cfg, tmp_path, running_loop_name(), nofile=64) as proc:
            assert await echoes(proc.addr)
            await wait_for(lambda: open_fds(proc.pid) < 30, what="proxy settled")
            baseline = open_fds(proc.pid)
            held = []
            # Each relayed client costs the proxy two descriptors; 64 run out long before 60 clients.
            for _ in range(60):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(proc.addr)
                held.append(s)
            # The proxy may hit the limit on accept() or on the backend connect() (then it closes that client and
            # the count falls again), so the peak can fall between two polls; the log says it happened either way.
            await wait_for(
                lambda: open_fds(proc.pid) >= 60 or "Too many open files" in proc.log(),
                what="proxy out of descriptors",
            )
            for s in held:
                reset_socket(s)
            await wait_for(lambda: echoes(proc.addr), timeout=60, what="proxy accepting again")
            await wait_for(lambda: open_fds(proc.pid) <= baseline, what=f"descriptors back to {baseline}")
            assert proc.proc is not None and proc.proc.poll() is None
            log = proc.log()
            assert "Traceback" not in log
            # One warning per interval, not one per failed accept().
            assert log.count("out of system resource") == 0
            warnings = log.count("cannot accept connections")
            # asyncio reports each failed accept (condensed by us); libuv drops the waiting connects silently.
            assert (1 <= warnings <= 3) if proc.loop == "asyncio" else warnings == 0, log[-2000:]


async def services_view(admin: str) -> dict[str, dict[str, Any]]:
    """The admin API's view of every service of a proxy process, by name."""
    async with aiohttp.ClientSession() as http, http.get(f"http://{admin}/api/services") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
    return {service["name"]: service for service in body["services"]}


async def reset_by_backend(addr: tuple[str, int]) -> bool:
    """Send the hello to a service whose backend resets: True when the proxy ends the connection, echoing nothing."""
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(HELLO)
        return await closed_by_proxy(r)
    finally:
        w.close()


@pytest.mark.asyncio
async def test_floods_of_resets_and_vanishing_peers_leak_nothing(tmp_path: Path) -> None:
    async def streamer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Echo what arrives and keep pushing data, so clients vanish while bytes are in flight both ways.
        await reader.readexactly(8)
        chunk = os.urandom(64 * 1024)
        for _ in range(64):
            writer.write(chunk)
            await writer.drain()

    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with (
        tcp_server(streamer) as stream_port,
        tcp_server(resetter) as reset_port,
        tcp_server(echo_handler) as echo_port,
    ):
        admin = f"127.0.0.1:{free_port()}"
        cfg = {
            "admin": {"listen": admin},
            "services": [
                service_config([{"name": "s", "address": "127.0.0.1", "port": stream_port}], name="stream"),
                service_config([{"name": "r", "address": "127.0.0.1", "port": reset_port}], name="reset"),
                service_config([{"name": "e", "address": "127.0.0.1", "port": echo_port}], name="echo"),
            ],
        }
        with ProxyProcess(cfg, tmp_path, loop=running_loop_name()) as proc:
            stream_addr = proc.addr
            reset_addr, echo_addr = (
                (stream_addr[0], int(svc["listen"].rsplit(":", 1)[1])) for svc in cfg["services"][1:]
            )
            # The proxy serves, and a backend reset ends the client's connection and is counted as such.
            assert await echoes(echo_addr)
            assert await reset_by_backend(reset_addr)
            await wait_for(
                lambda: _ended(admin, "reset", CloseReason.BACKEND_RESET, 1), what="the first backend reset counted"
            )
            await wait_for(lambda: open_fds(proc.pid) < 40, what="proxy settled")
            baseline_fds, baseline_rss = open_fds(proc.pid), rss_kib(proc.pid)

            async def vanish_mid_stream() -> None:
                r, w = await asyncio.open_connection(*stream_addr)
                w.write(HELLO)
                await r.readexactly(100_000)
                reset_socket(w.get_extra_info("socket").dup())
                w.transport.abort()

            async def connect_and_reset(addr: tuple[str, int], send: bool) -> None:
                s = socket.socket()
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, addr)
                if send:
                    await asyncio.get_running_loop().sock_sendall(s, HELLO)
                reset_socket(s)

            for _ in range(6):
                results = await asyncio.gather(
                    *(vanish_mid_stream() for _ in range(10)),
                    *(connect_and_reset(stream_addr, i % 2 == 0) for i in range(50)),
                    *(connect_and_reset(reset_addr, True) for _ in range(20)),
                    return_exceptions=True,
                )
                # Our own side may see a reset too (the backend's RST races our send); nothing else is acceptable.
                assert all(r is None or isinstance(r, ConnectionError) for r in results), results
            assert proc.proc is not None and proc.proc.poll() is None, proc.log()[-2000:]
            await wait_for(lambda: open_fds(proc.pid) <= baseline_fds, what=f"descriptors back to {baseline_fds}")
            # Memory: buffers of dead connections must be released; allow for allocator slack, not for a leak.
            assert rss_kib(proc.pid) - baseline_rss < 40 * 1024
            # Every connection the flood made is gone from the books, each ended with a counted reason, and the
            # sixty clients that vanished mid-stream were all relayed first.
            await wait_for(lambda: _all_ended(admin), what="every flooded connection ended and counted")
            view = await services_view(admin)
            assert view["stream"]["connections"]["total"] >= 60, view["stream"]
            assert view["stream"]["ended"].get(CloseReason.CLIENT_RESET, 0) >= 1, view["stream"]
            # Still alive and still serving: a backend reset is still reported as one, and other clients are relayed.
            before = view["reset"]["ended"].get(CloseReason.BACKEND_RESET, 0)
            assert await reset_by_backend(reset_addr)
            await wait_for(
                lambda: _ended(admin, "reset", CloseReason.BACKEND_RESET, before + 1), what="a backend reset counted"
            )
            assert await echoes(echo_addr)
            assert await echoes(echo_addr)
            assert proc.proc.poll() is None
            assert "Traceback" not in proc.log()


async def _ended(admin: str, service: str, reason: CloseReason, at_least: int) -> bool:
    view = await services_view(admin)
    return int(view[service]["ended"].get(reason, 0)) >= at_least


async def _all_ended(admin: str) -> bool:
    view = await services_view(admin)
    return all(
        svc["connections"]["active"] == 0 and sum(svc["ended"].values()) == svc["connections"]["total"]
        for svc in view.values()
    )

"""The relay through a real proxy in this loop, against plain TCP backends (no broker needed here)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from rabbitproxy.balancing.reasons import CloseReason
from tests.support.net import dead_port, echo_handler, silent_backend, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


@pytest.mark.asyncio
async def test_half_closed_client_still_gets_the_whole_reply() -> None:
    # The backend answers only after it has seen the client's EOF, so the EOF must be forwarded and the reply
    # must come back over the half-closed connection.
    reply = os.urandom(3 * 1024 * 1024)

    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        writer.write(hashlib.sha256(request).digest() + reply)
        await writer.drain()

    async with (
        tcp_server(reply_after_eof) as port,
        run_proxy(service_config([{"name": "echo", "address": "127.0.0.1", "port": port}])) as p,
    ):
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        request = os.urandom(500_000)
        writer.write(request)
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        assert got[:32] == hashlib.sha256(request).digest()
        assert got[32:] == reply
        service = p.services["amqp"]
        await wait_for(lambda: service.active == 0, what="connection closed")
        assert service.ended[CloseReason.CLIENT_CLOSED] == 1


@pytest.mark.asyncio
async def test_retry_skips_a_backend_with_nothing_listening() -> None:
    with dead_port() as dead:
        async with (
            tcp_server(echo_handler) as port,
            run_proxy(
                service_config(
                    [
                        {"name": "dead", "address": "127.0.0.1", "port": dead},
                        {"name": "live", "address": "127.0.0.1", "port": port},
                    ],
                    retries=1,
                )
            ) as p,
        ):
            for i in range(10):
                reader, writer = await asyncio.open_connection(*listen_addr(p))
                msg = b"ping %d" % i
                writer.write(msg)
                assert await reader.readexactly(len(msg)) == msg
                writer.close()
            pool = p.services["amqp"].pool
            assert pool.by_name["live"].total == 10
            assert pool.by_name["dead"].total == 0
            assert pool.by_name["dead"].connect_errors >= 1


@pytest.mark.asyncio
async def test_a_backend_that_never_answers_times_out_and_the_next_one_serves() -> None:
    with silent_backend() as silent:
        async with (
            tcp_server(echo_handler) as port,
            run_proxy(
                service_config(
                    [
                        # Equal weights: smooth round robin tries the first in config order first.
                        {"name": "silent", "address": "127.0.0.1", "port": silent},
                        {"name": "live", "address": "127.0.0.1", "port": port},
                    ],
                    retries=1,
                    connect_timeout=1.0,
                )
            ) as p,
        ):
            reader, writer = await asyncio.open_connection(*listen_addr(p))
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 30) == b"ping"
            writer.close()
            pool = p.services["amqp"].pool
            assert pool.by_name["silent"].connect_errors == 1
            assert pool.by_name["silent"].total == 0
            assert pool.by_name["live"].total == 1


@pytest.mark.asyncio
async def test_every_connect_to_a_silent_backend_ends_at_its_deadline() -> None:
    # Several connects wait at once: the service's one deadline timer must end each of them, including connects
    # that started while the timer was already armed for an older one.
    with silent_backend() as silent:
        async with run_proxy(
            service_config(
                [{"name": "silent", "address": "127.0.0.1", "port": silent}], retries=0, connect_timeout=0.2
            )
        ) as p:
            clients = []
            for _ in range(5):
                clients.append(await asyncio.open_connection(*listen_addr(p)))
                await asyncio.sleep(0.05)  # spread the connects over the first one's timeout
            for reader, writer in clients:
                assert await asyncio.wait_for(reader.read(), 30) == b""
                writer.close()
            service = p.services["amqp"]
            await wait_for(lambda: service.ended[CloseReason.CONNECT_FAILED] == 5, what="five connects timed out")
            assert service.pool.by_name["silent"].connect_errors == 5
            assert not service.connects and all(b.connecting == 0 for b in service.pool.backends)


@pytest.mark.asyncio
async def test_no_usable_backend_closes_the_client_and_counts_it() -> None:
    with dead_port() as dead:
        async with run_proxy(
            service_config([{"name": "dead", "address": "127.0.0.1", "port": dead}], retries=0)
        ) as p:
            reader, writer = await asyncio.open_connection(*listen_addr(p))
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
            service = p.services["amqp"]
            await wait_for(lambda: service.ended[CloseReason.CONNECT_FAILED] == 1, what="connect failed counted")


@pytest.mark.asyncio
async def test_max_connections_closes_the_extra_client_and_keeps_serving() -> None:
    async with (
        tcp_server(echo_handler) as port,
        run_proxy(
            service_config([{"name": "echo", "address": "127.0.0.1", "port": port}], max_connections=2)
        ) as p,
    ):
        held = [await asyncio.open_connection(*listen_addr(p)) for _ in range(2)]
        service = p.services["amqp"]
        await wait_for(lambda: service.pool.by_name["echo"].active == 2, what="two connections up")
        r3, w3 = await asyncio.open_connection(*listen_addr(p))
        assert await asyncio.wait_for(r3.read(), 30) == b""
        w3.close()
        assert service.ended[CloseReason.LIMIT] == 1
        for r, w in held:
            w.write(b"still here")
            assert await r.readexactly(10) == b"still here"
            w.close()


@pytest.mark.asyncio
async def test_idle_client_is_closed_after_client_idle_timeout() -> None:
    async with (
        tcp_server(echo_handler) as port,
        run_proxy(
            service_config([{"name": "echo", "address": "127.0.0.1", "port": port}], client_idle_timeout=1.0)
        ) as p,
    ):
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        service = p.services["amqp"]
        await wait_for(lambda: service.ended[CloseReason.IDLE_TIMEOUT] == 1, what="idle timeout counted")


@pytest.mark.asyncio
async def test_slow_reader_does_not_make_the_proxy_buffer_without_bound() -> None:
    total = 64 * 1024 * 1024
    high = 128 * 1024
    sent = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"z" * 65536
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        sent.set()

    async with (
        tcp_server(firehose) as port,
        run_proxy(
            service_config(
                [{"name": "src", "address": "127.0.0.1", "port": port}], high_water=high, low_water=high // 4
            )
        ) as p,
    ):
        reader, writer = await asyncio.open_connection(*listen_addr(p), limit=65536)
        service = p.services["amqp"]
        conn = await wait_for(lambda: next(iter(service.connections), None), what="connection")
        await wait_for(lambda: conn.backend_transport is not None, what="backend connected")
        # Read nothing: the proxy must stop reading from the backend once its client-side buffer is full.
        peak = 0
        for _ in range(40):
            await asyncio.sleep(0.02)
            peak = max(peak, conn.transport.get_write_buffer_size())
        assert not sent.is_set()
        # One read from the backend (at most 256 KiB on either loop) may land on top of the high-water mark.
        assert peak <= high + 256 * 1024
        received = 0
        while received < total:
            data = await reader.read(1 << 20)
            assert data
            received += len(data)
            peak = max(peak, conn.transport.get_write_buffer_size())
        assert received == total
        assert peak <= high + 256 * 1024
        writer.close()


@pytest.mark.asyncio
async def test_both_legs_have_tcp_nodelay() -> None:
    # Small AMQP frames (heartbeats, acks) must not wait for Nagle's algorithm on either leg.
    async with tcp_server(echo_handler) as port, run_proxy(
        service_config([{"name": "echo", "address": "127.0.0.1", "port": port}])
    ) as p:
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        conn = next(iter(p.services["amqp"].connections))
        for transport in (conn.transport, conn.backend_transport):
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        writer.close()

"""Peers that stop reading, over real loopback sockets: closes end at close_timeout, buffers keep their bound,
and both legs have TCP keepalive (issue 12, defects 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.relay.legs import ClientLeg
from tests.support.net import echo_handler, push, silent_backend, tcp_server
from tests.support.process import open_fds
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

# The most either loop reads from a socket at once (uvloop's read buffer; asyncio's max_size): one read may land on
# top of a high-water mark before the pause takes effect.
ONE_READ = 256 * 1024


@contextlib.contextmanager
def sink_backend() -> Iterator[int]:
    """A backend that accepts and never reads, with kernel buffers kept small; yields its port.

    The kernel completes the handshake of a listener nobody calls ``accept()`` on, and the bytes sent pile up in
    the queued socket until its receive buffer is full. A small receive buffer and a small MSS (which caps the
    sender's send buffer, sized by the kernel from the MSS) keep what the kernel swallows to some tens of KiB, so
    what the proxy writes stays in the proxy's own buffers, where the test can see it.
    """
    listener = socket.socket()
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]
    finally:
        listener.close()


def held(conn: ClientLeg) -> int:
    """Bytes the proxy holds for this connection: both transports' write buffers and the connect-time buffer."""
    total = len(conn.pending or b"")
    for t in (conn.transport, conn.backend_transport):
        if t is not None and not t.is_closing():
            total += t.get_write_buffer_size()
    return total


@pytest.mark.asyncio
async def test_bytes_buffered_during_a_slow_connect_do_not_undo_backpressure() -> None:
    # Issue 12, defect 2. The first backend's connects hang, so the client's bytes wait in the connect-time buffer
    # (reading is paused past high_water); the second accepts and never reads. Writing the waiting bytes at attach
    # fills the backend transport past high_water, and the client must stay paused: it used to be resumed at the
    # end of the attach with no second pause to come, and the proxy buffered whatever the client sent.
    high = 64 * 1024
    total = 256 * 1024 * 1024
    bound = 2 * high + 2 * ONE_READ
    with silent_backend() as silent, sink_backend() as sink:
        async with run_proxy(
            service_config(
                [
                    # Equal weights: smooth round robin tries the first in config order first.
                    {"name": "silent", "address": "127.0.0.1", "port": silent},
                    {"name": "sink", "address": "127.0.0.1", "port": sink},
                ],
                retries=1,
                connect_timeout=1.0,
                high_water=high,
                low_water=high // 4,
                shutdown_timeout=0,
                close_timeout=1.0,
            )
        ) as p:
            service = p.services["amqp"]
            _reader, writer = await asyncio.open_connection(*listen_addr(p))
            pusher = asyncio.create_task(push(writer, total))
            try:
                conn = await wait_for(lambda: next(iter(service.connections), None), what="the connection")
                await wait_for(lambda: conn.backend_transport is not None, what="attached to the sink")
                assert service.pool.by_name["silent"].connect_errors == 1
                assert conn.backend is service.pool.by_name["sink"]
                peak = 0
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    peak = max(peak, held(conn))
                    if peak > bound:
                        break
                assert peak <= bound, f"the proxy holds {peak} bytes for one connection (bound {bound})"
                assert not pusher.done(), "the proxy took everything the client sent"
            finally:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
                writer.close()


@pytest.mark.asyncio
async def test_a_close_towards_a_backend_that_stopped_reading_ends_at_close_timeout() -> None:
    # Issue 12, defect 1: the backend's buffer is full and the backend is put in maint; the flushing close used to
    # wait for ever, holding both descriptors and a place in max_connections.
    high = 64 * 1024
    close_timeout = 1.0
    with sink_backend() as sink:
        async with run_proxy(
            service_config(
                [{"name": "sink", "address": "127.0.0.1", "port": sink}],
                high_water=high,
                low_water=high // 4,
                close_timeout=close_timeout,
            )
        ) as p:
            service = p.services["amqp"]
            baseline = open_fds()
            _reader, writer = await asyncio.open_connection(*listen_addr(p))
            pusher = asyncio.create_task(push(writer, 64 * 1024 * 1024))
            try:
                conn = await wait_for(lambda: next(iter(service.connections), None), what="the connection")
                await wait_for(lambda: conn.backend_transport is not None, what="attached to the sink")
                bt = conn.backend_transport
                # Paused past high_water; the kernel may take a little more afterwards, but never all of it.
                await wait_for(
                    lambda: conn.backend_full and bt.get_write_buffer_size() > 0, what="the backend side buffer full"
                )
                assert service.pool.by_name["sink"].set_operator_state("maint", CloseReason.BACKEND_MAINT) == 1
                await wait_for(lambda: service.active == 0, timeout=close_timeout + 10, what="the connection ended")
                assert service.ended == {CloseReason.BACKEND_MAINT: 1}
                assert service.close_timeouts == 1
                assert len(service.close_deadlines) == 0
                await asyncio.wait_for(pusher, 30)
            finally:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
                writer.close()
            await wait_for(lambda: open_fds() <= baseline, what=f"descriptors back to {baseline}")


def _keepalive_of(sock: Any) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, (1, 60, 10, 6)),  # the default
        ({"idle": 30, "interval": 5, "count": 3}, (1, 30, 5, 3)),
        (False, None),
    ],
)
async def test_both_legs_have_tcp_keepalive_as_configured(setting: Any, expected: Any) -> None:
    extra = {} if setting is None else {"tcp_keepalive": setting}
    async with (
        tcp_server(echo_handler) as port,
        run_proxy(service_config([{"name": "echo", "address": "127.0.0.1", "port": port}], **extra)) as p,
    ):
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        try:
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 30) == b"x"
            conn = next(iter(p.services["amqp"].connections))
            client = conn.transport.get_extra_info("socket")
            backend = conn.backend_transport.get_extra_info("socket")
            if expected is None:
                assert _keepalive_of(client)[0] == 0, "client leg has SO_KEEPALIVE"
                # Nor will the backend leg get it later: no keepalive deadline is waiting for it.
                assert _keepalive_of(backend)[0] == 0, "backend leg has SO_KEEPALIVE"
                assert conn not in p.services["amqp"].keepalive_deadlines
            else:
                # The client leg inherits it from the listener at accept; the backend leg is told shortly after
                # attach, so a connection that ends at once never pays for the system calls.
                assert _keepalive_of(client) == expected, f"client leg keepalive {_keepalive_of(client)}"
                await wait_for(lambda: _keepalive_of(backend) == expected, what=f"backend leg keepalive {expected}")
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_a_reload_changes_keepalive_for_clients_accepted_afterwards() -> None:
    async with (
        tcp_server(echo_handler) as port,
        run_proxy(service_config([{"name": "echo", "address": "127.0.0.1", "port": port}])) as p,
    ):
        service = p.services["amqp"]
        # What a reload does to a service whose listener stays: it hands over the new config.
        service.config = service.config.model_copy(update={"tcp_keepalive": None})
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        try:
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 30) == b"x"
            conn = next(iter(service.connections))
            assert conn not in service.keepalive_deadlines, "the backend leg would get keepalive later"
            for transport in (conn.transport, conn.backend_transport):
                assert _keepalive_of(transport.get_extra_info("socket"))[0] == 0
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_a_graceful_stop_flushes_to_a_slow_client_for_close_timeout() -> None:
    # Issue 25, item 12: after shutdown_timeout the closes flush as every close does, for up to close_timeout (what
    # the docs and the systemd unit's TimeoutStopSec are sized on); a fixed 2 s used to abort them sooner.
    high = 64 * 1024
    blob = 32 * 1024 * 1024

    async def talker(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"b" * blob)
        await writer.drain()
        await asyncio.Event().wait()  # stays open: only the proxy's close ends this connection

    async with (
        tcp_server(talker) as port,
        run_proxy(
            service_config(
                [{"name": "talker", "address": "127.0.0.1", "port": port}],
                high_water=high,
                low_water=high // 4,
                shutdown_timeout=0.5,
                close_timeout=30.0,
            )
        ) as p,
    ):
        service = p.services["amqp"]
        # A client that reads nothing for now: the proxy's buffer towards it fills and stays full.
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        try:
            conn = await wait_for(lambda: next(iter(service.connections), None), what="the connection")
            await wait_for(lambda: conn.transport.get_write_buffer_size() > 0, what="the client side buffer full")
            stopping = asyncio.create_task(p.shutdown())
            await wait_for(lambda: conn.close_started, what="the close after shutdown_timeout")
            # Longer than the old fixed 2 s, far shorter than close_timeout: a bounded look for an abort that
            # must not come.
            await asyncio.sleep(4.0)
            assert not conn.close_aborted and not conn.closed
            received = 0
            while data := await asyncio.wait_for(reader.read(1 << 20), 30):
                received += len(data)
            # Everything the proxy took from the backend reached the client, then a clean end.
            assert received == conn.bytes_out
            await asyncio.wait_for(stopping, 30)
            assert service.ended == {CloseReason.SHUTDOWN: 1}
            assert service.close_timeouts == 0
        finally:
            writer.close()

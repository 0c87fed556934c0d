"""Peers that stop reading, over real loopback sockets: buffers keep their bound (issue 12, defect 2)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from rabbitproxy.relay.legs import ClientLeg
from tests.helpers import (
    listen_addr,
    run_proxy,
    service_config,
    silent_backend,
    wait_for,
)

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


async def push(writer: asyncio.StreamWriter, total: int) -> None:
    """Write ``total`` bytes as fast as the proxy takes them; a connection the proxy ends stops it quietly."""
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass


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

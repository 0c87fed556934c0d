"""The HTTP health check and the HTTP feedback agent against hostile or slow HTTP servers on loopback.

Raw asyncio servers write the responses byte by byte as the scenario needs (an endless body, a body in two parts),
which an HTTP framework would not let a test do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from rabbitproxy.control.feedback import ask_http
from rabbitproxy.control.health import ProbeResult, probe_http
from tests.support.net import tcp_server
from tests.support.waiting import wait_for

# Far more than any check should ever read, yet small enough that the unfixed check (which read it all into
# memory) would not hurt a shared test machine.
HUGE = 64 * 1024 * 1024
CHUNK = 64 * 1024


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


class EndlessBody:
    """The first connection gets a 200 whose body would be HUGE (chunked or with a Content-Length), later ones
    a small one. Counts what it managed to send and notices when the client hangs up."""

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.connections = 0
        self.sent = 0
        self.hung_up = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections > 1:
            while True:
                await _read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        await _read_request(reader)
        framing = b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % (HUGE * 100)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + framing + b"\r\n\r\n")
        payload = b"x" * CHUNK
        piece = b"%x\r\n%s\r\n" % (CHUNK, payload) if self.chunked else payload
        try:
            while self.sent < HUGE:
                writer.write(piece)
                self.sent += CHUNK
                await writer.drain()
            # Sent all it will: the body stays unfinished, and the connection open until the client leaves.
            await reader.read()
        except ConnectionError:
            pass
        self.hung_up.set()


@pytest.mark.asyncio
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_http_check_reads_a_bounded_part_of_an_endless_body(chunked: bool) -> None:
    server = EndlessBody(chunked)
    async with tcp_server(server.handle) as port, aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        url = f"http://127.0.0.1:{port}/api/health/checks/alarms"
        # The verdict comes from the status; the body that never ends must not turn it into a timeout.
        result = await probe_http(session, url, {}, within=20.0)
        assert result == ProbeResult(True, "HTTP 200")
        # The check hung up instead of reading on: the server stopped long before it had sent HUGE bytes (what
        # it got out is the cap plus what the socket buffers on both sides hold).
        await wait_for(server.hung_up.is_set, timeout=20, what="the check to close the connection")
        assert server.sent < HUGE // 2
        # The session is still good for the next check (a new connection, as the old one was closed).
        assert await probe_http(session, url, {}, within=20.0) == ProbeResult(True, "HTTP 200")
        assert server.connections == 2


def _two_part_agent(
    first: bytes, second: bytes, chunked: bool, second_sent: asyncio.Event
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        if chunked:
            head = b"Transfer-Encoding: chunked"
            parts = [b"%x\r\n%s\r\n" % (len(first), first), b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second)]
        else:
            head = b"Content-Length: %d" % (len(first) + len(second))
            parts = [first, second]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + head + b"\r\n\r\n" + parts[0])
        await writer.drain()
        # The pause is the scenario itself (an agent, or a network, that delivers the body in two parts), not a
        # wait for a condition: the client must not take the first part for the whole reply.
        await asyncio.sleep(0.3)
        writer.write(parts[1])
        await writer.drain()
        second_sent.set()
        await reader.read()

    return handle


@pytest.mark.asyncio
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_ask_http_reads_a_reply_that_arrives_in_two_parts(chunked: bool) -> None:
    second_sent = asyncio.Event()
    handler = _two_part_agent(b"up rea", b"dy 75%\n", chunked, second_sent)
    async with tcp_server(handler) as port, aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        body = await ask_http(session, f"http://127.0.0.1:{port}/", within=20.0)
        assert second_sent.is_set()
        assert body == b"up ready 75%\n"

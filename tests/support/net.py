"""Loopback sockets for tests: free ports and small TCP servers that stand in for backends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], host: str = "127.0.0.1"
) -> AsyncIterator[int]:
    """A plain TCP backend for tests of the relay itself; yields its port. Handlers are cancelled on exit."""
    handlers: set[asyncio.Task[None]] = set()

    async def guarded(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # A cancelled handler ends quietly so asyncio does not log the cancellation as an error.
            pass
        finally:
            handlers.discard(task)
            w.close()

    server = await asyncio.start_server(guarded, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(handlers):
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@contextlib.contextmanager
def silent_backend() -> Iterator[int]:
    """A port whose SYNs go unanswered, so a connect to it only ends by timing out; yields the port.

    A listener with a backlog of 0 holds one finished handshake in its accept queue; once that place is taken
    (by the filler connection here) and nobody accepts, Linux drops every further SYN.
    """
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port that refuses every connect while the block runs.

    A port merely found free may be taken by some other process by the time the test connects to it; a socket
    that is bound but never listens holds the port, and the kernel answers every connect to it with a reset.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def push(writer: asyncio.StreamWriter, total: int) -> None:
    """Write ``total`` bytes as fast as the proxy takes them; a connection the proxy ends stops it quietly."""
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass

"""Backend for the TCP bench: an echo port and a reply-then-close port, on uvloop.

``python bench/echo_server.py ECHO_PORT CLOSE_PORT`` runs until SIGTERM. The echo port sends back what it
receives (idle connections and client-closed short connections); the close port answers the first chunk with one
byte and closes, so the backend is the side that ends the connection.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class ReplyClose(Echo):
    def data_received(self, data: bytes) -> None:
        self.transport.write(b"!")
        self.transport.close()


async def main(echo_port: int, close_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    servers = [
        await loop.create_server(Echo, "127.0.0.1", echo_port, backlog=4096),
        await loop.create_server(ReplyClose, "127.0.0.1", close_port, backlog=4096),
    ]
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))

"""AMQP clients for tests: aio-pika connection state, and a raw client whose socket reads the test controls."""

from __future__ import annotations

import asyncio

import aio_pika
from pamqp import commands, frame
from pamqp.header import ProtocolHeader

from rabbitproxy.control.supervisor import Supervisor

from .proxy import listen_addr


async def connect_through(proxy: Supervisor, service: str = "amqp") -> aio_pika.abc.AbstractConnection:
    """An aio-pika client connected as guest through a running in-process proxy's ``service``."""
    host, port = listen_addr(proxy, service)
    return await aio_pika.connect(f"amqp://guest:guest@{host}:{port}/", timeout=15)


def client_dead(conn: aio_pika.abc.AbstractConnection) -> bool:
    """True once an aio-pika client saw its connection end (its own is_closed only turns on after close())."""
    transport = conn.transport
    return conn.is_closed or transport is None or transport.connection.is_closed


async def close_all(conns: list[aio_pika.abc.AbstractConnection]) -> None:
    """Close the clients that are still open (closing a dead one raises)."""
    for c in conns:
        if not client_dead(c):
            await c.close()


class RawConsumer:
    """A hand-driven AMQP 0-9-1 client (pamqp for the framing) whose socket reads we control exactly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""

    async def expect(self, kind: type) -> object:
        while True:
            if self.buffer:
                try:
                    used, _channel, value = frame.unmarshal(self.buffer)
                except Exception:  # noqa: BLE001 - pamqp says "need more bytes" with an exception
                    used = 0
                if used:
                    self.buffer = self.buffer[used:]
                    if isinstance(value, kind):
                        return value
                    continue
            chunk = await self.reader.read(65536)
            assert chunk, "broker closed the connection"
            self.buffer += chunk

    def send(self, value: object, channel: int = 0) -> None:
        self.writer.write(frame.marshal(value, channel))  # type: ignore[arg-type]

    async def consume(self, queue: str) -> None:
        self.writer.write(ProtocolHeader().marshal())
        await self.expect(commands.Connection.Start)
        self.send(commands.Connection.StartOk(response="\0guest\0guest"))
        tune = await self.expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        self.send(commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
        self.send(commands.Connection.Open(virtual_host="/"))
        await self.expect(commands.Connection.OpenOk)
        self.send(commands.Channel.Open(), 1)
        await self.expect(commands.Channel.OpenOk)
        self.send(commands.Basic.Consume(queue=queue, no_ack=True), 1)
        await self.expect(commands.Basic.ConsumeOk)

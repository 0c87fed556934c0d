"""A consumer that stops reading must not make the proxy buffer what the broker keeps pushing."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import pytest
from pamqp import commands, frame
from pamqp.header import ProtocolHeader

from rabbitproxy.dev.cluster import DevCluster
from tests.helpers import listen_addr, run_proxy, service_config, wait_for
from tests.integration.conftest import backends_for

pytestmark = pytest.mark.integration


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


@pytest.mark.asyncio
async def test_stalled_consumer_keeps_proxy_buffers_bounded(cluster: DevCluster) -> None:
    high = 256 * 1024
    count, size = 160, 512 * 1024  # 80 MiB queued for a consumer that reads nothing
    node_url = cluster.amqp_url(cluster.nodes[0])
    async with run_proxy(service_config(backends_for(cluster)[:1], high_water=high, low_water=high // 4)) as p:
        publisher = await aio_pika.connect(node_url, timeout=30)
        try:
            ch = await publisher.channel()
            queue = await ch.declare_queue(f"slow-{os.getpid()}-{id(p)}", arguments={"x-expires": 120_000})
            reader, writer = await asyncio.open_connection(*listen_addr(p), limit=1 << 20)
            consumer = RawConsumer(reader, writer)
            await consumer.consume(queue.name)
            body = os.urandom(size)
            for _ in range(count):
                await ch.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
            conn = next(iter(p.services["amqp"].connections))
            # The broker pushes; the proxy fills the client's socket, then its own buffer up to high water, then
            # stops reading from the broker. Watch it hold there while the consumer is stalled.
            await wait_for(lambda: conn.transport.get_write_buffer_size() >= high, what="proxy buffer filling")
            peak = 0
            for _ in range(50):
                peak = max(peak, conn.transport.get_write_buffer_size())
                await asyncio.sleep(0.02)
            # One read from the broker (at most 256 KiB on either loop) may land on top of the mark.
            assert peak <= high + 256 * 1024
            received = len(consumer.buffer)
            while received < count * size:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 60)
                assert chunk
                received += len(chunk)
                peak = max(peak, conn.transport.get_write_buffer_size())
            assert peak <= high + 256 * 1024
            writer.close()
            await ch.queue_delete(queue.name)
        finally:
            await publisher.close()

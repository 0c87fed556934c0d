"""A consumer that stops reading must not make the proxy buffer what the broker keeps pushing."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.amqp import RawConsumer
from tests.support.cluster import backends_for
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


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

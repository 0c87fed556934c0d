"""A publisher that RabbitMQ blocks during a memory alarm survives the alarm through the proxy (issue 25, item 1).

The broker stops reading a publishing connection while a resource alarm is on. The proxy's leg towards it fills
past ``high_water`` and the proxy stops reading the client, so the client's heartbeats wait unread; the heartbeat
timeout used to count that as the client's silence and cut every blocked publisher after 2.5 heartbeats. RabbitMQ
itself never times out a blocked connection, and connected through the proxy the client must not notice the proxy.
"""

from __future__ import annotations

import asyncio
import itertools

import aio_pika
import pytest

from rabbitproxy.config import RabbitMQConfig
from rabbitproxy.control.management import ManagementAPI, session_for
from rabbitproxy.dev.cluster import DevCluster
from tests.support.amqp import client_dead
from tests.support.cluster import backends_for
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

HEARTBEAT = 2  # seconds: the old code cut the client 5 s into the block
HOLD = 15.0  # seconds the alarm stays on once the proxy has stopped reading the client
MESSAGES = 48
BODY = 1024 * 1024  # 48 MiB in all: far more than the socket buffers between client and broker hold
_names = itertools.count(1)


async def test_a_publisher_blocked_by_a_memory_alarm_is_not_cut_and_loses_nothing(cluster: DevCluster) -> None:
    node = cluster.nodes[0]
    queue_name = f"rabbitproxy-blocked-publisher-{next(_names)}"
    async with (
        run_proxy(service_config(backends_for(cluster)[:1])) as p,
        session_for(RabbitMQConfig()) as session,
    ):
        service = p.services["amqp"]
        host, port = listen_addr(p)
        client = await aio_pika.connect(f"amqp://guest:guest@{host}:{port}/?heartbeat={HEARTBEAT}", timeout=15)
        try:
            proxied = next(iter(service.connections))
            await wait_for(lambda: proxied.idle_slot != 0, what="the heartbeat watch on the client")
            channel = await client.channel(publisher_confirms=True)
            await channel.declare_queue(queue_name, exclusive=True)
            api = ManagementAPI(session, cluster.management_url(node), timeout=10.0)
            publishing: asyncio.Future[list[object]] | None = None
            try:
                await asyncio.to_thread(cluster.rabbitmqctl, node, "set_vm_memory_high_watermark", "0.0000001")
                await wait_for(api.local_alarms, interval=0.2, what="the memory alarm")
                publishing = asyncio.gather(
                    *(
                        channel.default_exchange.publish(aio_pika.Message(bytes([i]) * BODY), routing_key=queue_name)
                        for i in range(MESSAGES)
                    )
                )
                await wait_for(lambda: proxied.reading_paused, what="the proxy to stop reading the blocked client")
                # The alarm holds for many heartbeat timeouts: a bounded look for a close that must not come.
                await asyncio.sleep(HOLD)
                assert proxied.reason is None and not client_dead(client), proxied.reason
                assert not publishing.done(), "the broker did not block the publisher: the test proves nothing"
            finally:
                await asyncio.to_thread(cluster.rabbitmqctl, node, "set_vm_memory_high_watermark", "0.4")
            assert publishing is not None
            confirms = await asyncio.wait_for(publishing, 120)
            assert len(confirms) == MESSAGES
            declared = await channel.declare_queue(queue_name, passive=True)
            assert declared.declaration_result.message_count == MESSAGES
            # The one connection, never closed and never replaced.
            assert service.connections == {proxied} and not client_dead(client)
            assert sum(service.ended.values()) == 0, dict(service.ended)
        finally:
            if not client_dead(client):
                await client.close()

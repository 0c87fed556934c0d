"""AMQP clients through rabbitproxy in front of the real 3-node cluster (the data path on 3.10 and 4.0: ``broker``)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aio_pika
import pytest

from rabbitproxy.config import RabbitMQConfig
from rabbitproxy.control.management import ManagementAPI, session_for
from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.net import dead_port
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


async def _broker_version(cluster: DevCluster) -> str:
    """The release the cluster's first node reports through its management API (3.10.x or 4.0.x)."""
    async with session_for(RabbitMQConfig()) as session:
        api = ManagementAPI(session, cluster.management_url(cluster.nodes[0]), timeout=10.0)
        version = (await api.overview()).version
    assert version is not None
    expected_line = "4.0." if cluster.release == "4.0" else "3."
    assert version.startswith(expected_line), version
    return version


def url(addr: tuple[str, int]) -> str:
    return f"amqp://guest:guest@{addr[0]}:{addr[1]}/"


async def counts(cluster: DevCluster) -> list[int]:
    by_node = await asyncio.to_thread(cluster.connection_counts)
    return [by_node.get(n.name, -1) for n in cluster.nodes]


@pytest.mark.asyncio
async def test_ten_thousand_messages_arrive_complete_and_in_order(broker: DevCluster) -> None:
    async with run_proxy(service_config(backends_for(broker))) as p:
        publisher = await aio_pika.connect(url(listen_addr(p)), timeout=30)
        consumer = await aio_pika.connect(url(listen_addr(p)), timeout=30)
        try:
            pch = await publisher.channel()  # publisher confirms on: every message is acknowledged by the broker
            queue_name = f"order-{os.getpid()}-{id(p)}"
            await pch.declare_queue(queue_name, auto_delete=False, arguments={"x-expires": 120_000})
            n = 10_000
            for start in range(0, n, 500):
                # Publishes issued in order on one channel are written in order; confirms are awaited per batch.
                await asyncio.gather(
                    *(
                        pch.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key=queue_name)
                        for i in range(start, start + 500)
                    )
                )
            cch = await consumer.channel()
            await cch.set_qos(prefetch_count=1000)
            queue = await cch.get_queue(queue_name)
            got: list[int] = []
            async with queue.iterator() as it:
                async for message in it:
                    await message.ack()
                    got.append(int(message.body))
                    if len(got) == n:
                        break
            assert got == list(range(n))
            await cch.queue_delete(queue_name)
        finally:
            await publisher.close()
            await consumer.close()


@pytest.mark.asyncio
async def test_weights_one_two_three_split_sixty_connections_ten_twenty_thirty(cluster: DevCluster) -> None:
    # Counted by the brokers themselves: another test's connections must be gone first.
    await wait_for(lambda: counts(cluster), what="cluster reachable")
    await wait_for(lambda: _all_zero(cluster), timeout=60, what="no leftover connections")
    async with run_proxy(service_config(backends_for(cluster, [1, 2, 3]))) as p:
        conns = []
        try:
            for _ in range(60):
                conns.append(await aio_pika.connect(url(listen_addr(p)), timeout=30))
            await wait_for(lambda: _counts_are(cluster, [10, 20, 30]), timeout=60, what="broker-side counts 10/20/30")
        finally:
            await asyncio.gather(*(c.close() for c in conns))


async def _all_zero(cluster: DevCluster) -> bool:
    return await counts(cluster) == [0, 0, 0]


async def _counts_are(cluster: DevCluster, expected: list[int]) -> bool:
    return await counts(cluster) == expected


@pytest.mark.asyncio
async def test_backend_with_nothing_listening_is_skipped(cluster: DevCluster) -> None:
    with dead_port() as dead:
        backends = [{"name": "nothing", "address": "127.0.0.1", "port": dead}, *backends_for(cluster)]
        async with run_proxy(service_config(backends, retries=2)) as p:
            conns = [await aio_pika.connect(url(listen_addr(p)), timeout=30) for _ in range(8)]
            try:
                for c in conns:
                    ch = await c.channel()
                    await ch.declare_queue("", exclusive=True)
                pool = p.services["amqp"].pool
                assert pool.by_name["nothing"].total == 0
                assert pool.by_name["nothing"].connect_errors >= 1
                assert sum(pool.by_name[f"rabbit{i}"].total for i in (1, 2, 3)) == 8
            finally:
                await asyncio.gather(*(c.close() for c in conns))


@pytest.mark.asyncio
async def test_64_mib_message_survives_byte_for_byte(cluster: DevCluster) -> None:
    body = os.urandom(64 * 1024 * 1024)
    digest = hashlib.sha256(body).hexdigest()
    async with run_proxy(service_config(backends_for(cluster))) as p:
        conn = await aio_pika.connect(url(listen_addr(p)), timeout=30)
        try:
            ch = await conn.channel()
            queue = await ch.declare_queue("", exclusive=True)
            await ch.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name, timeout=120)
            message = await wait_for(lambda: queue.get(fail=False), timeout=120, what="the big message")
            assert len(message.body) == len(body)
            assert hashlib.sha256(message.body).hexdigest() == digest
            await message.ack()
        finally:
            await conn.close()


@pytest.mark.asyncio
async def test_first_client_after_start_is_served_when_checks_are_on(broker: DevCluster) -> None:
    # Backends take clients only after a successful check; the proxy starts serving once the first checks have
    # answered, so a client that arrives the moment the proxy is up is not turned away.
    svc = service_config(backends_for(broker), health_check={"type": "amqp", "interval": 5.0, "timeout": 2.0})
    async with run_proxy(svc) as p:
        conn = await aio_pika.connect(url(listen_addr(p)), timeout=30)
        try:
            assert [b.status for b in p.services["amqp"].pool.backends] == ["up", "up", "up"]
            assert p.services["amqp"].ended == {}
            # The check speaks 0-9-1 to every release and names the version the broker announced.
            version = await _broker_version(broker)
            assert [b.health_detail for b in p.services["amqp"].pool.backends] == [f"RabbitMQ {version}"] * 3
        finally:
            await conn.close()

"""The stream protocol through a ``protocol = "stream"`` service, against the 4.0 nodes, with unmodified clients.

The nodes advertise stream addresses that nothing listens on (``stream_proxy_ports``, see conftest.py), and have no
idea the proxy exists. A stream client asks where a stream's leader and replicas are and connects there; the proxy
rewrites every advertised address (the ``Open`` response's, every ``MetadataResponse`` broker entry) to its own host
and that node's ``node_port``. So a client in its plain mode, without any load-balancer mode or retry loop, publishes
to the leader and consumes from a replica through the proxy only: had any address escaped the rewrite, the client
would have tried a port nobody listens on and failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from rbfly.streams import Offset, streams_client
from rstream import AMQPMessage, ConsumerOffsetSpecification, MessageContext, OffsetType, amqp_decoder
from rstream import Consumer as StreamConsumer
from rstream import Producer as StreamProducer

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import RabbitMQConfig
from rabbitproxy.control.management import session_for
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from tests.support.net import free_port
from tests.support.process import ProxyProcess
from tests.support.proxy import listen_addr, proxy_config, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

MESSAGES = 200
CREDENTIALS: dict[str, Any] = {"username": "guest", "password": "guest"}


def _stream_service(cluster: DevCluster, **extra: Any) -> dict[str, Any]:
    """A stream service over the cluster's stream listeners, a node_port each, with the stream check (the default)."""
    backends = [
        {"name": f"rabbit{n.index}", "address": "127.0.0.1", "port": n.stream_port, "node_port": free_port()}
        for n in cluster.nodes
    ]
    return service_config(
        backends, name="streams", protocol="stream", health_check={"interval": 1.0, "timeout": 5.0}, **extra
    )


async def _management(cluster: DevCluster, path: str, node: int = 0) -> Any:
    async with session_for(RabbitMQConfig()) as http, http.get(cluster.management_url(cluster.nodes[node]) + path) as r:
        return await r.json() if r.status == 200 else None


async def _leader(cluster: DevCluster, stream: str, node: int = 0) -> str:
    """The node name of the stream's leader, from the management API of ``cluster.nodes[node]``."""

    async def leader() -> str | None:
        body = await _management(cluster, f"api/queues/%2F/{quote(stream, safe='')}", node)
        found = body.get("leader") if isinstance(body, dict) else None
        return found if isinstance(found, str) else None

    name: str = await wait_for(leader, timeout=60, what=f"the leader of {stream}")
    return name


async def _learnt(proxy: Supervisor) -> None:
    backends = proxy.services["streams"].pool.backends

    async def all_learnt() -> bool:
        return all(b.stream_advertised is not None for b in backends)

    await wait_for(all_learnt, timeout=30, what="every node's advertised stream address")


async def _publish(host: str, port: int, stream: str, bodies: list[bytes], *, create: bool) -> None:
    async with StreamProducer(host, port, **CREDENTIALS) as producer:
        if create:
            await producer.create_stream(stream, exists_ok=True)
        for body in bodies:
            await producer.send_wait(stream, AMQPMessage(body=body), timeout=30)


@contextlib.asynccontextmanager
async def _consuming(host: str, port: int, stream: str, expected: int) -> AsyncIterator[list[bytes]]:
    """An rstream consumer from the first offset; inside, the messages so far (all ``expected`` on entry)."""
    received: list[bytes] = []
    done = asyncio.Event()

    async def on_message(message: AMQPMessage, _context: MessageContext) -> None:
        received.append(bytes(message.body))
        if len(received) == expected:
            done.set()

    consumer = StreamConsumer(host, port, **CREDENTIALS)
    await consumer.start()
    try:
        first = ConsumerOffsetSpecification(OffsetType.FIRST, None)
        await consumer.subscribe(stream, on_message, decoder=amqp_decoder, offset_specification=first)
        await asyncio.wait_for(done.wait(), 60)
        yield received
    finally:
        await consumer.close()


async def _delete(host: str, port: int, stream: str) -> None:
    async with StreamProducer(host, port, **CREDENTIALS) as producer:
        await producer.delete_stream(stream)


def _node_index(cluster: DevCluster, name: str) -> int:
    return next(n.index for n in cluster.nodes if n.name == name)


async def test_plain_rstream_publishes_to_the_leader_and_consumes_from_a_replica_through_the_proxy_only(
    cluster40: DevCluster,
) -> None:
    async with run_proxy(_stream_service(cluster40)) as proxy:
        await _learnt(proxy)
        host, port = listen_addr(proxy, "streams")
        service = proxy.services["streams"]
        stream = f"rp-stream-{uuid.uuid4().hex[:8]}"
        sent = [f"{stream} {i}".encode() for i in range(MESSAGES)]
        async with StreamProducer(host, port, **CREDENTIALS) as producer:
            await producer.create_stream(stream)
            for body in sent:
                await producer.send_wait(stream, AMQPMessage(body=body), timeout=30)
            leader = await _leader(cluster40, stream)
            # The producer went where the rewritten metadata sent it: the leader's own node_port.
            pinned = {c.pinned for c in service.connections if c.pinned is not None}
            assert f"rabbit{_node_index(cluster40, leader)}" in pinned
        async with _consuming(host, port, stream, MESSAGES) as received:
            assert received == sent
            # The consumer's connection, as the broker sees it: on a replica, not the leader, and named by the
            # client address the proxy added to its peer properties (the broker itself sees only the proxy).
            consumer_conns = [c for c in service.connections if c.pinned is not None]
            assert consumer_conns, "the consumer reached its node through a node_port"
            ours = {c.client_addr for c in consumer_conns}

            async def broker_view() -> list[dict[str, Any]] | None:
                rows = await _management(cluster40, "api/stream/connections")
                found = [r for r in rows or [] if r.get("client_properties", {}).get("client_address") in ours]
                return found or None

            rows = await wait_for(broker_view, timeout=30, what="the consumer's connection on the broker")
            assert {r["node"] for r in rows} - {leader}, f"a replica served the consumer ({rows}, leader {leader})"
        pinned_to = {c.backend.name for c in consumer_conns if c.backend is not None}
        assert f"rabbit{_node_index(cluster40, leader)}" not in pinned_to
        await _delete(host, port, stream)
        assert not {CloseReason.CONNECT_FAILED, CloseReason.NO_BACKEND} & set(service.ended)


async def test_rbfly_publishes_confirmed_and_consumes_in_order_through_the_proxy(cluster40: DevCluster) -> None:
    async with run_proxy(_stream_service(cluster40)) as proxy:
        await _learnt(proxy)
        host, port = listen_addr(proxy, "streams")
        client = streams_client(f"rabbitmq-stream://guest:guest@{host}:{port}")
        stream = f"rp-rbfly-{uuid.uuid4().hex[:8]}"
        sent = [f"{stream} {i}".encode() for i in range(MESSAGES)]
        try:
            # create_stream also asks the node for the stream's metadata: that answer comes rewritten.
            await client.create_stream(stream)
            async with client.publisher(stream) as publisher:
                for body in sent:
                    await publisher.send(body)  # returns once the broker confirmed it
            received: list[bytes] = []
            async for message in client.subscribe(stream, offset=Offset.FIRST, timeout=30):
                assert isinstance(message, bytes)
                received.append(message)
                if len(received) == MESSAGES:
                    break
            assert received == sent
            await client.delete_stream(stream)
        finally:
            await client.disconnect()
        users = {c.handshake.user for c in proxy.services["streams"].connections if c.handshake is not None}
        assert users <= {"guest"}


async def test_a_node_going_down_moves_stream_clients_to_the_others(cluster40: DevCluster) -> None:
    async with run_proxy(_stream_service(cluster40)) as proxy:
        await _learnt(proxy)
        host, port = listen_addr(proxy, "streams")
        stream = f"rp-stream-down-{uuid.uuid4().hex[:8]}"
        before = [f"before {i}".encode() for i in range(20)]
        await _publish(host, port, stream, before, create=True)
        leader = await _leader(cluster40, stream)
        victim = next(n for n in cluster40.nodes if n.name == leader)
        backend = proxy.services["streams"].pool.by_name[f"rabbit{victim.index}"]
        await asyncio.to_thread(cluster40.kill, victim)
        try:

            async def marked_down() -> bool:
                return not backend.healthy

            await wait_for(marked_down, timeout=30, what=f"{backend.name} marked down")
            survivor = 0 if victim.index != 1 else 1

            async def new_leader() -> bool:
                return await _leader(cluster40, stream, survivor) != leader

            await wait_for(new_leader, timeout=90, what="a new leader")
            taken = backend.total
            after = [f"after {i}".encode() for i in range(20)]
            await _publish(host, port, stream, after, create=False)
            async with _consuming(host, port, stream, len(before) + len(after)) as received:
                assert received == before + after
            # Nothing was sent to the dead node: the metadata named the others, and the pool skipped it.
            assert backend.total == taken
            await _delete(host, port, stream)
        finally:
            await asyncio.to_thread(cluster40.restart, victim)


async def test_stream_services_work_in_every_worker_and_the_parent_lists_their_connections(
    cluster40: DevCluster, tmp_path: Path
) -> None:
    admin_port = free_port()
    data = proxy_config(_stream_service(cluster40), admin={"listen": f"127.0.0.1:{admin_port}"})
    data["workers"] = 2
    proxy = ProxyProcess(data, tmp_path, log_level="info")
    await asyncio.to_thread(proxy.start)
    try:
        host, port = proxy.addr
        served_by: set[int] = set()
        # Several rounds, so both workers take some of the connections (the kernel spreads them by hash): each
        # worker rewrites metadata with what the parent's checks learnt, and serves the node_ports.
        for round_no in range(4):
            stream = f"rp-stream-w{round_no}-{uuid.uuid4().hex[:6]}"
            sent = [f"{stream} {i}".encode() for i in range(50)]
            await _publish(host, port, stream, sent, create=True)
            async with _consuming(host, port, stream, len(sent)) as received:
                assert received == sent
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://127.0.0.1:{admin_port}/api/connections?limit=1000") as resp:
                        listing: Mapping[str, Any] = await resp.json()
                rows = listing["connections"]
                assert rows and all(r["protocol"] == "stream" for r in rows)
                assert {r["user"] for r in rows} == {"guest"}
                served_by |= {r["worker"] for r in rows}
            await _delete(host, port, stream)
        assert served_by == {0, 1}
    finally:
        assert await asyncio.to_thread(proxy.stop) == 0

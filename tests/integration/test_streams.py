"""The RabbitMQ stream protocol (5552's role) through the proxy, against the 4.0 nodes, with rstream.

A stream client first asks any node where a stream's leader (for publishing) and replicas (for consuming) are, then
connects to the host and port the broker *advertises* for that node. Two ways to keep those connections on the
proxy, both documented in docs/operations.md ("Streams behind rabbitproxy"):

1. each node advertises a proxy port of its own (``stream.advertised_host``/``advertised_port``), and the proxy runs
   one service per node on it with that node as its only backend: every client lands on the node it asked for, at
   the first try, with no retries and no stream-aware code in the proxy;
2. RabbitMQ's "address resolver" approach: the client always connects to the one balanced address and compares the
   node's advertised address (sent in the connection's properties) with the one it wants, reconnecting until they
   match (rstream's ``load_balancer_mode``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import pytest
from rstream import AMQPMessage, ConsumerOffsetSpecification, MessageContext, OffsetType, amqp_decoder
from rstream import Consumer as StreamConsumer
from rstream import Producer as StreamProducer

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import RabbitMQConfig
from rabbitproxy.control.management import session_for
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

MESSAGES = 200


def _stream_backends(cluster: DevCluster) -> list[dict[str, object]]:
    return [{"name": f"rabbit{node.index}", "address": "127.0.0.1", "port": node.stream_port} for node in cluster.nodes]


def _stream_service(name: str, backends: list[dict[str, object]], listen: str | None = None) -> dict[str, Any]:
    # The AMQP check speaks 0-9-1, which a stream listener does not; a TCP connect is the check for 5552. The hello
    # deadline stays on: a stream client's first frame (peer properties) is longer than 8 bytes.
    return service_config(backends, name=name, listen=listen, health_check={"type": "tcp", "interval": 2.0})


async def _leader(cluster: DevCluster, stream: str) -> str:
    """The node name of the stream's leader, from the management API."""
    url = f"{cluster.management_url(cluster.nodes[0])}api/queues/%2F/{quote(stream, safe='')}"
    async with session_for(RabbitMQConfig()) as http:

        async def leader() -> str | None:
            async with http.get(url) as resp:
                if resp.status != 200:
                    return None
                body: Mapping[str, Any] = await resp.json()
            found = body.get("leader")
            return found if isinstance(found, str) else None

        name: str = await wait_for(leader, timeout=30, what=f"the leader of {stream}")
        return name


async def _produce_and_consume(host: str, port: int, stream: str, *, load_balancer_mode: bool) -> list[bytes]:
    """Create ``stream``, publish MESSAGES with confirms, read them back from the first offset."""
    sent = [f"{stream} {i}".encode() for i in range(MESSAGES)]
    common: dict[str, Any] = {"username": "guest", "password": "guest", "load_balancer_mode": load_balancer_mode}
    async with StreamProducer(host, port, **common) as producer:
        await producer.create_stream(stream, exists_ok=True)
        for body in sent:
            await producer.send_wait(stream, AMQPMessage(body=body), timeout=30)
    received: list[bytes] = []
    done = asyncio.Event()

    async def on_message(message: AMQPMessage, _context: MessageContext) -> None:
        received.append(bytes(message.body))
        if len(received) == MESSAGES:
            done.set()

    consumer = StreamConsumer(host, port, **common)
    await consumer.start()
    try:
        await consumer.subscribe(
            stream,
            on_message,
            decoder=amqp_decoder,
            offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None),
        )
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await consumer.close()
    async with StreamProducer(host, port, **common) as producer:
        await producer.delete_stream(stream)
    assert received == sent
    return received


def _totals(proxy: Supervisor, service: str) -> list[int]:
    return [b.total for b in proxy.services[service].pool.backends]


async def test_each_node_advertises_its_own_proxy_port_and_clients_land_on_it_first_time(
    cluster40: DevCluster, stream_proxy_ports: list[int]
) -> None:
    nodes = _stream_backends(cluster40)
    services = [
        _stream_service("streams", nodes),
        *(
            _stream_service(f"stream-{entry['name']}", [entry], listen=f"127.0.0.1:{port}")
            for entry, port in zip(nodes, stream_proxy_ports, strict=True)
        ),
    ]
    async with run_proxy(*services) as proxy:
        stream = f"rp-stream-{uuid.uuid4().hex[:8]}"
        await _produce_and_consume(*listen_addr(proxy, "streams"), stream, load_balancer_mode=False)
        # The clients asked the balanced entry where to go (locator connections) and went where they were told:
        # the producer to the leader's own port, the consumer to a node with a replica, all through the proxy.
        assert sum(_totals(proxy, "streams")) >= 2
        assert sum(sum(_totals(proxy, f"stream-rabbit{node.index}")) for node in cluster40.nodes) >= 2
        for svc in services:
            ended = proxy.services[svc["name"]].ended
            assert not {CloseReason.CONNECT_FAILED, CloseReason.HELLO_TIMEOUT, CloseReason.NO_BACKEND} & set(ended)

        # The leader's port saw the producer. A stream is placed on the node its creator is connected to, and the
        # creator reached whichever node the entry's round robin chose, so which node that is varies by run.
        again = f"rp-stream-{uuid.uuid4().hex[:8]}"
        async with StreamProducer(*listen_addr(proxy, "streams"), username="guest", password="guest") as producer:
            await producer.create_stream(again)
            leader = await _leader(cluster40, again)
            index = next(node.index for node in cluster40.nodes if node.name == leader)
            before = sum(_totals(proxy, f"stream-rabbit{index}"))
            await producer.send_wait(again, AMQPMessage(body=b"to the leader"), timeout=30)
            assert sum(_totals(proxy, f"stream-rabbit{index}")) == before + 1
            await producer.delete_stream(again)


async def test_address_resolver_clients_retry_through_one_balanced_port_until_they_reach_the_leader(
    cluster40: DevCluster,
) -> None:
    # Only the balanced entry: the per-node ports the nodes advertise are not served here, so a client that went
    # to them would fail; rstream's load_balancer_mode only compares them with what each connection reports.
    async with run_proxy(_stream_service("streams", _stream_backends(cluster40))) as proxy:
        stream = f"rp-stream-lb-{uuid.uuid4().hex[:8]}"
        await _produce_and_consume(*listen_addr(proxy, "streams"), stream, load_balancer_mode=True)
        # Every connection went through the one service: the six that this round trip opens when each lands where
        # it should (measured with the per-node ports of the test above), plus those the client closed because
        # they reached the wrong node (measured: 1 to 3 per round trip, 10 round trips).
        assert sum(_totals(proxy, "streams")) >= 6

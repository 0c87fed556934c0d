"""AMQP 1.0 on the AMQP port of RabbitMQ 4.0 nodes, through the proxy: RabbitMQ's own 1.0 client publishes and
consumes, and a bare 1.0 header (SASL or plain) gets exactly the broker's own answer, as if there were no proxy.

4.x serves 0-9-1 and 1.0 on the same listener; the proxy's hello deadline counts 8 header bytes whatever they say,
and its AMQP health check speaks 0-9-1 to the broker, so neither depends on what the clients speak.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from typing import Any

import aiohttp
import pytest
from rabbitmq_amqp_python_client import (
    AddressHelper,
    AMQPMessagingHandler,
    ClassicQueueSpecification,
    Converter,
    Disposition,
    Environment,
    Event,
    Message,
)

from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.protocols.amqp10 import Amqp10Reader
from tests.support.cluster import backends_for
from tests.support.net import free_port, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

AMQP10_SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP10_HEADER = b"AMQP\x00\x01\x00\x00"
MESSAGES = 50


class _Enough(Exception):  # noqa: N818 - how a proton handler leaves the container's run loop
    """Raised by the handler once every message arrived."""


class _Collect(AMQPMessagingHandler):
    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.bodies: list[bytes] = []

    def on_amqp_message(self, event: Event) -> None:
        self.delivery_context.accept(event)
        self.bodies.append(bytes(event.message.body))
        if len(self.bodies) == self.expected:
            raise _Enough


def _round_trip(uri: str, queue: str) -> list[bytes]:
    """Declare ``queue``, publish MESSAGES to it and consume them back, all over AMQP 1.0 (blocking: a thread)."""
    environment = Environment(uri=uri)
    connection = environment.connection()
    connection.dial()
    try:
        management = connection.management()
        management.declare_queue(ClassicQueueSpecification(name=queue, is_auto_delete=False))
        address = AddressHelper.queue_address(queue)
        publisher = connection.publisher(address)
        for i in range(MESSAGES):
            status = publisher.publish(Message(body=Converter.string_to_bytes(f"{queue} {i}")))
            assert status.remote_state == Disposition.ACCEPTED, status.remote_state
        publisher.close()
        handler = _Collect(MESSAGES)
        consumer = connection.consumer(address, message_handler=handler)
        try:
            consumer.run()
        except _Enough:
            pass
        consumer.close()
        management.delete_queue(queue)
        management.close()
        return handler.bodies
    finally:
        connection.close()
        environment.close()


async def test_rabbitmqs_amqp_1_0_client_publishes_and_consumes_through_the_proxy(cluster40: DevCluster) -> None:
    svc = service_config(
        backends_for(cluster40),
        client_hello_timeout=10.0,
        health_check={"type": "amqp", "interval": 5.0, "timeout": 5.0},
    )
    async with run_proxy(svc) as proxy:
        host, port = listen_addr(proxy)
        uri = f"amqp://guest:guest@{host}:{port}/"
        queues = [f"amqp10-{uuid.uuid4().hex[:8]}" for _ in range(3)]
        # Three clients at once: round robin puts one on each node, and each queue lives on the node it was
        # declared on, so all three nodes serve 1.0 through the proxy.
        got = await asyncio.gather(*(asyncio.to_thread(_round_trip, uri, q) for q in queues))
        for queue, bodies in zip(queues, got, strict=True):
            assert bodies == [f"{queue} {i}".encode() for i in range(MESSAGES)]
        pool = proxy.services["amqp"].pool
        assert [b.total for b in pool.backends] == [1, 1, 1]
        assert [b.status for b in pool.backends] == ["up", "up", "up"]
        # Nothing was cut short: no hello deadline, no protocol error.
        assert all(b.connect_errors == 0 for b in pool.backends)


async def _first_answer(host: str, port: int, header: bytes) -> bytes:
    """Send ``header`` and read the server's answer: its protocol header, then for a SASL header its first frame,
    for a plain one everything until it closes the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(header)
        answer = await asyncio.wait_for(reader.readexactly(8), 30)
        if header == AMQP10_SASL_HEADER:
            size_bytes = await asyncio.wait_for(reader.readexactly(4), 30)
            (size,) = struct.unpack(">I", size_bytes)
            return answer + size_bytes + await asyncio.wait_for(reader.readexactly(size - 4), 30)
        # A broker that requires SASL answers the plain header with its SASL header and closes (with a reset).
        rest = b""
        try:
            rest = await asyncio.wait_for(reader.read(), 30)
        except ConnectionResetError:
            pass
        return answer + rest
    finally:
        writer.close()


@pytest.mark.parametrize("header", [AMQP10_SASL_HEADER, AMQP10_HEADER], ids=["sasl-header", "plain-header"])
async def test_an_amqp_1_0_header_gets_the_brokers_own_answer(cluster40: DevCluster, header: bytes) -> None:
    node = cluster40.nodes[0]
    direct = await _first_answer("127.0.0.1", node.amqp_port, header)
    # The broker answers 1.0 in kind: its SASL header (4.0 requires SASL), then the sasl-mechanisms frame or,
    # to a client that did not offer SASL, nothing more.
    if header == AMQP10_HEADER:
        assert direct == AMQP10_SASL_HEADER
    else:
        assert direct.startswith(AMQP10_SASL_HEADER) and b"PLAIN" in direct
    svc = service_config(backends_for(cluster40)[:1], client_hello_timeout=10.0)
    async with run_proxy(svc) as proxy:
        through = await _first_answer(*listen_addr(proxy), header)
    assert through == direct


async def test_the_identity_reader_reads_what_rabbitmqs_1_0_client_really_sends(cluster40: DevCluster) -> None:
    # A relay that records the client's bytes on their way to the node: the reader gets the real thing, chunked as
    # the socket delivered it, rather than frames written by hand from the spec.
    node = cluster40.nodes[0]
    recorded: list[bytes] = []

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", node.amqp_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    recorded.append(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pump(client_r, broker_w, True), pump(broker_r, client_w, False))
        finally:
            broker_w.close()

    async with tcp_server(relay) as port:
        queue = f"amqp10-reader-{uuid.uuid4().hex[:8]}"
        got = await asyncio.to_thread(_round_trip, f"amqp://guest:guest@127.0.0.1:{port}/", queue)
        assert len(got) == MESSAGES
    reader = Amqp10Reader()
    for data in recorded:
        reader.client_data(data)
    hs = reader.handshake
    assert reader.gave_up is None and reader.done
    assert (hs.protocol, hs.mechanism, hs.user) == ("1.0", "PLAIN", "guest")
    # For the URI's default vhost this client sends the host it dialled, not "vhost:/": the broker then uses its
    # default vhost, which the proxy cannot know, so the reader leaves vhost unset and keeps the hostname apart.
    assert hs.vhost is None
    assert hs.extra == {"hostname": "127.0.0.1"}


async def test_an_amqp_1_0_client_shows_its_user_and_protocol_in_the_proxys_connection_list(
    cluster40: DevCluster,
) -> None:
    node = cluster40.nodes[0]
    user, secret = f"amqp10-app-{uuid.uuid4().hex[:6]}", "Pw-1-0-never-logged"
    await asyncio.to_thread(cluster40.rabbitmqctl, node, "add_user", user, secret)
    await asyncio.to_thread(cluster40.rabbitmqctl, node, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
    admin_port = free_port()
    svc = service_config(backends_for(cluster40)[:1], client_hello_timeout=10.0)
    try:
        async with run_proxy(svc, admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy:
            host, port = listen_addr(proxy)
            environment = Environment(uri=f"amqp://{user}:{secret}@{host}:{port}/")
            connection = await asyncio.to_thread(environment.connection)
            await asyncio.to_thread(connection.dial)
            try:
                async with aiohttp.ClientSession() as http:

                    async def listed() -> list[dict[str, Any]] | None:
                        async with http.get(f"http://127.0.0.1:{admin_port}/api/connections") as resp:
                            rows: list[dict[str, Any]] = (await resp.json())["connections"]
                        return [r for r in rows if r["user"] == user] or None

                    rows = await wait_for(listed, timeout=30, what="the 1.0 client in /api/connections")
                assert [r["protocol"] for r in rows] == ["AMQP 1.0"]
            finally:
                await asyncio.to_thread(connection.close)
                await asyncio.to_thread(environment.close)
    finally:
        await asyncio.to_thread(cluster40.rabbitmqctl, node, "delete_user", user)

"""PROXY protocol against a real RabbitMQ node started with ``proxy_protocol = true``.

This module runs its own one-node broker: the session cluster is plain, and a node that requires the header drops
every connection without one, which the other tests' clients would not send.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from pamqp import commands
from pamqp.header import ProtocolHeader

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.protocols.proxy_header import build_v1, build_v2
from tests.support.amqp import RawConsumer
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

CLIENT_IP = "127.0.0.2"


@pytest.fixture(scope="module")
def pp_node() -> Iterator[DevCluster]:
    c = DevCluster(1, management=False, extra_config=["proxy_protocol = true"])
    c.start()
    try:
        yield c
    finally:
        c.stop()


def backend(c: DevCluster) -> dict[str, object]:
    return {"name": "pp", "address": "127.0.0.1", "port": c.nodes[0].amqp_port}


async def amqp_open(host: str, port: int, local_ip: str, preamble: bytes = b"") -> RawConsumer:
    """An AMQP connection (pamqp framing) from a socket bound to ``local_ip``; aio-pika cannot pick its source."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(local_ip, 0))
    conn = RawConsumer(reader, writer)
    writer.write(preamble + ProtocolHeader().marshal())
    await asyncio.wait_for(conn.expect(commands.Connection.Start), 30)
    conn.send(commands.Connection.StartOk(response="\0guest\0guest"))
    tune = await asyncio.wait_for(conn.expect(commands.Connection.Tune), 30)
    assert isinstance(tune, commands.Connection.Tune)
    conn.send(commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
    conn.send(commands.Connection.Open(virtual_host="/"))
    await asyncio.wait_for(conn.expect(commands.Connection.OpenOk), 30)
    return conn


async def broker_peers(c: DevCluster) -> set[tuple[str, str]]:
    rows = await asyncio.to_thread(c.list_connections, "peer_host", "peer_port")
    return {(_host(r["peer_host"]), r["peer_port"]) for r in rows}


def _host(value: str) -> str:
    # rabbitmqctl's JSON gives an address as its list of octets ("[127, 0, 0, 2]").
    if value.startswith("["):
        return ".".join(str(octet) for octet in json.loads(value))
    return value


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_rabbitmq_sees_the_real_client_address(pp_node: DevCluster, version: str) -> None:
    svc = service_config(
        [backend(pp_node)],
        send_proxy_protocol=version,
        # The node drops a check without a header; this one sends a header with its own endpoints and passes.
        health_check={"type": "amqp", "interval": 0.2, "timeout": 5, "rise": 1, "fall": 1},
    )
    async with run_proxy(svc) as p:
        b = p.services["amqp"].pool.by_name["pp"]
        await wait_for(lambda: b.healthy, what="health check through proxy_protocol = true")
        conn = await amqp_open(*listen_addr(p), CLIENT_IP)
        local_port = conn.writer.get_extra_info("sockname")[1]
        try:
            peers = await wait_for(lambda: broker_peers(pp_node), what="connection listed by rabbitmqctl")
            assert (CLIENT_IP, str(local_port)) in peers
            # The proxy's own address (its backend leg) is nowhere in the broker's list.
            proxy_side = next(iter(p.services["amqp"].connections)).backend_local
            assert all(f"{h}:{port}" != proxy_side for h, port in peers)
        finally:
            conn.writer.close()
        assert b.healthy, b.health_detail


@pytest.mark.asyncio
async def test_a_check_without_the_header_is_refused_by_such_a_node(pp_node: DevCluster) -> None:
    svc = service_config([backend(pp_node)], health_check={"type": "amqp", "interval": 0.2, "timeout": 5})
    async with run_proxy(svc) as p:
        b = p.services["amqp"].pool.by_name["pp"]
        await wait_for(lambda: b.health_time is not None, what="first check")
        assert not b.healthy
        assert b.health_detail != "not checked yet"


@pytest.mark.asyncio
@pytest.mark.parametrize("upstream", [build_v1, build_v2])
async def test_an_upstream_header_is_accepted_and_passed_on(pp_node: DevCluster, upstream: object) -> None:
    # A load balancer in front of us says the client is 127.0.0.3 (guest may only log in from loopback).
    svc = service_config(
        [backend(pp_node)], accept_proxy_protocol=True, proxy_protocol_from=["127.0.0.0/8"], send_proxy_protocol="v2"
    )
    async with run_proxy(svc) as p:
        host, port = listen_addr(p)
        assert callable(upstream)
        conn = await amqp_open(host, port, CLIENT_IP, upstream(("127.0.0.3", 41234), (host, port)))
        try:
            peers = await wait_for(lambda: broker_peers(pp_node), what="connection listed")
            assert ("127.0.0.3", "41234") in peers
            assert next(iter(p.services["amqp"].connections)).client_addr == "127.0.0.3:41234"
        finally:
            conn.writer.close()


@pytest.mark.asyncio
async def test_a_client_without_a_header_is_closed_and_counted(pp_node: DevCluster) -> None:
    svc = service_config(
        [backend(pp_node)], accept_proxy_protocol=True, proxy_protocol_from=["127.0.0.0/8"], send_proxy_protocol="v1"
    )
    async with run_proxy(svc) as p:
        service = p.services["amqp"]
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        writer.write(ProtocolHeader().marshal())
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        await wait_for(lambda: service.ended[CloseReason.BAD_PROXY_HEADER] == 1, what="counted")
        assert service.pool.by_name["pp"].total == 0
        # And the service still serves a well-behaved client.
        conn = await amqp_open(*listen_addr(p), CLIENT_IP, build_v1((CLIENT_IP, 40001), listen_addr(p)))
        conn.writer.close()


@pytest.mark.asyncio
async def test_a_header_from_outside_proxy_protocol_from_is_refused(pp_node: DevCluster) -> None:
    # Only 10.0.0.0/8 may speak for its clients; our loopback client is not in it.
    svc = service_config(
        [backend(pp_node)], accept_proxy_protocol=True, proxy_protocol_from=["10.0.0.0/8"], send_proxy_protocol="v2"
    )
    async with run_proxy(svc) as p:
        service = p.services["amqp"]
        host, port = listen_addr(p)
        reader, writer = await asyncio.open_connection(host, port, local_addr=(CLIENT_IP, 0))
        writer.write(build_v1(("127.0.0.3", 41234), (host, port)) + ProtocolHeader().marshal())
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        await wait_for(lambda: service.ended[CloseReason.UNTRUSTED_PROXY_HEADER] == 1, what="counted")
        assert service.pool.by_name["pp"].total == 0
        # Without a header the same source is a plain client, and RabbitMQ sees its real address.
        conn = await amqp_open(host, port, CLIENT_IP)
        try:
            peers = await wait_for(lambda: broker_peers(pp_node), what="connection listed")
            assert CLIENT_IP in {h for h, _ in peers} and "127.0.0.3" not in {h for h, _ in peers}
        finally:
            conn.writer.close()

"""Draining and halting real RabbitMQ nodes through the admin API, with real AMQP clients connected."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import aiohttp
import pytest

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.metrics import metric
from tests.support.net import free_port
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


async def broker_lists(cluster: DevCluster, amqp_port: int, peer_ports: set[str]) -> bool:
    """Whether the node on ``amqp_port`` lists connections from every one of ``peer_ports`` (the proxy's legs)."""
    rows = await asyncio.to_thread(cluster.list_connections, "port", "peer_port")
    return peer_ports <= {row["peer_port"] for row in rows if row["port"] == str(amqp_port)}


@pytest.mark.asyncio
async def test_drain_a_node_for_maintenance_then_bring_it_back(broker: DevCluster) -> None:
    admin_port = free_port()
    url = f"http://127.0.0.1:{admin_port}"
    async with (
        run_proxy(service_config(backends_for(broker)), admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy,
        aiohttp.ClientSession() as http,
    ):
        host, port = listen_addr(proxy)
        amqp_url = f"amqp://guest:guest@{host}:{port}/"
        pool = proxy.services["amqp"].pool
        # Equal weights, smooth round robin: two clients on each node.
        clients = [await aio_pika.connect(amqp_url) for _ in range(6)]
        on_rabbit1 = [c for c, b in zip(clients, [1, 2, 3] * 2, strict=True) if b == 1]
        assert [b.active for b in pool.backends] == [2, 2, 2]

        async def patch(body: dict[str, Any]) -> dict[str, Any]:
            async with http.patch(f"{url}/api/services/amqp/backends/rabbit1", json=body) as resp:
                assert resp.status == 200, await resp.text()
                result: dict[str, Any] = await resp.json()
                return result

        # 1. Drain: no new clients for rabbit1, and the two it has stay connected.
        drained = await patch({"state": "drain"})
        assert (drained["status"], drained["connections"]["active"]) == ("drain", 2)
        newcomers = [await aio_pika.connect(amqp_url) for _ in range(4)]
        assert [b.active for b in pool.backends] == [2, 4, 4]
        # aio-pika's is_closed only turns True on a local close(); `connected` is cleared when the server side goes.
        assert all(c.connected.is_set() for c in clients)
        # The broker itself still lists both: matched by the proxy's backend-side ports, since its counts lag and
        # may still include another test's connections.
        legs = {
            c.backend_local.rsplit(":", 1)[1]
            for c in proxy.services["amqp"].connections
            if c.backend is pool.by_name["rabbit1"]
        }
        assert len(legs) == 2
        await wait_for(
            lambda: broker_lists(broker, broker.nodes[0].amqp_port, legs), timeout=30, what="rabbit1 listing both"
        )

        # 2. Watch it empty: the clients on rabbit1 leave by themselves.
        for c in on_rabbit1:
            await c.close()
        await wait_for(lambda: pool.by_name["rabbit1"].active == 0, what="rabbit1 empty")
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
        assert metric(text, "rabbitproxy_backend_active_connections", backend="rabbit1", service="amqp") == 0
        assert metric(text, "rabbitproxy_backend_status", backend="rabbit1", service="amqp", status="drain") == 1
        assert metric(text, "rabbitproxy_backend_active_connections", backend="rabbit2", service="amqp") == 4

        # 3. Back in service: new clients reach rabbit1 again.
        assert (await patch({"state": "ready"}))["status"] == "up"
        back = await aio_pika.connect(amqp_url)
        assert pool.by_name["rabbit1"].active == 1
        for c in [*clients, *newcomers, back]:
            await c.close()


@pytest.mark.asyncio
async def test_maint_disconnects_the_nodes_clients_and_they_reconnect_elsewhere(cluster: DevCluster) -> None:
    admin_port = free_port()
    url = f"http://127.0.0.1:{admin_port}"
    async with (
        run_proxy(service_config(backends_for(cluster)), admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy,
        aiohttp.ClientSession() as http,
    ):
        host, port = listen_addr(proxy)
        amqp_url = f"amqp://guest:guest@{host}:{port}/"
        service = proxy.services["amqp"]
        clients = [await aio_pika.connect(amqp_url) for _ in range(3)]
        victim = clients[1]  # the second client went to rabbit2
        async with http.patch(f"{url}/api/services/amqp/backends/rabbit2", json={"state": "maint"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["closed_connections"] == 1
        await wait_for(lambda: not victim.connected.is_set(), what="rabbit2's client disconnected")
        assert clients[0].connected.is_set() and clients[2].connected.is_set()
        await wait_for(lambda: service.ended[CloseReason.BACKEND_MAINT] == 1, what="the close counted")
        # A reconnecting client lands on a node that is in service, and the halted node stays empty.
        again = await aio_pika.connect(amqp_url)
        channel = await again.channel()
        await channel.declare_queue(exclusive=True)
        assert service.pool.by_name["rabbit2"].active == 0
        for c in [*clients, again]:
            await c.close()
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
        assert metric(
            text, "rabbitproxy_service_connections_ended_total", reason="backend maint", service="amqp"
        ) == 1
        assert metric(text, "rabbitproxy_backend_status", backend="rabbit2", service="amqp", status="maint") == 1

"""Who is connected, against the real cluster: aio-pika clients in GET /api/connections and `rabbitproxy connections`,
and closing one of them through the broker (320 with our reason) or, without [services.rabbitmq], by TCP.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.protocols.amqp_handshake import Handshake
from tests.support.amqp import client_dead
from tests.support.cluster import backends_for
from tests.support.net import free_port
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

TOKEN = "connections-live-token"


def _admin() -> tuple[dict[str, Any], str]:
    port = free_port()
    return {"listen": f"127.0.0.1:{port}", "token": TOKEN}, f"http://127.0.0.1:{port}"


def _with_management(cluster: DevCluster) -> list[dict[str, object]]:
    backends = backends_for(cluster)
    for entry, node in zip(backends, cluster.nodes, strict=True):
        entry["management_port"] = node.management_port
    return backends


async def _client(
    proxy: Supervisor, name: str
) -> tuple[aio_pika.abc.AbstractConnection, int, asyncio.Future[BaseException | None]]:
    """An aio-pika client named ``name`` through the proxy: (client, the proxy's id for it, its close)."""
    service = proxy.services["amqp"]
    before = {c.id for c in service.connections}
    host, port = listen_addr(proxy)
    conn = await aio_pika.connect(
        f"amqp://guest:guest@{host}:{port}/", timeout=30, client_properties={"connection_name": name}
    )
    closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    conn.close_callbacks.add(lambda _c, exc=None: closed.done() or closed.set_result(exc))
    [leg] = [c for c in service.connections if c.id not in before]
    if leg.handshake is None:
        # Stand-in until the handshake reader (issue 14 part A) is on the data path: the identity it records for
        # this client. Once it is there the reader has filled this in from the client's own handshake.
        leg.handshake = Handshake(connection_name=name, user="guest", vhost="/", product="aio-pika")
    return conn, leg.id, closed


async def _cli(url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rabbitproxy",
        "connections",
        *args,
        "--admin",
        url,
        "--token",
        TOKEN,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_named_clients_are_listed_filtered_and_printed_by_the_cli(cluster: DevCluster) -> None:
    admin, url = _admin()
    tag = f"conn-list-{free_port()}"
    async with (
        run_proxy(service_config(backends_for(cluster)), admin=admin) as proxy,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
    ):
        orders, orders_id, _ = await _client(proxy, f"{tag}-orders")
        billing, billing_id, _ = await _client(proxy, f"{tag}-billing")
        try:
            channel = await orders.channel()
            queue = await channel.declare_queue(f"{tag}-q", auto_delete=True)
            await channel.default_exchange.publish(aio_pika.Message(b"x" * 5000), routing_key=queue.name)
            pool = proxy.services["amqp"].pool
            node_ports = {b.name: b.port for b in pool.backends}

            async with http.get(f"{url}/api/connections") as resp:
                assert resp.status == 200
                data = await resp.json()
            assert data["total"] == 2
            first, second = data["connections"]
            # The oldest first; ids are the proxy's own.
            assert (first["id"], second["id"]) == (orders_id, billing_id)
            assert (first["connection_name"], second["connection_name"]) == (f"{tag}-orders", f"{tag}-billing")
            for entry in (first, second):
                assert entry["service"] == "amqp"
                assert entry["backend_address"] == f"127.0.0.1:{node_ports[entry['backend']]}"
                assert entry["client"].startswith("127.0.0.1:")
                # The handshake went both ways through the proxy, and each is counted on its connection.
                assert entry["bytes_in"] > 0 and entry["bytes_out"] > 0
                assert entry["age"] >= 0
            # The published message went client to broker on the orders connection only.
            assert first["bytes_in"] > 5000 > second["bytes_in"]
            async with http.get(f"{url}/api/connections", params={"sort": "bytes_in"}) as resp:
                assert [c["id"] for c in (await resp.json())["connections"]] == [orders_id, billing_id]
            async with http.get(f"{url}/api/connections", params={"name": "BILLING"}) as resp:
                assert [c["id"] for c in (await resp.json())["connections"]] == [billing_id]
            async with http.get(f"{url}/api/connections", params={"backend": first["backend"]}) as resp:
                assert orders_id in [c["id"] for c in (await resp.json())["connections"]]

            # The CLI, as an operator runs it: a table naming both clients, and JSON for scripts.
            code, out, err = await _cli(url)
            assert code == 0, err
            assert f"{tag}-orders" in out and f"{tag}-billing" in out
            assert "2 of 2 connection(s), by age desc" in out
            code, out, err = await _cli(url, "--name", "orders", "--json")
            assert code == 0, err
            listed = json.loads(out)
            assert [c["id"] for c in listed["connections"]] == [orders_id]
            code, _, err = await _cli(url, "--sort", "size")
            assert code == 1 and "sort: must be one of" in err
        finally:
            await orders.close()
            await billing.close()


async def test_close_through_the_broker_sends_320_with_our_reason(cluster: DevCluster) -> None:
    admin, url = _admin()
    tag = f"conn-close-{free_port()}"
    async with run_proxy(
        service_config(_with_management(cluster), rabbitmq={"timeout": 10.0}), admin=admin
    ) as proxy:
        victim, victim_id, closed = await _client(proxy, f"{tag}-victim")
        bystander, _, _ = await _client(proxy, f"{tag}-bystander")
        try:
            # Through the CLI, as an operator would; the broker learns of a young connection a few seconds late,
            # which the proxy waits out.
            code, out, err = await _cli(url, "close", str(victim_id), "--reason", "rabbitproxy test: moving you")
            assert code == 0, err
            assert f"connection {victim_id} of amqp closed through the broker" in out
            exc = await asyncio.wait_for(closed, 60)
            assert isinstance(exc, aiormq.exceptions.ConnectionClosed), exc
            assert exc.args[0] == 320
            assert "rabbitproxy test: moving you" in str(exc)
            service = proxy.services["amqp"]
            # The broker hung up, but the proxy's own reason is why it ended.
            await wait_for(lambda: service.ended[CloseReason.OPERATOR_CLOSE] == 1, timeout=60, what="operator close")
            assert not client_dead(bystander)
            assert [c.id for c in service.connections] != [victim_id]
        finally:
            await bystander.close()
            if not client_dead(victim):
                await victim.close()


async def test_close_without_rabbitmq_is_a_tcp_close(cluster: DevCluster) -> None:
    admin, url = _admin()
    async with (
        run_proxy(service_config(backends_for(cluster)), admin=admin) as proxy,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
    ):
        victim, victim_id, closed = await _client(proxy, "tcp-victim")
        try:
            async with http.delete(f"{url}/api/connections/{victim_id}", params={"reason": "no broker"}) as resp:
                assert resp.status == 200
                result = await resp.json()
            assert (result["via"], result["detail"]) == ("tcp", "no [services.rabbitmq]")
            exc = await asyncio.wait_for(closed, 60)
            # The connection just ended under the client: no connection.close from a broker, so no 320.
            assert not (isinstance(exc, aiormq.exceptions.ConnectionClosed) and exc.args[0] == 320), exc
            await wait_for(lambda: client_dead(victim), timeout=30, what="the client seeing its connection end")
            service = proxy.services["amqp"]
            await wait_for(lambda: service.ended[CloseReason.OPERATOR_CLOSE] == 1, timeout=30, what="operator close")
        finally:
            if not client_dead(victim):
                await victim.close()

"""The node monitor against the real cluster: a memory alarm and rabbitmq-upgrade drain/revive, seen through the
admin API and /metrics, with real clients connecting through the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiohttp
import pytest

from rabbitproxy.config import RabbitMQConfig
from rabbitproxy.control.management import ManagementAPI, ManagementUnavailable, session_for
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from tests.support.amqp import client_dead, close_all
from tests.support.cluster import backends_for
from tests.support.net import free_port
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

# Short enough that a test sees changes quickly, long enough that three monitors and three health checks do not
# crowd a loaded 2-core machine.
INTERVAL = 1.0
_names = itertools.count(1)


@asynccontextmanager
async def _proxy(cluster: DevCluster, **extra: Any) -> AsyncIterator[tuple[Supervisor, str, aiohttp.ClientSession]]:
    backends = backends_for(cluster)
    for entry, node in zip(backends, cluster.nodes, strict=True):
        entry["management_port"] = node.management_port
    svc = service_config(
        backends,
        health_check={"type": "amqp", "interval": INTERVAL, "timeout": 5.0, "rise": 1, "fall": 2},
        rabbitmq={"interval": INTERVAL, "timeout": 5.0, **extra.pop("rabbitmq", {})},
        **extra,
    )
    admin_port = free_port()
    async with (
        run_proxy(svc, admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy,
        aiohttp.ClientSession(f"http://127.0.0.1:{admin_port}") as http,
    ):
        yield proxy, svc["name"], http


async def _backends(http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    async with http.get("/api/services/amqp") as resp:
        assert resp.status == 200
        body = await resp.json()
    return {b["name"]: b for b in body["backends"]}


async def _metrics(http: aiohttp.ClientSession) -> str:
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def _all_known(http: aiohttp.ClientSession, cluster: DevCluster) -> None:
    async def known() -> bool:
        view = await _backends(http)
        return all(
            view[f"rabbit{i + 1}"]["rabbitmq"]["node"] == node.name
            and view[f"rabbit{i + 1}"]["rabbitmq"]["management"]["status"] == "ok"
            and view[f"rabbit{i + 1}"]["status"] == "up"
            for i, node in enumerate(cluster.nodes)
        )

    await wait_for(known, timeout=60, interval=0.2, what="every node named by its management API and up")


async def _connect(proxy: Supervisor) -> tuple[aio_pika.abc.AbstractConnection, str]:
    pool = proxy.services["amqp"].pool
    before = {b.name: b.total for b in pool.backends}
    host, port = listen_addr(proxy)
    conn = await aio_pika.connect(
        f"amqp://guest:guest@{host}:{port}/",
        timeout=15,
        client_properties={"connection_name": f"rabbitproxy-monitor-{next(_names)}"},
    )
    moved = [b.name for b in pool.backends if b.total != before[b.name]]
    assert len(moved) == 1, (moved, before)
    return conn, moved[0]


@pytest.mark.asyncio
async def test_a_memory_alarm_takes_new_connections_elsewhere_and_keeps_existing_ones(broker: DevCluster) -> None:
    target_node = broker.nodes[1]
    conns: list[aio_pika.abc.AbstractConnection] = []
    async with _proxy(broker, rabbitmq={"alarm_weight": 0}) as (proxy, _, http):
        await _all_known(http, broker)
        # Round robin over three equal weights: three connections, one on each node.
        first = [await _connect(proxy) for _ in range(3)]
        conns += [c for c, _ in first]
        client_on_target = next(c for c, name in first if name == "rabbit2")
        on_target = proxy.services["amqp"].pool.by_name["rabbit2"]
        assert on_target.active == 1
        existing = next(iter(on_target.connections))
        try:
            await asyncio.to_thread(broker.rabbitmqctl, target_node, "set_vm_memory_high_watermark", "0.0000001")

            async def alarmed() -> bool:
                r = (await _backends(http))["rabbit2"]
                return r["rabbitmq"]["alarms"] == ["memory"] and r["effective_weight"] == 0

            # The local-alarms check sees the alarm at once (the node statistics lag ~10 s): two intervals, plus
            # a margin for a loaded machine that is still shorter than that lag.
            await wait_for(alarmed, timeout=2 * INTERVAL + 6, interval=0.1, what="rabbit2's memory alarm in the API")
            view = await _backends(http)
            # Reduced, never down.
            assert view["rabbit2"]["status"] == "drain"
            assert view["rabbit2"]["health"]["status"] == "up"
            assert view["rabbit1"]["rabbitmq"]["alarms"] == [] and view["rabbit1"]["status"] == "up"
            metrics = await _metrics(http)
            assert 'rabbitproxy_backend_rabbitmq_alarm{backend="rabbit2",kind="memory",service="amqp"} 1.0' in metrics
            assert 'rabbitproxy_backend_rabbitmq_alarm{backend="rabbit1",kind="memory",service="amqp"} 0.0' in metrics
            for _ in range(6):
                conn, went_to = await _connect(proxy)
                conns.append(conn)
                assert went_to != "rabbit2"
            # The connection that was there stays open and usable (publishers block under an alarm; channels open).
            assert existing in on_target.connections
            assert not client_dead(client_on_target)
            channel = await client_on_target.channel()
            await channel.close()
        finally:
            await asyncio.to_thread(broker.rabbitmqctl, target_node, "set_vm_memory_high_watermark", "0.4")

        async def cleared() -> bool:
            r = (await _backends(http))["rabbit2"]
            return r["rabbitmq"]["alarms"] == [] and r["status"] == "up" and r["effective_weight"] > 0

        await wait_for(cleared, timeout=30, interval=0.2, what="rabbit2's alarm cleared")
        after = [await _connect(proxy) for _ in range(3)]
        conns += [c for c, _ in after]
        assert "rabbit2" in {name for _, name in after}
        await close_all(conns)


@pytest.mark.asyncio
async def test_drain_is_maintenance_and_revive_comes_back_through_slow_start(broker: DevCluster) -> None:
    target_node = broker.nodes[2]
    conns: list[aio_pika.abc.AbstractConnection] = []
    async with _proxy(broker, slow_start=20.0) as (proxy, _, http):
        await _all_known(http, broker)
        drained = False
        try:
            await asyncio.to_thread(broker.drain, target_node)
            drained = True

            async def in_maintenance() -> bool:
                r = (await _backends(http))["rabbit3"]
                return r["status"] == "maintenance" and r["rabbitmq"]["maintenance"] is True

            await wait_for(in_maintenance, timeout=30, interval=0.2, what="rabbit3 shown in maintenance")
            view = await _backends(http)
            assert "refused" in view["rabbit3"]["rabbitmq"]["management"]["detail"]
            assert view["rabbit3"]["rabbitmq"]["management"]["status"] == "unreachable"
            metrics = await _metrics(http)
            assert 'rabbitproxy_backend_rabbitmq_maintenance{backend="rabbit3",service="amqp"} 1.0' in metrics
            assert 'rabbitproxy_backend_status{backend="rabbit3",service="amqp",status="maintenance"} 1.0' in metrics
            assert 'rabbitproxy_backend_rabbitmq_management_up{backend="rabbit3",service="amqp"} 0.0' in metrics
            for _ in range(6):
                conn, went_to = await _connect(proxy)
                conns.append(conn)
                assert went_to != "rabbit3"
            # Still maintenance once the AMQP health check fails (its listener is closed), as on 3.10 it must
            # before the monitor may infer maintenance at all.
            await wait_for(
                lambda: proxy.services["amqp"].pool.by_name["rabbit3"].healthy is False,
                timeout=30,
                what="rabbit3's AMQP check failing",
            )
            assert (await _backends(http))["rabbit3"]["status"] == "maintenance"
        finally:
            if drained:
                await asyncio.to_thread(broker.revive, target_node)

        # Back: the weight starts low and rises under slow start.
        seen: list[int] = []

        async def ramping_up() -> bool:
            r = (await _backends(http))["rabbit3"]
            if r["status"] == "up":
                seen.append(r["effective_weight"])
            return len(seen) >= 2 and seen[-1] > seen[0]

        await wait_for(ramping_up, timeout=60, interval=0.5, what="rabbit3 up again with a rising weight")
        assert seen[0] < 100
        assert seen == sorted(seen)
        view = (await _backends(http))["rabbit3"]
        assert view["rabbitmq"]["maintenance"] is False
        assert view["slow_start"] is not None and view["slow_start"]["seconds"] == 20.0
        await close_all(conns)


@pytest.mark.asyncio
async def test_the_monitoring_tag_without_any_permission_is_enough(cluster: DevCluster) -> None:
    # The least privilege documented in docs/configuration.md: "monitoring" and no vhost permissions read everything
    # the node monitor asks; "management" alone does not name the node in /api/overview nor show /api/nodes.
    node = cluster.nodes[0]
    users = {f"rp-monitor-{free_port()}": "monitoring", f"rp-mgmt-{free_port()}": "management"}
    try:
        for user, tag in users.items():
            await asyncio.to_thread(cluster.rabbitmqctl, node, "add_user", user, "secret")
            await asyncio.to_thread(cluster.rabbitmqctl, node, "set_user_tags", user, tag)
        monitoring, management = users
        async with session_for(RabbitMQConfig(username=monitoring, password="secret")) as session:
            api = ManagementAPI(session, cluster.management_url(node), timeout=10.0)
            assert (await api.overview()).node == node.name
            assert (await api.node(node.name)).running
            assert await api.local_alarms() == ()
            assert await api.ready_to_serve() is None  # 3.10.8 has neither readiness endpoint
        async with session_for(RabbitMQConfig(username=management, password="secret")) as session:
            api = ManagementAPI(session, cluster.management_url(node), timeout=10.0)
            with pytest.raises(ManagementUnavailable, match="no 'node'"):
                await api.overview()
            with pytest.raises(ManagementUnavailable, match="HTTP 401"):
                await api.node(node.name)
    finally:
        for user in users:
            await asyncio.to_thread(cluster.rabbitmqctl, node, "delete_user", user)


@contextlib.contextmanager
def rejected(port: int) -> Iterator[None]:
    """A firewall rule on this host that answers every TCP packet to ``port`` with a reset; removed on the way out."""
    table = f"rabbitproxy_test_reject_{os.getpid()}_{port}"
    rules = (
        f"table inet {table} {{\n chain input {{\n type filter hook input priority -10; policy accept;\n"
        f" tcp dport {port} reject with tcp reset\n }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


@pytest.mark.asyncio
async def test_a_firewalled_management_port_on_a_serving_3_10_node_is_not_maintenance(cluster: DevCluster) -> None:
    # Issue 25, item 13: on 3.10 a refused management port while the peers report the node running was taken for
    # rabbitmq-upgrade drain, so a firewall rule on 15672 (or a disabled plugin) quietly took a healthy node out.
    # Maintenance now needs the health check's agreement; here AMQP is fine, so the node keeps getting clients.
    target = cluster.nodes[1]
    conns: list[aio_pika.abc.AbstractConnection] = []
    async with _proxy(cluster) as (proxy, _, http):
        await _all_known(http, cluster)
        with rejected(target.management_port):

            async def refused() -> float | None:
                r = (await _backends(http))["rabbit2"]["rabbitmq"]
                management = r["management"]
                if management["status"] == "unreachable" and "refused" in (management["detail"] or ""):
                    return float(r["poll_time"])
                return None

            first = await wait_for(refused, timeout=30, interval=0.2, what="rabbit2's management port refused")

            async def polled_again() -> bool:
                r = (await _backends(http))["rabbit2"]["rabbitmq"]
                return float(r["poll_time"]) >= first + 2 * INTERVAL

            # Two more polls and as many health checks: time for any wrong inference to show.
            await wait_for(polled_again, timeout=30, interval=0.2, what="two more polls of rabbit2")
            view = (await _backends(http))["rabbit2"]
            assert view["rabbitmq"]["maintenance"] is False, view["rabbitmq"]["maintenance_detail"]
            assert view["status"] == "up" and view["rabbitmq"]["management"]["status"] == "unreachable"
            # Round robin over three equal weights: six clients, two of them on the node behind the firewall.
            for _ in range(6):
                conns.append((await _connect(proxy))[0])
            assert proxy.services["amqp"].pool.by_name["rabbit2"].active == 2
        await close_all(conns)

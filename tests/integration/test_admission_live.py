"""Admission control in real processes: ``workers = 2`` sharing connect_rate, and a storm of AMQP clients against
the RabbitMQ cluster that the brokers see paced.

Every connection opened here is an AMQP connection that completes its handshake (the idle bench's client: header,
start-ok, tune-ok, open), so "reached open-ok" means the broker authenticated it and opened its vhost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import placement
from bench.idle_bench import IdleClient, plain_response
from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.metrics import metric
from tests.support.net import free_port, tcp_server
from tests.support.pacing import densest
from tests.support.process import ProxyProcess, admin_get, running_process
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_factories=["asyncio"])]


def with_workers(service: dict[str, Any], workers: int = 2) -> tuple[dict[str, Any], str]:
    port = free_port()
    data = proxy_config(service, admin={"listen": f"127.0.0.1:{port}"})
    data["workers"] = workers
    return data, f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def greeting_backend() -> AsyncIterator[int]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x")
        await writer.drain()
        await reader.read()
        writer.close()

    async with tcp_server(handler) as port:
        yield port


async def test_workers_share_the_rate_and_the_parent_shows_their_queues(tmp_path: Path) -> None:
    async with greeting_backend() as port:
        service = service_config(
            [{"name": "b1", "address": "127.0.0.1", "port": port}], protocol="tcp", connect_rate=0.2, connect_burst=2
        )
        data, admin = with_workers(service)
        async with running_process(ProxyProcess(data, tmp_path)) as proxy:
            conns = [await asyncio.open_connection(*proxy.addr) for _ in range(8)]
            # Each worker has a tenth of a token a second and one token at the start: at most one client per
            # worker is let through now; the parent's API and metrics add up the rest, held in the workers.
            greeted = 0
            for reader, _ in conns:
                with contextlib.suppress(TimeoutError):
                    greeted += len(await asyncio.wait_for(reader.readexactly(1), 1.0))
            assert 1 <= greeted <= 2

            async def waiting(expect: int) -> bool:
                view = (await admin_get(f"{admin}/api/services/amqp"))["admission"]
                return view is not None and view["waiting"] == expect

            held = 8 - greeted
            await wait_for(lambda: waiting(held), timeout=30, what="the workers' held clients in the parent's API")
            view = (await admin_get(f"{admin}/api/services/amqp"))["admission"]
            assert view["connect_rate"] == 0.2 and view["connect_burst"] == 2 and view["oldest_wait"] > 0
            text = await admin_get(f"{admin}/metrics")
            assert metric(text, "rabbitproxy_service_admission_waiting", service="amqp") == held
            assert metric(text, "rabbitproxy_service_connect_rate", service="amqp") == 0.2
            for _, writer in conns:
                writer.close()
            await wait_for(lambda: waiting(0), timeout=30, what="the leavers forgotten")


STORM = 1200
RATE = 150.0


async def open_amqp(addr: tuple[str, int], lost: list[int]) -> IdleClient:
    loop = asyncio.get_running_loop()
    _t, client = await loop.create_connection(lambda: IdleClient(30, plain_response("guest", "guest"), lost), *addr)
    await asyncio.wait_for(client.opened, 120)
    return client


@pytest.fixture
def storm_cluster() -> Iterator[DevCluster]:
    """A cluster of its own: 1,200 connections at once once made a 3.10.8 node's management agent crash (a
    duplicate distribution port in rabbit_net:dist_info), which left the session cluster's connection listings
    without that node for every later test. This test reads the brokers with rabbitmqctl, which that spares."""
    with DevCluster(3, management=False) as cluster:
        yield cluster


async def test_a_storm_of_amqp_clients_all_open_and_the_brokers_see_them_paced(
    storm_cluster: DevCluster, tmp_path: Path
) -> None:
    cluster = storm_cluster
    service = service_config(backends_for(cluster), connect_rate=RATE)
    data, admin = with_workers(service)
    async with running_process(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
        lost = [0]
        # All at once, as after a node failure or a proxy restart: the proxy accepts every one and holds the excess.
        clients = await asyncio.gather(*(open_amqp(proxy.addr, lost) for _ in range(STORM)))
        try:
            assert len(clients) == STORM and lost == [0]
            view = (await admin_get(f"{admin}/api/services/amqp"))["admission"]
            # Well over half of them waited for a token (without admission control none would have).
            assert view["held_total"] >= STORM // 2, view
            rows = await asyncio.to_thread(cluster.list_connections, "connected_at", "client_properties")
            ours = [int(r["connected_at"]) / 1000 for r in rows if f"{placement.PREFIX}-idle" in r["client_properties"]]
            assert len(ours) == STORM
            # What the brokers saw: at most the rate plus both workers' bursts in any second, with half a second's
            # margin for when a connection is stamped; unpaced, the first second alone would take hundreds.
            bursts = 2 * 8
            assert densest(ours, 1.0) <= RATE * 1.5 + bursts, densest(ours, 1.0)
            assert max(ours) - min(ours) >= (STORM - bursts) / RATE - 1.0
        finally:
            for c in clients:
                c.close()
            await wait_for(
                lambda: all(c.transport is None or c.transport.is_closing() for c in clients),
                timeout=60,
                what="the clients closed",
            )

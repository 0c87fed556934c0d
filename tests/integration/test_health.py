"""Health checks against the real RabbitMQ nodes of the session cluster: pause, kill, non-AMQP ports, HTTP checks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aiohttp import web

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from tests.support.amqp import client_dead, close_all, connect_through
from tests.support.cluster import backends_for
from tests.support.net import dead_port, echo_handler, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

# Checks go to three Erlang VMs on a busy two-core machine: a timeout under a second or two fails healthy nodes.
INTERVAL = 2.0
TIMEOUT = 2.0
RISE = 2
FALL = 2
# What the issue promises, plus room for a busy two-core machine to schedule the check task late.
DOWN_WITHIN = FALL * INTERVAL + TIMEOUT
SCHEDULING_SLACK = 2.0


def _check(**extra: Any) -> dict[str, Any]:
    return {"type": "amqp", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL, **extra}


async def _all_up(proxy: Supervisor, service: str = "amqp") -> None:
    pool = proxy.services[service].pool
    await wait_for(lambda: all(b.healthy for b in pool.backends), timeout=30, what="every backend up")


async def _marked_down(backend: Backend) -> float:
    """Seconds until ``backend`` is marked down, failing after the promised bound plus slack."""
    began = time.monotonic()
    await wait_for(
        lambda: not backend.healthy, timeout=DOWN_WITHIN + SCHEDULING_SLACK, interval=0.02, what=f"{backend.name} down"
    )
    return time.monotonic() - began


@pytest.mark.asyncio
async def test_paused_node_is_marked_down_its_clients_closed_and_it_comes_back(cluster: DevCluster) -> None:
    async with run_proxy(service_config(backends_for(cluster), health_check=_check(on_marked_down="close"))) as p:
        await _all_up(p)
        service = p.services["amqp"]
        pool = service.pool
        conns = [await connect_through(p) for _ in range(6)]
        try:
            # Equal weights: two clients per node.
            assert [b.active for b in pool.backends] == [2, 2, 2]
            paused = pool.by_name["rabbit2"]
            total_before = paused.total
            cluster.pause(cluster.nodes[1])
            try:
                took = await _marked_down(paused)
                print(f"paused node marked down after {took:.2f}s (bound {DOWN_WITHIN:.2f}s)")
                assert paused.health_detail == "timeout"
                # The two clients relayed through the frozen node are closed by us, not left hanging.
                await wait_for(lambda: sum(client_dead(c) for c in conns) == 2, timeout=15, what="2 clients closed")
                assert service.ended[CloseReason.BACKEND_DOWN] == 2
                assert paused.active == 0
                fresh = [await connect_through(p) for _ in range(4)]
                conns.extend(fresh)
                assert paused.total == total_before
                assert [pool.by_name[n].active for n in ("rabbit1", "rabbit3")] == [4, 4]
            finally:
                cluster.resume(cluster.nodes[1])
            await wait_for(lambda: paused.healthy, timeout=30, what="rabbit2 up again")
            assert paused.health_detail.startswith("RabbitMQ 3.")
            # The round robin resumes where rabbit2's turn stood, so it gets a client within two rounds of three.
            for _ in range(6):
                conns.append(await connect_through(p))
                if paused.active:
                    break
            assert paused.active == 1
        finally:
            await close_all(conns)


@pytest.mark.asyncio
async def test_killed_node_is_marked_down_avoided_and_back_after_restart(cluster: DevCluster) -> None:
    async with run_proxy(service_config(backends_for(cluster), health_check=_check())) as p:
        await _all_up(p)
        pool = p.services["amqp"].pool
        killed = pool.by_name["rabbit3"]
        conns: list[aio_pika.abc.AbstractConnection] = []
        try:
            cluster.kill(cluster.nodes[2])
            try:
                took = await _marked_down(killed)
                print(f"killed node marked down after {took:.2f}s (bound {DOWN_WITHIN:.2f}s)")
                assert killed.health_detail == "refused"
                conns = [await connect_through(p) for _ in range(4)]
                assert killed.total == 0
                assert [pool.by_name[n].total for n in ("rabbit1", "rabbit2")] == [2, 2]
            finally:
                cluster.restart(cluster.nodes[2])
            await wait_for(lambda: killed.healthy, timeout=30, what="rabbit3 up again")
        finally:
            await close_all(conns)


@pytest.mark.asyncio
async def test_amqp_check_of_a_non_amqp_port_is_down_while_tcp_check_is_up(cluster: DevCluster) -> None:
    node = cluster.nodes[0]
    async with tcp_server(echo_handler) as echo_port:
        # The management plugin's HTTP port accepts TCP and waits for a request line that never comes; the echo
        # server answers at once, with bytes that are not connection.start.
        backends = [
            {"name": "mgmt", "address": "127.0.0.1", "port": node.management_port},
            {"name": "echo", "address": "127.0.0.1", "port": echo_port},
        ]
        async with run_proxy(
            service_config(backends, name="amqp", health_check=_check()),
            service_config(backends, name="tcp", health_check=_check(type="tcp")),
        ) as p:
            amqp_pool = p.services["amqp"].pool
            tcp_pool = p.services["tcp"].pool
            await wait_for(
                lambda: all(b.health_time is not None for b in amqp_pool.backends + tcp_pool.backends),
                what="first checks",
            )
            mgmt, echo = amqp_pool.by_name["mgmt"], amqp_pool.by_name["echo"]
            assert (mgmt.healthy, mgmt.health_detail) == (False, "timeout")
            assert not echo.healthy
            assert echo.health_detail.startswith("bad reply: ")
            for b in tcp_pool.backends:
                assert (b.healthy, b.health_detail) == (True, "TCP connect ok")


@pytest.mark.asyncio
async def test_amqp_checks_leave_no_connection_behind_on_the_broker(cluster: DevCluster) -> None:
    node = cluster.nodes[0]
    backend = [{"name": "rabbit1", "address": "127.0.0.1", "port": node.amqp_port}]
    async with run_proxy(service_config(backend, health_check=_check(interval=0.05, timeout=TIMEOUT))) as p:
        b = p.services["amqp"].pool.by_name["rabbit1"]
        await wait_for(lambda: b.healthy, what="rabbit1 up")
        # Let a good number of checks run; each one opens and closes a connection.
        began = time.monotonic()
        await wait_for(lambda: time.monotonic() - began > 2.0, what="two seconds of checks")
    # RabbitMQ keeps a connection that stalls in the handshake for its 10 s handshake timeout, so a lingering check
    # would still be listed after 5 s; a clean close is gone almost at once.
    counts = await wait_for(
        lambda: asyncio.to_thread(lambda: cluster.connection_counts()[node.name] == 0),
        timeout=5,
        interval=0.5,
        what="no connection left on rabbit1",
    )
    assert counts is True


@pytest.mark.asyncio
async def test_http_checks_against_the_management_api(cluster: DevCluster) -> None:
    node = cluster.nodes[0]
    base = f"http://{{address}}:{node.management_port}/api/health/checks"

    def svc(name: str, path: str, **extra: Any) -> dict[str, Any]:
        return service_config(
            [{"name": "rabbit1", "address": "127.0.0.1", "port": node.amqp_port}],
            name=name,
            health_check=_check(type="http", url=base + path, timeout=2.0, **extra),
        )

    async with run_proxy(
        svc("listener", "/protocol-listener/amqp"),
        # Debian's 3.10 has no ready-to-serve-clients endpoint: 404 is a failure.
        svc("readiness", "/ready-to-serve-clients"),
        svc("badauth", "/protocol-listener/amqp", password="wrong"),
    ) as p:
        listener = p.services["listener"].pool.by_name["rabbit1"]
        readiness = p.services["readiness"].pool.by_name["rabbit1"]
        badauth = p.services["badauth"].pool.by_name["rabbit1"]
        await wait_for(
            lambda: all(b.health_time is not None for b in (listener, readiness, badauth)), what="first checks"
        )
        assert (listener.healthy, listener.health_detail) == (True, "HTTP 200")
        assert (readiness.healthy, readiness.health_detail) == (False, "HTTP 404")
        assert (badauth.healthy, badauth.health_detail) == (False, "HTTP 401")


@contextlib.asynccontextmanager
async def readiness_endpoint(answer: list[int]) -> AsyncIterator[int]:
    """A stand-in for RabbitMQ 3.13's readiness endpoint (Debian's 3.10 lacks it); answers with ``answer[0]``."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=answer[0], text="{}")

    app = web.Application()
    app.router.add_get("/api/health/checks/ready-to-serve-clients", handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_http_readiness_503_drains_a_backend_without_closing_its_clients(cluster: DevCluster) -> None:
    answer = [200]
    async with readiness_endpoint(answer) as port:
        url = f"http://{{address}}:{port}/api/health/checks/ready-to-serve-clients"
        async with run_proxy(service_config(backends_for(cluster)[:1], health_check=_check(type="http", url=url))) as p:
            b = p.services["amqp"].pool.by_name["rabbit1"]
            await wait_for(lambda: b.healthy, what="rabbit1 up")
            client = await connect_through(p)
            try:
                answer[0] = 503
                await wait_for(lambda: b.admin_state == "drain", timeout=10, what="rabbit1 drained")
                assert b.healthy
                assert b.status == "drain"
                # Drain keeps the client that is already there working.
                channel = await client.channel()
                queue = await channel.declare_queue("", exclusive=True)
                await channel.default_exchange.publish(aio_pika.Message(b"still here"), routing_key=queue.name)
                msg = await queue.get(timeout=10)
                assert msg.body == b"still here"
                assert b.active == 1
                answer[0] = 200
                await wait_for(lambda: b.admin_state == "ready", timeout=10, what="rabbit1 ready again")
            finally:
                await client.close()


@pytest.mark.asyncio
async def test_when_every_backend_is_down_clients_are_closed_and_counted_and_other_services_serve(
    cluster: DevCluster,
) -> None:
    with dead_port() as port:
        dead = [{"name": "gone", "address": "127.0.0.1", "port": port}]
        async with run_proxy(
            service_config(dead, name="dead", health_check=_check()),
            service_config(backends_for(cluster)[:1], name="amqp", health_check=_check()),
        ) as p:
            gone = p.services["dead"].pool.by_name["gone"]
            await wait_for(lambda: gone.health_time is not None, what="first check of the dead backend")
            assert (gone.healthy, gone.health_detail) == (False, "refused")
            for _ in range(3):
                reader, writer = await asyncio.open_connection(*listen_addr(p, "dead"))
                # Closed at once, without a byte: the client's next read sees the end of the stream.
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
            await wait_for(lambda: p.services["dead"].ended[CloseReason.NO_BACKEND] == 3, what="3 clients counted")
            assert gone.connect_errors == 0
            await _all_up(p)
            conn = await connect_through(p)
            try:
                channel = await conn.channel()
                assert not channel.is_closed
            finally:
                await conn.close()

"""How connections end, against the real cluster: the shutdown and removal grace periods running out, a broker
killed under its clients, and a feedback agent saying ``down`` and then ``up``.

Each promise is checked by its close reason (``service.ended``), by what the AMQP clients see, and where it matters
by the brokers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aio_pika
import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.app import serve
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from tests.support.agents import ScriptedAgent
from tests.support.amqp import client_dead, close_all
from tests.support.cluster import backends_for
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


@contextlib.asynccontextmanager
async def _proxy_with_stop(
    *services: Mapping[str, Any],
) -> AsyncIterator[tuple[Supervisor, asyncio.Event, asyncio.Task[None]]]:
    """Like ``run_proxy``, but the test triggers the shutdown itself and can watch it happen."""
    cfg = config_mod.validate({"services": [dict(s) for s in services], "admin": {"enabled": False}}, "test")
    stop = asyncio.Event()
    started: asyncio.Future[Supervisor] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, shutdown_trigger=stop.wait, ready=started.set_result))
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield started.result(), stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _connect(proxy: Supervisor, service: str = "amqp") -> aio_pika.abc.AbstractConnection:
    host, port = listen_addr(proxy, service)
    return await aio_pika.connect(f"amqp://guest:guest@{host}:{port}/", timeout=15)


async def _round_trip(conn: aio_pika.abc.AbstractConnection, body: bytes) -> bytes:
    channel = await conn.channel()
    queue = await channel.declare_queue("", exclusive=True)
    await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
    msg = await queue.get(timeout=10)
    await channel.close()
    return msg.body


async def _refused(addr: tuple[str, int]) -> bool:
    try:
        _, writer = await asyncio.open_connection(*addr)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# -- shutdown_timeout runs out -----------------------------------------------------------------------------------

# Long enough that a round trip through a busy machine fits well inside it, short enough to keep the test quick.
GRACE = 5.0


@pytest.mark.asyncio
async def test_shutdown_closes_clients_that_stay_after_shutdown_timeout_with_reason_shutdown(
    cluster: DevCluster,
) -> None:
    conns: list[aio_pika.abc.AbstractConnection] = []
    async with _proxy_with_stop(service_config(backends_for(cluster), shutdown_timeout=GRACE)) as (p, stop, task):
        service = p.services["amqp"]
        addr = listen_addr(p)
        try:
            conns = [await _connect(p) for _ in range(3)]
            began = time.monotonic()
            stop.set()
            await wait_for(lambda: not service.accepting, timeout=10, what="shutdown begun")
            # The listener is closed at once, but the clients already here may still work during the grace period.
            assert await _refused(addr)
            assert await _round_trip(conns[0], b"still served while draining") == b"still served while draining"
            assert not any(client_dead(c) for c in conns)
            # These clients never leave by themselves: only the expiry of shutdown_timeout ends them.
            await asyncio.wait_for(asyncio.shield(task), 60)
            assert time.monotonic() - began >= GRACE
            assert service.ended[CloseReason.SHUTDOWN] == 3
            assert service.active == 0
            await wait_for(lambda: all(client_dead(c) for c in conns), timeout=15, what="every client told")
        finally:
            await close_all(conns)


@pytest.mark.asyncio
async def test_removed_service_ends_clients_that_outlive_its_shutdown_timeout_with_reason_service_removed(
    cluster: DevCluster,
) -> None:
    keep = service_config(backends_for(cluster))
    removed = service_config(backends_for(cluster), name="old", shutdown_timeout=GRACE)
    conns: list[aio_pika.abc.AbstractConnection] = []
    async with run_proxy(keep, removed) as p:
        old = p.services["old"]
        addr = listen_addr(p, "old")
        try:
            conns = [await _connect(p, "old") for _ in range(2)]
            survivor = await _connect(p)
            conns.append(survivor)
            began = time.monotonic()
            result = await p.reload(config_mod.validate({"services": [keep], "admin": {"enabled": False}}))
            assert result.removed == ["old"]
            assert "old" not in p.services
            assert await _refused(addr)
            assert await _round_trip(conns[0], b"removed but draining") == b"removed but draining"
            await wait_for(
                lambda: old.ended[CloseReason.SERVICE_REMOVED] == 2,
                timeout=GRACE + 30,
                what="the removed service's clients closed",
            )
            assert time.monotonic() - began >= GRACE
            assert old.active == 0
            await wait_for(lambda: client_dead(conns[0]) and client_dead(conns[1]), timeout=15, what="clients told")
            # The service that stayed is untouched.
            assert not client_dead(survivor)
            assert await _round_trip(survivor, b"other service") == b"other service"
            assert sum(p.services["amqp"].ended.values()) == 0
        finally:
            await close_all(conns)


# -- a broker killed under its clients ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_killed_broker_with_unread_data_ends_its_connections_with_reason_backend_reset(
    cluster: DevCluster,
) -> None:
    node = cluster.nodes[2]
    backend = backends_for(cluster)[2]
    async with run_proxy(service_config([backend])) as p:
        service = p.services["amqp"]
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        paused = killed = False
        try:
            writer.write(AMQP_HEADER)
            # connection.start from the broker: the connection is relayed end to end.
            frame = await asyncio.wait_for(reader.readexactly(7), timeout=15)
            assert frame[:3] == b"\x01\x00\x00", frame
            (leg,) = service.connections
            # A frozen VM leaves what it is sent unread in its socket; a process killed with unread data makes the
            # kernel answer with a reset, not a FIN. (An idle broker killed outright would look like a clean close.)
            await asyncio.to_thread(cluster.pause, node)
            paused = True
            junk = b"\x00" * 4096
            writer.write(junk)
            await wait_for(
                lambda: (
                    leg.bytes_in == len(AMQP_HEADER) + len(junk)
                    and leg.backend_transport is not None
                    and leg.backend_transport.get_write_buffer_size() == 0
                ),
                timeout=15,
                what="the bytes handed to the frozen broker's socket",
            )
            await asyncio.to_thread(cluster.kill, node)
            killed = True
            await wait_for(lambda: service.ended[CloseReason.BACKEND_RESET] == 1, timeout=15, what="backend reset")
            assert service.active == 0
            assert leg.backend is not None and leg.backend.active == 0
            # The client is told: it gets the rest of connection.start (payload and frame-end octet), then EOF.
            rest = await asyncio.wait_for(reader.read(), timeout=15)
            assert len(rest) == int.from_bytes(frame[3:7], "big") + 1 and rest.endswith(b"\xce"), rest
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            # The session's cluster must be whole again for the tests that follow.
            if killed:
                await asyncio.to_thread(cluster.restart, node)
            elif paused:
                await asyncio.to_thread(cluster.resume, node)


# -- a feedback agent says down, then up -------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("on_marked_down", ["close", "keep"])
async def test_agent_down_takes_the_backend_out_and_up_brings_it_back(cluster: DevCluster, on_marked_down: str) -> None:
    agents = [ScriptedAgent("up ready 100%\n"), ScriptedAgent("up ready 100%\n")]
    backends = backends_for(cluster)[:2]
    for agent, backend in zip(agents, backends, strict=True):
        backend["agent_port"] = await agent.start()
    svc = service_config(
        backends,
        health_check={
            "type": "amqp",
            "interval": 0.5,
            "timeout": 2.0,
            "rise": 1,
            "fall": 2,
            "on_marked_down": on_marked_down,
        },
        feedback={"type": "agent", "interval": 0.3, "timeout": 2.0},
    )
    conns: list[aio_pika.abc.AbstractConnection] = []
    try:
        async with run_proxy(svc) as p:
            service = p.services["amqp"]
            r1, r2 = service.pool.backends
            await wait_for(
                lambda: all(b.healthy and b.agent_status == "ok" for b in (r1, r2)), what="both up, agents answering"
            )
            # Equal weights, a fresh round robin: two clients on each node.
            on_r1: list[aio_pika.abc.AbstractConnection] = []
            for _ in range(4):
                total = r1.total
                conns.append(await _connect(p))
                if r1.total != total:
                    on_r1.append(conns[-1])
            assert (r1.active, r2.active, len(on_r1)) == (2, 2, 2)

            agents[0].line = "down #disk full\n"
            await wait_for(lambda: r1.agent_down is not None, timeout=15, what="rabbit1 down by its agent")
            # Only the agent says so: the broker itself still passes its health checks.
            assert (r1.status, r1.agent_down, r1.healthy, r1.usable) == ("down", "disk full", True, False)
            if on_marked_down == "close":
                await wait_for(lambda: r1.active == 0, timeout=15, what="rabbit1's clients closed")
                assert service.ended[CloseReason.BACKEND_DOWN] == 2
                await wait_for(lambda: sum(client_dead(c) for c in conns) == 2, timeout=15, what="2 clients told")
            else:
                assert r1.active == 2
                assert sum(service.ended.values()) == 0
                assert not any(client_dead(c) for c in conns)
                assert await _round_trip(on_r1[0], b"kept while down") == b"kept while down"
            total = r1.total
            newcomers = [await _connect(p) for _ in range(3)]
            conns += newcomers
            assert r1.total == total

            agents[0].line = "up 100%\n"
            await wait_for(lambda: r1.agent_down is None, timeout=15, what="rabbit1 up by its agent")
            assert (r1.status, r1.usable) == ("up", True)
            # Back in the rotation: of the next two clients, one goes to rabbit1.
            conns += [await _connect(p) for _ in range(2)]
            assert r1.total == total + 1
    finally:
        await close_all(conns)
        for agent in agents:
            await agent.stop()

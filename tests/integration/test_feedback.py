"""Feedback agents in front of real RabbitMQ nodes: weights, drain, maint and a vanished agent.

The agents here are scripted: a tiny TCP server per backend that answers every poll with a line the test sets.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.dev.cluster import DevCluster
from tests.support.agents import ScriptedAgent
from tests.support.amqp import client_dead, close_all, connect_through
from tests.support.cluster import backends_for
from tests.support.proxy import run_proxy, service_config
from tests.support.waiting import wait_for

CHECK = {"type": "amqp", "interval": 0.3, "timeout": 2.0, "rise": 1, "fall": 2}
POLL = 0.3


async def _agents_for(cluster: DevCluster, lines: list[str]) -> tuple[list[ScriptedAgent], list[dict[str, Any]]]:
    agents = [ScriptedAgent(line) for line in lines]
    backends = backends_for(cluster)[: len(lines)]
    for agent, backend in zip(agents, backends, strict=True):
        backend["agent_port"] = await agent.start()
    return agents, backends


def _service(backends: list[dict[str, Any]]) -> dict[str, Any]:
    return service_config(backends, health_check=CHECK, feedback={"type": "agent", "interval": POLL, "timeout": 2.0})


async def _round_trip(conn: aio_pika.abc.AbstractConnection, body: bytes) -> bytes:
    channel = await conn.channel()
    queue = await channel.declare_queue("", exclusive=True)
    await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
    msg = await queue.get(timeout=10)
    await channel.close()
    return msg.body


@pytest.mark.asyncio
async def test_agent_percentages_split_new_connections_one_to_four(cluster: DevCluster) -> None:
    agents, backends = await _agents_for(cluster, ["25%\n", "up ready 100%\n"])
    conns: list[aio_pika.abc.AbstractConnection] = []
    try:
        async with run_proxy(_service(backends)) as p:
            pool = p.services["amqp"].pool
            await wait_for(
                lambda: [(b.healthy, b.agent_percent) for b in pool.backends] == [(True, 25), (True, 100)],
                what="both backends up with their agents' figures",
            )
            assert [b.effective_weight for b in pool.backends] == [25, 100]
            for _ in range(50):
                conns.append(await connect_through(p))
            assert [b.active for b in pool.backends] == [10, 40]
            node1, node2, node3 = (n.name for n in cluster.nodes)
            # The brokers themselves must see the same split (their registry can lag a moment behind).
            await wait_for(
                lambda: asyncio.to_thread(lambda: cluster.connection_counts() == {node1: 10, node2: 40, node3: 0}),
                timeout=30,
                interval=0.5,
                what="10 and 40 connections on the brokers",
            )
    finally:
        await close_all(conns)
        for agent in agents:
            await agent.stop()


@pytest.mark.asyncio
async def test_agent_drain_maint_and_a_vanished_agent(cluster: DevCluster) -> None:
    agents, backends = await _agents_for(cluster, ["100%\n", "100%\n"])
    conns: list[aio_pika.abc.AbstractConnection] = []
    try:
        async with run_proxy(_service(backends)) as p:
            service = p.services["amqp"]
            r1, r2 = service.pool.backends
            await wait_for(lambda: r1.healthy and r2.healthy and r1.agent_percent == 100, what="both up")
            # Equal weights and a fresh round robin: the first client goes to rabbit1, the second to rabbit2.
            conns = [await connect_through(p), await connect_through(p)]
            assert (r1.active, r2.active) == (1, 1)

            agents[0].line = "drain\n"
            await wait_for(lambda: r1.admin_state == "drain", timeout=5, what="rabbit1 drained by its agent")
            assert r1.status == "drain"
            # Drain: the client already on rabbit1 keeps working, new ones all go to rabbit2.
            assert await _round_trip(conns[0], b"drained but alive") == b"drained but alive"
            total = r1.total
            for _ in range(4):
                conns.append(await connect_through(p))
            assert r1.total == total
            assert (r1.active, r2.active) == (1, 5)

            agents[0].line = "maint\n"
            await wait_for(lambda: r1.admin_state == "maint", timeout=5, what="rabbit1 in maint")
            await wait_for(lambda: client_dead(conns[0]), timeout=10, what="rabbit1's client closed")
            assert service.ended[CloseReason.BACKEND_MAINT] == 1
            assert not any(client_dead(c) for c in conns[1:])

            agents[0].line = "up ready 40%\n"
            await wait_for(lambda: r1.admin_state == "ready", timeout=5, what="rabbit1 ready again")
            assert r1.effective_weight == 40

            # The agent goes away: the last good figure stays, and the state says it is stale.
            await agents[0].stop()
            await wait_for(
                lambda: (r1.agent_status, r1.agent_detail) == ("unreachable", "refused"), timeout=5, what="stale"
            )
            assert (r1.agent_percent, r1.effective_weight, r1.agent_reply) == (40, 40, "up ready 40%")
            assert r1.status == "up"
            assert r1.weight == 40
    finally:
        await close_all(conns)
        for agent in agents:
            await agent.stop()

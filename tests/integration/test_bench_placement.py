"""The AMQP bench's placement against real brokers: each proxy's round-robin pointer moved to broker 0, then read back.

The bench's fairness rests on this: after ``placement.align``, the k-th connection through rabbitproxy or HAProxy
lands on broker k % N, exactly where the direct run puts it, and the management API reports where each one went.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.bench import common, placement

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest.mark.parametrize("kind", ["rabbitproxy", "haproxy"])
async def test_after_align_the_kth_connection_through_a_proxy_lands_on_broker_k_mod_n(
    cluster: DevCluster, kind: str, tmp_path: Path
) -> None:
    brokers = tuple(("127.0.0.1", n.amqp_port) for n in cluster.nodes)
    mgmt = placement.Management(cluster.management_url(cluster.nodes[0]))
    routes = common.target_routes([common.Route("amqp", 0, brokers)], [kind])[kind]
    target = await asyncio.to_thread(common.start_target, kind, routes, tmp_path, None)
    port = target.ports["amqp"]
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    tag = f"test-{kind}"
    clients = placement.plan(publishers=3, consumers=2, nodes=len(brokers), tag=tag)
    conns = []
    try:
        # The starting check through the proxy (wait_port) already moved the pointer once; align must cope.
        landed = await placement.align(url, ("127.0.0.1", port), mgmt, brokers, tag)
        assert landed is not None
        for c in clients:
            conns.append(await aio_pika.connect(url, timeout=30, client_properties={"connection_name": c.name}))
        prefix = f"{placement.PREFIX}-{tag}-"
        where = await asyncio.to_thread(placement.wait_landed, mgmt, brokers, prefix, len(clients), 60.0)
    finally:
        for conn in conns:
            await conn.close()
        assert target.proc is not None
        await asyncio.to_thread(target.proc.stop)
    summary = placement.summarize(clients, where, len(brokers))
    assert summary["as_planned"], summary
    assert [where[c.name] for c in clients] == [0, 1, 2, 0, 1]

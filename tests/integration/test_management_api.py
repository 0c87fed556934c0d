"""The management API client against real nodes of both releases (3.10 and 4.0): who answered, node state, checks,
and a close through the broker."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest

from rabbitproxy.config import RabbitMQConfig
from rabbitproxy.control.management import ManagementAPI, ManagementUnavailable, session_for
from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.protocols.management import connection_name
from tests.support.net import free_port
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def test_overview_node_and_checks_of_a_healthy_node(broker: DevCluster) -> None:
    node = broker.nodes[0]
    async with session_for(RabbitMQConfig()) as session:
        api = ManagementAPI(session, broker.management_url(node), timeout=10.0)
        overview = await api.overview()
        assert overview.node == node.name
        assert overview.listening(node.name)
        state = await api.node(overview.node)
        assert state.running and state.alarms == ()
        assert await api.local_alarms() == ()
        assert not (await api.quorum_check()).critical


async def test_unreachable_and_unauthorised_are_one_error(broker: DevCluster) -> None:
    async with session_for(RabbitMQConfig()) as session:
        with pytest.raises(ManagementUnavailable, match="refused"):
            await ManagementAPI(session, f"http://127.0.0.1:{free_port()}", timeout=5.0).overview()
    async with session_for(RabbitMQConfig(username="nobody", password="wrong")) as session:
        api = ManagementAPI(session, broker.management_url(broker.nodes[0]), timeout=10.0)
        with pytest.raises(ManagementUnavailable, match="HTTP 401"):
            await api.overview()


async def test_the_broker_closes_a_connection_by_our_name_with_our_reason(broker: DevCluster) -> None:
    node = broker.nodes[1]
    label = f"mgmt-close-{free_port()}"
    conn = await aio_pika.connect(broker.amqp_url(node), client_properties={"connection_name": label})
    closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    conn.close_callbacks.add(lambda _c, exc=None: closed.done() or closed.set_result(exc))
    try:
        async with session_for(RabbitMQConfig()) as session:

            async def listed() -> dict[str, object] | None:
                # The broker registers a connection with its statistics a moment after the handshake.
                async with session.get(broker.management_url(node) + "api/connections") as resp:
                    rows = await resp.json()
                return next((r for r in rows if r.get("client_properties", {}).get("connection_name") == label), None)

            row = await wait_for(listed, what="the connection listed by the broker")
            # The name we would compute from the two endpoints is the broker's own.
            name = connection_name((row["peer_host"], row["peer_port"]), (row["host"], row["port"]))  # type: ignore[arg-type]
            assert name == row["name"]
            api = ManagementAPI(session, broker.management_url(node), timeout=10.0)
            assert await api.close_connection(name, "rabbitproxy test: moving you") is True
            exc = await asyncio.wait_for(closed, 30)
            assert isinstance(exc, aiormq.exceptions.ConnectionClosed)
            assert exc.args[0] == 320
            assert "rabbitproxy test: moving you" in str(exc)

            async def gone() -> bool:
                return await api.close_connection(name, "again") is False

            await wait_for(gone, what="the broker no longer knows the connection")
    finally:
        await conn.close()

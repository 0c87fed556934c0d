"""Issue 13 part B against the real cluster: a drain's deadline closed by the broker (320 with our reason, nothing
confirmed is lost), the quorum guard, the rebalancer, and the least privilege that lets the proxy close clients.

The proxy runs in-process in front of the three nodes with ``[services.rabbitmq]`` pointing at each node's
management port; the clients are aio-pika robust connections, as an application would use.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import aiohttp
import aiormq
import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.config import RabbitMQConfig
from rabbitproxy.control.management import ManagementAPI, ManagementUnavailable, session_for
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.protocols.management import connection_name
from tests.support.amqp import client_dead
from tests.support.net import free_port
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

_names = itertools.count(1)


def _tag(test: str) -> str:
    return f"rabbitproxy-close-{test}-{free_port()}-{next(_names)}"


def _backends(cluster: DevCluster) -> list[dict[str, object]]:
    return [
        {"name": f"rabbit{i + 1}", "address": "127.0.0.1", "port": n.amqp_port, "management_port": n.management_port}
        for i, n in enumerate(cluster.nodes)
    ]


def _service(cluster: DevCluster, **extra: Any) -> dict[str, Any]:
    # Generous management timeouts: a busy 2-core machine with three brokers answers slowly at times.
    rabbitmq = {"timeout": 15.0} | extra.pop("rabbitmq", {})
    return service_config(_backends(cluster), rabbitmq=rabbitmq, **extra)


def _admin() -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{free_port()}"}


async def _patch(proxy: Supervisor, backend: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    url = f"http://{proxy.config.admin.listen}/api/services/amqp/backends/{backend}"
    async with aiohttp.ClientSession() as http, http.patch(url, json=body) as resp:
        return resp.status, await resp.json()


def _broker_counts(cluster: DevCluster, tag: str) -> dict[str, int]:
    """Connections whose name starts with ``tag`` per backend name, as the brokers list them."""
    rows = cluster.list_connections("port", "client_properties")
    counts = Counter(row["port"] for row in rows if tag in row["client_properties"])
    return {f"rabbit{i + 1}": counts.get(str(node.amqp_port), 0) for i, node in enumerate(cluster.nodes)}


async def _robust_clients(
    proxy: Supervisor, tag: str, n: int
) -> tuple[list[aio_pika.abc.AbstractRobustConnection], list[list[BaseException | None]]]:
    """``n`` robust clients through the proxy, each with the list of the closes it saw."""
    host, port = listen_addr(proxy)
    conns: list[aio_pika.abc.AbstractRobustConnection] = []
    closes: list[list[BaseException | None]] = []
    for i in range(n):
        conn = await aio_pika.connect_robust(
            f"amqp://guest:guest@{host}:{port}/",
            timeout=30,
            reconnect_interval=1.0,
            client_properties={"connection_name": f"{tag}-{i}"},
        )
        seen: list[BaseException | None] = []

        def on_close(_conn: object, exc: BaseException | None = None, seen: list[BaseException | None] = seen) -> None:
            seen.append(exc)

        conn.close_callbacks.add(on_close)
        conns.append(conn)
        closes.append(seen)
    return conns, closes


async def _close_clients(conns: list[aio_pika.abc.AbstractRobustConnection]) -> None:
    for c in conns:
        if not c.is_closed:
            await asyncio.wait_for(c.close(), 30)


def _forced_by_us(exc: BaseException | None, text: str) -> bool:
    return isinstance(exc, aiormq.exceptions.ConnectionClosed) and exc.args[0] == 320 and text in str(exc)


# -- drain with a deadline -------------------------------------------------------------------------------------------


async def test_a_drain_deadline_closes_through_the_broker_and_loses_no_confirmed_message(cluster: DevCluster) -> None:
    tag = _tag("drain")
    queue = f"{tag}-q"
    async with run_proxy(_service(cluster), admin=_admin()) as proxy:
        pool = proxy.services["amqp"].pool
        r1 = pool.by_name["rabbit1"]
        # Every client starts on rabbit1: the others take no new connections for now.
        for name in ("rabbit2", "rabbit3"):
            pool.by_name[name].operator_state = "drain"
        consumer = await aio_pika.connect(cluster.amqp_url(cluster.nodes[1]), timeout=30)
        received: set[str] = set()
        confirmed: set[str] = set()
        stop = asyncio.Event()
        conns: list[aio_pika.abc.AbstractRobustConnection] = []
        try:
            channel = await consumer.channel()
            q = await channel.declare_queue(queue, durable=True)

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                received.add(str(message.message_id))
                await message.ack()

            await q.consume(on_message)
            conns, closes = await _robust_clients(proxy, tag, 20)
            assert r1.active == 20

            async def publish(i: int, conn: aio_pika.abc.AbstractRobustConnection) -> None:
                ch = await conn.channel(publisher_confirms=True)
                n = 0
                while not stop.is_set():
                    mid = f"{i}-{n}"
                    try:
                        await ch.default_exchange.publish(
                            aio_pika.Message(mid.encode(), message_id=mid), routing_key=queue, timeout=10
                        )
                    except Exception:  # noqa: BLE001 - not confirmed: published again, same id, once reconnected
                        await asyncio.sleep(0.2)
                        continue
                    confirmed.add(mid)
                    n += 1
                    await asyncio.sleep(0.1)

            publishers = [asyncio.create_task(publish(i, c)) for i, c in enumerate(conns)]
            await wait_for(lambda: len(confirmed) >= 60, timeout=60, what="messages confirmed before the drain")
            for name in ("rabbit2", "rabbit3"):
                pool.by_name[name].operator_state = "ready"

            status, body = await _patch(proxy, "rabbit1", {"state": "drain", "deadline": 3})
            assert status == 200, body
            assert (body["status"], body["deadline"]) == ("drain", 3)
            # Before the deadline nothing is closed; a new client already goes elsewhere.
            assert r1.active == 20
            await wait_for(lambda: r1.active == 0, timeout=60, what="rabbit1 emptied at its deadline")
            moved = pool.by_name["rabbit2"].active + pool.by_name["rabbit3"].active
            await wait_for(
                lambda: pool.by_name["rabbit2"].active + pool.by_name["rabbit3"].active == 20,
                timeout=60,
                what=f"every client reconnected to rabbit2 or rabbit3 (now {moved})",
            )
            # Each client was told by the broker, with our words, not cut off.
            text = "rabbitproxy: node rabbit1 is being drained"
            assert all(seen and _forced_by_us(seen[0], text) for seen in closes), [s[:1] for s in closes]
            stats = proxy.steering.stats["amqp"].counts
            assert (stats["drain", "broker"], stats["drain", "tcp"]) == (20, 0)
            assert proxy.services["amqp"].ended["drain deadline"] == 20
            after = len(confirmed)
            await wait_for(lambda: len(confirmed) >= after + 60, timeout=60, what="publishing after the reconnect")
            stop.set()
            await asyncio.gather(*publishers)
            await wait_for(lambda: confirmed <= received, timeout=60, what="every confirmed message consumed")
            counts = await asyncio.to_thread(_broker_counts, cluster, tag)
            assert counts["rabbit1"] == 0 and counts["rabbit2"] + counts["rabbit3"] == 20, counts
        finally:
            stop.set()
            await _close_clients(conns)
            ch = await consumer.channel()
            await ch.queue_delete(queue)
            await consumer.close()


async def test_a_new_state_cancels_a_pending_deadline(cluster: DevCluster) -> None:
    tag = _tag("cancel")
    async with run_proxy(_service(cluster), admin=_admin()) as proxy:
        pool = proxy.services["amqp"].pool
        r1 = pool.by_name["rabbit1"]
        for name in ("rabbit2", "rabbit3"):
            pool.by_name[name].operator_state = "drain"
        conns, closes = await _robust_clients(proxy, tag, 3)
        try:
            status, body = await _patch(proxy, "rabbit1", {"state": "drain", "deadline": 2})
            assert status == 200, body
            assert 0 < body["drain_deadline"] <= 2
            status, body = await _patch(proxy, "rabbit1", {"state": "ready"})
            assert (status, body["cancelled"], body["drain_deadline"]) == (200, "drain deadline", None)
            assert proxy.steering.deadline_left("amqp", "rabbit1") is None
            # Well past the cancelled deadline: still open, never told to go.
            await asyncio.sleep(4)
            assert r1.active == 3 and not any(closes)
        finally:
            await _close_clients(conns)


async def test_maint_closes_through_the_broker(cluster: DevCluster) -> None:
    tag = _tag("maint")
    async with run_proxy(_service(cluster), admin=_admin()) as proxy:
        pool = proxy.services["amqp"].pool
        r1 = pool.by_name["rabbit1"]
        for name in ("rabbit2", "rabbit3"):
            pool.by_name[name].operator_state = "drain"
        conns, closes = await _robust_clients(proxy, tag, 4)
        try:
            for name in ("rabbit2", "rabbit3"):
                pool.by_name[name].operator_state = "ready"
            status, body = await _patch(proxy, "rabbit1", {"state": "maint"})
            assert status == 200, body
            assert (body["closed_connections"], body["closing_through_broker"]) == (0, 4)
            await wait_for(lambda: r1.active == 0, timeout=60, what="rabbit1 emptied")
            text = "rabbitproxy: node rabbit1 is in maintenance"
            await wait_for(lambda: all(closes), timeout=30, what="every client saw its close")
            assert all(_forced_by_us(seen[0], text) for seen in closes), [s[:1] for s in closes]
        finally:
            await _close_clients(conns)


# -- quorum guard ----------------------------------------------------------------------------------------------------


async def test_the_quorum_guard_refuses_a_drain_that_would_cost_a_majority_unless_forced(cluster: DevCluster) -> None:
    queue = _tag("quorum")
    direct = await aio_pika.connect(cluster.amqp_url(cluster.nodes[0]), timeout=30)
    victim = cluster.nodes[2]
    try:
        channel = await direct.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        async with run_proxy(_service(cluster), admin=_admin()) as proxy:
            cluster.kill(victim)
            try:
                async with session_for(RabbitMQConfig()) as session:
                    api = ManagementAPI(session, cluster.management_url(cluster.nodes[1]), timeout=15.0)

                    async def critical() -> bool:
                        return (await api.quorum_check()).critical

                    await wait_for(critical, timeout=60, interval=0.5, what="rabbit2 quorum-critical")
                status, body = await _patch(proxy, "rabbit2", {"state": "drain", "deadline": 60})
                assert status == 409, body
                assert any(queue in q for q in body["queues"]), body
                assert queue in body["error"] and "force" in body["error"]
                assert proxy.services["amqp"].pool.by_name["rabbit2"].operator_state == "ready"
                # maint is guarded the same way.
                status, body = await _patch(proxy, "rabbit2", {"state": "maint"})
                assert status == 409, body
                # The stopped node cannot be asked at all: refused as well, saying why, until forced.
                status, body = await _patch(proxy, "rabbit3", {"state": "maint"})
                assert status == 503, body
                assert "cannot ask rabbit3" in body["error"]
                status, body = await _patch(proxy, "rabbit3", {"state": "maint", "force": True})
                assert (status, body["operator_state"]) == (200, "maint")
                status, body = await _patch(proxy, "rabbit2", {"state": "drain", "force": True})
                assert (status, body["operator_state"]) == (200, "drain")
            finally:
                await asyncio.to_thread(cluster.restart, victim)
    finally:
        channel = await direct.channel()
        await channel.queue_delete(queue)
        await direct.close()


# -- rebalancer ------------------------------------------------------------------------------------------------------


async def _wait_quietly(seconds: float, ok: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Assert ``ok()`` holds at every look for ``seconds``: the way to show that nothing happens."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        value = ok()
        if not isinstance(value, bool):
            value = await value
        assert value, what
        await asyncio.sleep(0.25)


async def test_the_rebalancer_spreads_clients_again_after_a_node_restart(cluster: DevCluster) -> None:
    tag = _tag("rebalance")
    health = {"type": "amqp", "interval": 1.0, "timeout": 5.0, "rise": 1, "fall": 1}
    svc = _service(cluster, health_check=health, rebalance={"enabled": False, "tolerance": 0.25, "after": 2.0})
    victim = cluster.nodes[2]
    async with run_proxy(svc, admin=_admin()) as proxy:
        service = proxy.services["amqp"]
        conns, _ = await _robust_clients(proxy, tag, 30)
        try:

            def actives() -> list[int]:
                return [b.active for b in service.pool.backends]

            await wait_for(lambda: sum(actives()) == 30, timeout=60, what="30 clients in")
            cluster.kill(victim)
            try:
                await wait_for(
                    lambda: actives()[2] == 0 and sum(actives()) == 30,
                    timeout=90,
                    what="clients moved off the stopped node",
                )
            finally:
                await asyncio.to_thread(cluster.restart, victim)
            r3 = service.pool.by_name["rabbit3"]
            await wait_for(lambda: r3.usable, timeout=60, what="rabbit3 back in the proxy")
            # Off: the imbalance shows in the metrics, and nothing is closed.
            await _wait_quietly(
                8.0, lambda: actives()[2] == 0 and sum(actives()) == 30, "nothing moves with the rebalancer off"
            )
            assert sum(proxy.steering.stats["amqp"].counts.values()) == 0
            async with aiohttp.ClientSession() as http, http.get(f"http://{proxy.config.admin.listen}/metrics") as r:
                text = await r.text()
            assert 'rabbitproxy_backend_connection_share{backend="rabbit3",service="amqp"} 0.0' in text
            assert 'rabbitproxy_backend_fair_share{backend="rabbit3",service="amqp"} 0.333' in text

            # On (by a reload, as an operator would do it): back to 10 +/- 3 everywhere within a minute.
            data = proxy.config.model_dump()
            data["services"][0]["rebalance"]["enabled"] = True
            await proxy.reload(config_mod.validate(data, "test"))
            await wait_for(
                lambda: sum(actives()) == 30 and all(7 <= a <= 13 for a in actives()),
                timeout=60,
                interval=0.25,
                what=f"10 +/- 3 on every node (now {actives()})",
            )

            def brokers_agree() -> bool:
                counts = _broker_counts(cluster, tag)
                return sum(counts.values()) == 30 and all(7 <= c <= 13 for c in counts.values())

            await wait_for(lambda: asyncio.to_thread(brokers_agree), timeout=60, interval=1.0, what="brokers agree")
            counts = proxy.steering.stats["amqp"].counts
            assert counts["rebalance", "broker"] >= 7 and counts["rebalance", "tcp"] == 0, counts
        finally:
            await _close_clients(conns)


# -- least privilege -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "may_close"),
    [("monitoring", False), ("management", False), ("policymaker", False), ("administrator", True)],
)
async def test_least_privilege_to_close_other_users_connections(
    cluster: DevCluster, tags: str, may_close: bool
) -> None:
    # Without any vhost permission: the tag alone decides.
    node = cluster.nodes[0]
    user = f"rp-{tags}-{free_port()}"
    await asyncio.to_thread(cluster.rabbitmqctl, node, "add_user", user, "secret")
    await asyncio.to_thread(cluster.rabbitmqctl, node, "set_user_tags", user, tags)
    label = _tag("privilege")
    conn = await aio_pika.connect(cluster.amqp_url(node), client_properties={"connection_name": label})
    try:
        async with session_for(RabbitMQConfig()) as admin:

            async def listed() -> dict[str, Any] | None:
                async with admin.get(cluster.management_url(node) + "api/connections") as resp:
                    rows = await resp.json()
                return next((r for r in rows if r.get("client_properties", {}).get("connection_name") == label), None)

            row = await wait_for(listed, what="the connection listed")
        name = connection_name((row["peer_host"], row["peer_port"]), (row["host"], row["port"]))
        async with session_for(RabbitMQConfig(username=user, password="secret")) as session:
            api = ManagementAPI(session, cluster.management_url(node), timeout=15.0)
            if may_close:
                assert await api.close_connection(name, "rabbitproxy test: privilege") is True
                await wait_for(lambda: client_dead(conn), what="the client told to go")
            else:
                with pytest.raises(ManagementUnavailable, match=r"HTTP 40[13]"):
                    await api.close_connection(name, "rabbitproxy test: privilege")
    finally:
        if not client_dead(conn):
            await conn.close()
        await asyncio.to_thread(cluster.rabbitmqctl, node, "delete_user", user)


# -- with a PROXY header the broker names the connection by the client ---------------------------------------------


@pytest.fixture(scope="module")
def pp_node() -> Iterator[DevCluster]:
    # A node of its own: one that requires the header drops every client of the session cluster's tests.
    c = DevCluster(1, extra_config=["proxy_protocol = true"])
    c.start()
    try:
        yield c
    finally:
        c.stop()


async def test_with_a_proxy_header_the_broker_still_closes_by_our_name(pp_node: DevCluster) -> None:
    node = pp_node.nodes[0]
    backend = {"name": "pp", "address": "127.0.0.1", "port": node.amqp_port, "management_port": node.management_port}
    svc = service_config([backend], send_proxy_protocol="v1", rabbitmq={"timeout": 15.0})
    async with run_proxy(svc, admin=_admin()) as proxy:
        conns, closes = await _robust_clients(proxy, _tag("pp"), 2)
        try:
            pp = proxy.services["amqp"].pool.by_name["pp"]
            status, body = await _patch(proxy, "pp", {"state": "maint", "force": True})
            assert (status, body["closing_through_broker"]) == (200, 2), body
            await wait_for(lambda: pp.active == 0 and all(closes), timeout=60, what="both clients told to go")
            assert all(_forced_by_us(seen[0], "rabbitproxy: node pp is in maintenance") for seen in closes), closes
            counts = proxy.steering.stats["amqp"].counts
            assert (counts["maint", "broker"], counts["maint", "tcp"]) == (2, 0)
        finally:
            await _close_clients(conns)

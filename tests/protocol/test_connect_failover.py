"""A connect that fails in an unexpected way, or whose backend stops being usable meanwhile, sends the client on.

A real :class:`rabbitproxy.relay.service.Service` on loopback in front of small in-process TCP backends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.pool import Pool
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.feedback import Poller, apply_reply
from rabbitproxy.control.health import ProbeResult, RiseFall, apply_result
from rabbitproxy.protocols.agent_reply import parse_agent_reply
from rabbitproxy.relay.legs import BackendLeg, ClientLeg
from rabbitproxy.relay.service import Service
from tests.support.fakes import FakeService, FakeTransport, HandClientLeg
from tests.support.net import echo_handler, free_port, silent_backend, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

HELLO = b"AMQP\x00\x00\x09\x01"


@contextlib.asynccontextmanager
async def running(backends: list[dict[str, Any]], **extra: Any) -> AsyncIterator[Service]:
    data: dict[str, Any] = {
        "name": "t",
        "listen": f"127.0.0.1:{free_port()}",
        "health_check": {"type": "none"},
        "backends": backends,
    }
    data.update(extra)
    service = Service(config_mod.ServiceConfig.model_validate(data))
    await service.start()
    try:
        yield service
    finally:
        await service.drain(0)


async def echo_through(service: Service, payload: bytes = HELLO, timeout: float = 20.0) -> bytes:
    """Connect a client to ``service``, send ``payload`` and return what comes back (the echo backends echo)."""
    host, port = service.bound[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        async with asyncio.timeout(timeout):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_a_name_the_resolver_cannot_encode_fails_over_to_the_next_backend() -> None:
    # getaddrinfo raises UnicodeError (not OSError) for an empty label; the config refuses such a name now, so it
    # is put on the running backend directly, as a resolver surprise would reach the data path.
    async with (
        tcp_server(echo_handler) as port,
        running(
            [
                {"name": "bad", "address": "127.0.0.1", "port": port, "weight": 1000},
                {"name": "good", "address": "127.0.0.1", "port": port, "weight": 1},
            ]
        ) as service,
    ):
        bad, good = service.pool.backends
        bad.address = "rabbit1..example.com"
        assert await echo_through(service) == HELLO
        assert bad.connect_errors == 1
        assert good.total == 1
        await wait_for(lambda: not service.connections, what="the client's connection to end")
        assert not service.ended.get("connect failed")


class ConnectService(FakeService):
    """The fake service plus what ``ClientLeg._connect_done`` asks of a service."""

    def __init__(self, **service: Any) -> None:
        service.setdefault(
            "backends",
            [{"name": "b1", "address": "127.0.0.1", "port": 1}, {"name": "b2", "address": "127.0.0.1", "port": 2}],
        )
        super().__init__(**service)
        self.backend_ssl = None

    def connect_started(self, conn: ClientLeg, task: Any) -> None:
        self.connect_deadlines.add(conn)

    def connect_ended(self, conn: ClientLeg, task: Any) -> None:
        self.connect_deadlines.discard(conn)

    def full_backends(self) -> list[Backend]:
        return []


def connecting_client(
    svc: ConnectService,
) -> tuple[ClientLeg, FakeTransport, BackendLeg, FakeTransport, asyncio.Future[Any]]:
    """A client whose connect to b1 is in flight and has already made its transport (connection_made ran)."""
    client = HandClientLeg(svc)  # type: ignore[arg-type]
    ct = FakeTransport()
    ct.protocol = client
    client.connection_made(ct)  # type: ignore[arg-type]
    assert svc.connects_started == 1
    client.data_received(HELLO)
    backend = svc.pool.backends[0]
    leg = BackendLeg(client)
    bt = FakeTransport(("127.0.0.1", 1))
    bt.protocol = leg
    leg.connection_made(bt)  # type: ignore[arg-type]
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    client.tried.append(backend)
    backend.connecting += 1
    client.connect_leg = leg
    client.connect_task = fut  # type: ignore[assignment]
    svc.connect_started(client, fut)
    fut.add_done_callback(client._connect_done)  # type: ignore[arg-type]
    return client, ct, leg, bt, fut


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_connect_abandoned_after_connection_made_does_not_close_the_client() -> None:
    # The connect deadline cancels a connect whose transport exists already; the loop then closes that transport,
    # and its connection_lost reaches our BackendLeg. The client has moved on to the next backend by then.
    svc = ConnectService()
    client, ct, _leg, bt, fut = connecting_client(svc)
    client.connect_timed_out()
    fut.cancel()
    await settle()
    assert svc.connects_started == 2  # the retry
    assert svc.pool.backends[0].connect_errors == 1
    bt.close()
    await settle()
    assert not ct.closing
    assert client.reason is None and not svc.closed


@pytest.mark.asyncio
@pytest.mark.parametrize("change", ["maint", "drain", "down", "removed"])
async def test_attach_rechecks_the_backend_and_tries_the_next_one(change: str) -> None:
    svc = ConnectService()
    client, ct, leg, bt, fut = connecting_client(svc)
    b1 = svc.pool.backends[0]
    if change == "down":
        b1.mark_health(False, "test", 0.0)
    elif change == "removed":
        svc.pool = Pool([svc.pool.backends[1]], "weighted-round-robin")
    else:
        b1.set_operator_state(change, CloseReason.BACKEND_MAINT)  # type: ignore[arg-type]
    fut.set_result((bt, leg))
    await settle()
    # The new backend leg is closed unused, the client tries the next backend, and b1 is not blamed for it.
    assert bt.closing and bt.buffer == b""
    assert svc.connects_started == 2
    assert b1.connect_errors == 0 and b1.active == 0
    assert client.backend is None and client.pending == HELLO
    await settle()
    assert not ct.closing and not svc.closed


@pytest.mark.asyncio
async def test_attach_after_a_reload_counts_the_connection_on_the_new_backend_object() -> None:
    svc = ConnectService()
    client, _ct, leg, bt, fut = connecting_client(svc)
    old = svc.pool.backends[0]
    svc.pool = Pool.from_config(svc.config, healthy=True)  # a reload: new objects for the same servers
    fut.set_result((bt, leg))
    await settle()
    assert client.backend is svc.pool.backends[0] and svc.pool.backends[0].active == 1
    assert old.active == 0 and bt.buffer == HELLO


@pytest.mark.asyncio
@pytest.mark.parametrize("loop_kind", ["maint", "reload"])
async def test_a_connect_hanging_on_a_backend_put_in_maint_moves_to_the_next_one(loop_kind: str) -> None:
    # b1 drops SYNs, so its connect hangs for connect_timeout (60 s); b2 echoes. Putting b1 in maint through the
    # admin API (or reloading without it) must send the waiting client to b2 long before that.
    admin_port = free_port()
    with silent_backend() as dead_port:
        async with tcp_server(echo_handler) as port:
            backends = [
                {"name": "b1", "address": "127.0.0.1", "port": dead_port, "weight": 1000},
                {"name": "b2", "address": "127.0.0.1", "port": port, "weight": 1},
            ]
            svc_cfg = service_config(backends, connect_timeout=60.0)
            async with run_proxy(svc_cfg, admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy:
                service = proxy.services["amqp"]
                reader, writer = await asyncio.open_connection(*listen_addr(proxy))
                try:
                    writer.write(HELLO)
                    await wait_for(lambda: service.pool.by_name["b1"].connecting == 1, what="b1 connect")
                    if loop_kind == "maint":
                        async with aiohttp.ClientSession() as http:
                            url = f"http://127.0.0.1:{admin_port}/api/services/amqp/backends/b1"
                            async with http.patch(url, json={"state": "maint"}) as resp:
                                assert resp.status == 200, await resp.text()
                    else:
                        await proxy.reload(
                            config_mod.validate(
                                {"services": [{**svc_cfg, "backends": backends[1:]}], "admin": {"enabled": False}}
                            )
                        )
                    async with asyncio.timeout(20):
                        assert await reader.readexactly(len(HELLO)) == HELLO
                    assert [c.backend.name for c in service.connections if c.backend] == ["b2"]
                    assert service.pool.by_name["b2"].total == 1
                finally:
                    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("verdict", ["health down", "agent maint", "agent drain", "agent down"])
async def test_the_control_plane_moves_a_connect_in_flight(verdict: str) -> None:
    # The same hanging connect as above, ended by a health verdict or an agent reply instead of the admin API.
    with silent_backend() as dead_port:
        async with (
            tcp_server(echo_handler) as port,
            running(
                [
                    {"name": "b1", "address": "127.0.0.1", "port": dead_port, "weight": 1000},
                    {"name": "b2", "address": "127.0.0.1", "port": port, "weight": 1},
                ],
                connect_timeout=60.0,
            ) as service,
        ):
            b1 = service.pool.by_name["b1"]
            reply = asyncio.ensure_future(echo_through(service))
            await wait_for(lambda: b1.connecting == 1, what="b1 connect in flight")
            if verdict == "health down":
                state = RiseFall(1, 1, healthy=True, checked=True)
                apply_result(service, b1, state, ProbeResult(False, "timeout"), 1.0)
            else:
                word = verdict.split()[1]
                change = apply_reply(b1, parse_agent_reply(word), word)
                Poller(service, b1)._report(change, word, was_stale=False)
            assert await reply == HELLO
            assert service.pool.by_name["b2"].total == 1 and b1.connect_errors == 0


@pytest.mark.asyncio
async def test_least_connections_counts_connects_in_flight() -> None:
    # b1's connects hang (as to a node that is booting, or far away); b2 and b3 answer at once. Six clients arrive
    # one after another. Counting only open connections, b1 always looked empty and took four of the six; a client
    # already on its way to a backend is load on it, as HAProxy counts it from the moment it is assigned.
    with silent_backend() as dead_port:
        async with (
            tcp_server(echo_handler) as port2,
            tcp_server(echo_handler) as port3,
            run_proxy(
                service_config(
                    [
                        {"name": "b1", "address": "127.0.0.1", "port": dead_port},
                        {"name": "b2", "address": "127.0.0.1", "port": port2},
                        {"name": "b3", "address": "127.0.0.1", "port": port3},
                    ],
                    balance="least-connections",
                    connect_timeout=60.0,
                )
            ) as proxy,
        ):
            service = proxy.services["amqp"]
            b2, b3 = service.pool.by_name["b2"], service.pool.by_name["b3"]

            def waiting_for_b1() -> int:
                return sum(1 for c in service.connections if c.backend is None and c.tried and c.tried[-1].name == "b1")

            writers = []
            try:
                for n in range(1, 7):
                    _reader, writer = await asyncio.open_connection(*listen_addr(proxy))
                    writers.append(writer)
                    writer.write(HELLO)
                    # Each client settles (attached, or its connect hanging) before the next one arrives.
                    await wait_for(lambda n=n: waiting_for_b1() + b2.active + b3.active == n, what=f"client {n} placed")
                assert (waiting_for_b1(), b2.active, b3.active) == (2, 2, 2)
                assert service.pool.by_name["b1"].connecting == 2
            finally:
                for writer in writers:
                    writer.close()

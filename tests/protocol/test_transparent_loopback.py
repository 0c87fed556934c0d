"""Transparent mode (``source_address = "client"``) on loopback, on both loops.

All of 127.0.0.0/8 is local, so a client can connect from 127.0.0.2 and the proxy's transparent socket can bind
that address with no routing at all; a proxy that does not connect from its client's address connects from
127.0.0.1. The same mode across real routing (namespaces, policy routing) is tests/integration/test_transparent.py.
"""

from __future__ import annotations

import asyncio

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.relay import transparent
from tests.support.net import free_port, silent_backend, tcp_server
from tests.support.process import open_fds
from tests.support.proxy import listen_addr, proxy_config, run_proxy, service_config
from tests.support.waiting import wait_for

HELLO = b"AMQP\x00\x00\x09\x01"
CLIENT_IP = "127.0.0.2"


async def report_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that answers the hello with the address it sees the connection come from."""
    await reader.readexactly(len(HELLO))
    writer.write(writer.get_extra_info("peername")[0].encode() + b"\n")
    await writer.drain()


async def peer_seen(addr: tuple[str, int]) -> str:
    reader, writer = await asyncio.open_connection(*addr, local_addr=(CLIENT_IP, 0))
    try:
        writer.write(HELLO)
        async with asyncio.timeout(20):
            return (await reader.readline()).decode().strip()
    finally:
        writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("source_address", "expected"), [("client", CLIENT_IP), ("", "127.0.0.1")])
async def test_the_backend_sees_the_clients_address(source_address: str, expected: str) -> None:
    async with (
        tcp_server(report_peer) as port,
        run_proxy(
            service_config([{"name": "b", "address": "127.0.0.1", "port": port}], source_address=source_address)
        ) as proxy,
    ):
        assert await peer_seen(listen_addr(proxy)) == expected
        service = proxy.services["amqp"]
        await wait_for(lambda: service.active == 0, what="the connection to end")
        assert service.pool.by_name["b"].total == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", ["refused", "timeout"])
async def test_a_failed_transparent_connect_leaves_no_socket_behind(failure: str) -> None:
    """A refused connect, and one cancelled by its deadline, close the socket made for it."""

    async def run(port: int) -> None:
        svc = service_config(
            [{"name": "b", "address": "127.0.0.1", "port": port}],
            source_address="client",
            retries=0,
            connect_timeout=1.0,
        )
        async with run_proxy(svc) as proxy:
            service = proxy.services["amqp"]
            before = open_fds()
            clients = []
            for _ in range(5):
                reader, writer = await asyncio.open_connection(*listen_addr(proxy), local_addr=(CLIENT_IP, 0))
                writer.write(HELLO)
                clients.append((reader, writer))
            for reader, _ in clients:
                async with asyncio.timeout(20):
                    assert await reader.read() == b""  # closed by the proxy: no backend
            for _, writer in clients:
                writer.close()
            await wait_for(lambda: service.active == 0, what="the connections to end")
            assert service.pool.by_name["b"].connect_errors == 5
            assert service.ended[CloseReason.CONNECT_FAILED] == 5
            # The clients' own sockets are gone too, so the process is back where it was.
            await wait_for(lambda: open_fds() <= before, what=f"descriptors back to {before} (now {open_fds()})")

    if failure == "refused":
        await run(free_port())
    else:
        with silent_backend() as port:
            await run(port)


@pytest.mark.asyncio
async def test_a_process_that_cannot_set_ip_transparent_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up check names the key; a reload that adds a transparent service is refused the same way.

    Here the option number is made one the kernel rejects; tests/integration/test_transparent.py runs the real
    thing, a process without CAP_NET_ADMIN.
    """
    monkeypatch.setattr(transparent, "IP_TRANSPARENT", 12345)
    backends = [{"name": "b", "address": "127.0.0.1", "port": free_port()}]
    with pytest.raises(config_mod.ConfigError) as info:
        async with run_proxy(service_config(backends, source_address="client")):
            pass
    assert info.value.errors[0].startswith("services['amqp'].source_address: \"client\" (transparent mode) needs")
    assert "CAP_NET_ADMIN" in info.value.errors[0]

    async with run_proxy(service_config(backends)) as proxy:
        new = config_mod.validate(
            proxy_config(
                service_config(backends, listen=proxy.config.services[0].listen),
                service_config(backends, name="tp", source_address="client"),
            )
        )
        with pytest.raises(config_mod.ConfigError) as info:
            await proxy.reload(new)
        assert info.value.errors[0].startswith("services['tp'].source_address:")
        assert set(proxy.services) == {"amqp"}

"""Garbage and truncated AMQP handshakes through a running proxy: the reader steps aside, the bytes still flow.

An AMQP service (the default) in front of a plain TCP echo backend: whatever a client sends must come back
unchanged, whether or not it is a handshake the reader can follow.
"""

from __future__ import annotations

import asyncio

import pytest

from rabbitproxy.protocols.amqp import PROTOCOL_HEADER
from tests.support.net import echo_handler, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for
from tests.unit.test_amqp_handshake import client_steps

HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
START_OK = client_steps()[1]

CASES = {
    "not AMQP at all": b"GET / HTTP/1.1\r\nHost: rabbit\r\n\r\n" + bytes(range(256)),
    "half a protocol header": PROTOCOL_HEADER[:5],
    "header then a truncated start-ok": PROTOCOL_HEADER + START_OK[: len(START_OK) // 2],
    "header then a frame with a bad end octet": PROTOCOL_HEADER + START_OK[:-1] + b"\x00" + b"tail" * 10,
    "header then a frame claiming 4 GiB": PROTOCOL_HEADER + b"\x01\x00\x00\xff\xff\xff\xf0" + b"x" * 1000,
    "70 KiB of heartbeats before open": PROTOCOL_HEADER + HEARTBEAT_FRAME * (70 * 1024 // 8),
    "a whole client side (no broker answers)": b"".join(client_steps()),
}


async def echo_through(addr: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(payload + b"<end>")
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload) + 5), 30)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_garbage_and_truncated_handshakes_still_flow() -> None:
    async with (
        tcp_server(echo_handler) as port,
        run_proxy(service_config([{"name": "echo", "address": "127.0.0.1", "port": port}])) as p,
    ):
        addr = listen_addr(p)
        service = p.services["amqp"]
        for name, payload in CASES.items():
            got = await echo_through(addr, payload)
            assert got == payload + b"<end>", name
        # Every case made the reader give up (and was counted): for the whole client side it was the echo, which
        # is no broker's half of a handshake.
        assert service.handshakes_given_up == len(CASES)
        # A client that leaves halfway through its handshake costs nothing either.
        _, writer = await asyncio.open_connection(*addr)
        writer.write(PROTOCOL_HEADER + START_OK[:10])
        await writer.drain()
        writer.close()
        await wait_for(lambda: service.active == 0, what="every connection closed")
        assert await echo_through(addr, b"still here") == b"still here<end>"
        assert service.failed_logins == 0 and service.vhost_open == {}

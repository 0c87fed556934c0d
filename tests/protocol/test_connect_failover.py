"""A connect that fails in an unexpected way, or whose backend stops being usable meanwhile, sends the client on.

A real :class:`rabbitproxy.relay.service.Service` on loopback in front of small in-process TCP backends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.relay.service import Service
from tests.helpers import echo_handler, free_port, tcp_server, wait_for

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

"""proxy_protocol_from on a real service over loopback: trusted headers are honoured, others refused, all timed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.proxy_header import build_v2
from rabbitproxy.relay import service as service_mod
from rabbitproxy.relay.service import Service
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.waiting import wait_for

HELLO = b"AMQP\x00\x00\x09\x01"
HEADER = build_v2(("203.0.113.9", 5555), ("198.51.100.1", 5672))


@contextlib.asynccontextmanager
async def running(**extra: Any) -> AsyncIterator[Service]:
    """A started service that accepts PROXY headers, in front of one echo backend."""
    async with tcp_server(echo_handler) as port:
        data: dict[str, Any] = {
            "name": "t",
            "listen": f"127.0.0.1:{free_port()}",
            "health_check": {"type": "none"},
            "accept_proxy_protocol": True,
            "backends": [{"name": "b1", "address": "127.0.0.1", "port": port}],
        }
        data.update(extra)
        service = Service(config_mod.ServiceConfig.model_validate(data))
        await service.start()
        try:
            yield service
        finally:
            await service.drain(0)


async def talk(service: Service, payload: bytes, expect: int) -> bytes:
    """Send ``payload``; return up to ``expect`` bytes of the answer, fewer if the proxy closes first."""
    reader, writer = await asyncio.open_connection(*service.bound[0])
    try:
        writer.write(payload)
        out = b""
        async with asyncio.timeout(20):
            while len(out) < expect and (chunk := await reader.read(expect - len(out))):
                out += chunk
        return out
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_a_header_from_a_trusted_source_is_honoured() -> None:
    async with running(proxy_protocol_from=["127.0.0.0/8"]) as service:
        reader, writer = await asyncio.open_connection(*service.bound[0])
        try:
            writer.write(HEADER + HELLO)
            async with asyncio.timeout(20):
                # The header is consumed, not forwarded: the echo backend returns only the hello.
                assert await reader.readexactly(len(HELLO)) == HELLO
            (conn,) = service.connections
            assert conn.client_addr == "203.0.113.9:5555"
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_a_header_from_an_untrusted_source_is_closed_with_its_reason() -> None:
    async with running(proxy_protocol_from=["10.0.0.0/8", "2001:db8::/32"]) as service:
        assert await talk(service, HEADER + HELLO, len(HELLO)) == b""
        await wait_for(lambda: service.ended[CloseReason.UNTRUSTED_PROXY_HEADER] == 1, what="untrusted header")
        # The same source without a header is an ordinary client.
        assert await talk(service, HELLO, len(HELLO)) == HELLO


@pytest.mark.asyncio
async def test_the_header_has_a_deadline_when_client_hello_timeout_is_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_mod, "PROXY_HEADER_TIMEOUT", 0.3)
    async with running(proxy_protocol_from=["127.0.0.0/8"], client_hello_timeout=0) as service:
        # Half a header and then silence: the proxy closes the connection (read returns EOF) instead of waiting.
        assert await talk(service, HEADER[:7], 1) == b""
        await wait_for(lambda: service.ended[CloseReason.HELLO_TIMEOUT] == 1, what="header deadline")

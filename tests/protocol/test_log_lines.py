"""The proxy's own log, written to a file as in production: every line logfmt, IPv6 addresses in brackets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rabbitproxy import logs
from tests.support.logfmt import parse
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


@pytest.mark.asyncio
async def test_an_ipv6_connection_is_logged_with_bracketed_addresses(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    with path.open("w") as out:
        logs.setup("info", "console", out)
        try:
            async with (
                tcp_server(echo_handler, host="::1") as backend_port,
                run_proxy(
                    service_config(
                        [{"name": "b1", "address": "::1", "port": backend_port}], listen=f"[::1]:{free_port('::1')}"
                    )
                ) as proxy,
            ):
                reader, writer = await asyncio.open_connection(*listen_addr(proxy))
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                client_port = writer.get_extra_info("sockname")[1]
                writer.close()
                await wait_for(lambda: "connection closed" in path.read_text(), what="the connection's log line")
        finally:
            logs.setup("info", "console")
    lines = [parse(line) for line in path.read_text().splitlines()]
    closed = [line for line in lines if line["event"] == "connection closed"]
    assert len(closed) == 1
    assert closed[0]["backend_addr"] == f"[::1]:{backend_port}"
    assert closed[0]["client"] == f"[::1]:{client_port}"
    assert closed[0]["local"].startswith("[::1]:")

"""Issue 26 with ``workers = N`` as real processes: the state file, the admin socket, the read token, STATUS=.

The parent serves the admin API; what it is told must reach the workers, and what it restores at start must be in
force in every worker before the first client. TCP backends in this loop greet each connection with a one-letter tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rabbitproxy.cli import app
from tests.support.net import free_port, tcp_server
from tests.support.process import ProxyProcess
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for_sync

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_factories=["asyncio"])]

READER = "reader-token-i26b"


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes) -> None:
    writer.write(tag)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@contextlib.asynccontextmanager
async def two_backends() -> AsyncIterator[list[dict[str, Any]]]:
    async with (
        tcp_server(lambda r, w: greet(r, w, b"a")) as pa,
        tcp_server(lambda r, w: greet(r, w, b"b")) as pb,
    ):
        yield [
            {"name": "a", "address": "127.0.0.1", "port": pa, "weight": 100},
            {"name": "b", "address": "127.0.0.1", "port": pb, "weight": 100},
        ]


def config(entries: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    admin = {
        "listen": f"127.0.0.1:{free_port()}",
        "read_token": READER,
        "socket": str(tmp_path / "admin.sock"),
        "state_file": str(tmp_path / "state.json"),
    }
    data = proxy_config(service_config(entries, protocol="tcp"), admin=admin)
    data["workers"] = 2
    return data


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={})


async def tags(addr: tuple[str, int], n: int) -> list[bytes]:
    """Open ``n`` clients at once and say where each landed (SO_REUSEPORT spreads them over the workers)."""
    conns = [await asyncio.open_connection(*addr) for _ in range(n)]
    try:
        return [await asyncio.wait_for(r.readexactly(1), 10) for r, _ in conns]
    finally:
        for _, w in conns:
            w.close()


async def test_the_state_file_and_the_admin_socket_with_workers(tmp_path: Path) -> None:
    async with two_backends() as entries:
        data = config(entries, tmp_path)
        sock = f"unix:{data['admin']['socket']}"
        proxy = ProxyProcess(data, tmp_path)
        await asyncio.to_thread(proxy.start)
        try:
            # The read token may look, not change; the socket may do both, with no token at all.
            url = "http://" + data["admin"]["listen"]
            res = await asyncio.to_thread(
                CliRunner().invoke, app, ["backend", "drain", "amqp", "a", "--admin", url],
                env={"RABBITPROXY_ADMIN_TOKEN": READER},
            )  # fmt: skip
            assert res.exit_code == 1 and "read-only token" in res.output
            res = await asyncio.to_thread(cli, "backend", "drain", "amqp", "a", "--admin", sock)
            assert res.exit_code == 0, res.output
            res = await asyncio.to_thread(cli, "backend", "weight", "amqp", "b", "30", "--admin", sock)
            assert res.exit_code == 0, res.output
            assert set(await tags(proxy.addr, 8)) == {b"b"}
        finally:
            assert await asyncio.to_thread(proxy.stop) == 0
        doc = json.loads((tmp_path / "state.json").read_text())
        assert doc["services"]["amqp"] == {
            "a": {"state": "drain"},
            "b": {"state": "ready", "weight": 30, "file_weight": 100},
        }
        # Started again: the parent restores the state before its workers take the first client.
        proxy = ProxyProcess(data, tmp_path)
        await asyncio.to_thread(proxy.start)
        try:
            assert set(await tags(proxy.addr, 8)) == {b"b"}
            res = await asyncio.to_thread(cli, "status", "--admin", sock)
            assert res.exit_code == 0, res.output
            assert "drain" in res.output and "30*" in res.output
            res = await asyncio.to_thread(cli, "backend", "ready", "amqp", "a", "--admin", sock)
            assert res.exit_code == 0, res.output
            assert b"a" in set(await tags(proxy.addr, 8))
        finally:
            assert await asyncio.to_thread(proxy.stop) == 0


async def test_status_and_the_watchdog_reach_systemd_from_the_parent_of_workers(tmp_path: Path) -> None:
    async with two_backends() as entries:
        # WatchdogSec=2: a keep-alive every second, with STATUS= in the same datagram.
        proxy = ProxyProcess(config(entries, tmp_path), tmp_path, env={"WATCHDOG_USEC": "2000000"})
        await asyncio.to_thread(proxy.start, True)
        messages: list[str] = []
        try:

            def seen() -> bool:
                messages.extend(proxy.notices())
                return sum(m.startswith("WATCHDOG=1\n") for m in messages) >= 3

            await asyncio.to_thread(wait_for_sync, seen, 60, what="three WATCHDOG=1")
            assert "STATUS=1 service(s), 2/2 backend(s) up, 0 connection(s)" in messages[-1]
            addr = proxy.addr
            conns = [await asyncio.open_connection(*addr) for _ in range(3)]
            for r, _ in conns:
                await asyncio.wait_for(r.readexactly(1), 10)

            def counted() -> bool:
                messages.extend(proxy.notices())
                return "3 connection(s)" in messages[-1]

            # The workers' connections, summed by the parent.
            await asyncio.to_thread(wait_for_sync, counted, 60, what="STATUS= with 3 connections")
            for _, w in conns:
                w.close()
        finally:
            assert await asyncio.to_thread(proxy.stop) == 0

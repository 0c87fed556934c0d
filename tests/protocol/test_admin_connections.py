"""GET and DELETE /api/connections over real HTTP, against a proxy in this loop in front of TCP echo backends.

Closing through the broker is exercised against a stand-in management API (an aiohttp server in this loop that
records what it was asked); the real broker's 320 is in tests/integration/test_connections_live.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import Connection
from rabbitproxy.control.supervisor import Supervisor
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

TOKEN = "conn-token"


class FakeManagement:
    """A management API that answers DELETE /api/connections/{name} with ``status`` and records the calls."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.calls: list[tuple[str, str]] = []

    async def delete(self, request: web.Request) -> web.Response:
        self.calls.append((request.match_info["name"], request.headers.get("X-Reason", "")))
        if self.status == 404:
            # What RabbitMQ answers for a connection it does not know.
            return web.json_response({"error": "Object Not Found", "reason": "Not Found"}, status=404)
        return web.Response(status=self.status)


@contextlib.asynccontextmanager
async def fake_management(status: int = 204) -> AsyncIterator[tuple[FakeManagement, int]]:
    fake = FakeManagement(status)
    app = web.Application()
    app.router.add_delete("/api/connections/{name}", fake.delete)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield fake, port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def proxy_with_admin(**service_extra: Any) -> AsyncIterator[tuple[Supervisor, str]]:
    async with tcp_server(echo_handler) as p1, tcp_server(echo_handler) as p2:
        backends = [
            {"name": "echo1", "address": "127.0.0.1", "port": p1},
            {"name": "echo2", "address": "127.0.0.1", "port": p2},
        ]
        admin_port = free_port()
        async with run_proxy(
            service_config(backends, **service_extra), admin={"listen": f"127.0.0.1:{admin_port}", "token": TOKEN}
        ) as proxy:
            yield proxy, f"http://127.0.0.1:{admin_port}"


async def echo_client(proxy: Supervisor, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*listen_addr(proxy))
    writer.write(payload)
    assert await reader.readexactly(len(payload)) == payload
    return reader, writer


def _http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})


async def _get(http: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, Any]:
    async with http.get(url, params=params) as resp:
        return resp.status, await resp.json()


@pytest.mark.asyncio
async def test_list_filter_sort_and_page_live_connections() -> None:
    async with proxy_with_admin() as (proxy, url), _http() as http:
        clients = [await echo_client(proxy, b"x" * size) for size in (10, 3000, 200)]
        ports = [w.get_extra_info("sockname")[1] for _, w in clients]
        try:
            status, data = await _get(http, f"{url}/api/connections")
            assert status == 200
            assert data["total"] == 3
            # The oldest first: the order the clients came in.
            assert [c["client"] for c in data["connections"]] == [f"127.0.0.1:{p}" for p in ports]
            ids = [c["id"] for c in data["connections"]]
            assert ids == sorted(ids) and len(set(ids)) == 3
            first = data["connections"][0]
            assert first["service"] == "amqp"
            assert first["backend"] in ("echo1", "echo2")
            assert (first["bytes_in"], first["bytes_out"]) == (10, 10)
            assert first["age"] >= 0
            # Plain TCP clients: no handshake was read, so no identity.
            assert first["user"] is None and first["connection_name"] is None

            _, data = await _get(http, f"{url}/api/connections", sort="bytes_out")
            assert [c["bytes_out"] for c in data["connections"]] == [3000, 200, 10]
            _, data = await _get(http, f"{url}/api/connections", sort="bytes_in", order="asc", limit="2")
            assert [c["bytes_in"] for c in data["connections"]] == [10, 200]
            assert (data["total"], data["next_offset"]) == (3, 2)
            _, data = await _get(http, f"{url}/api/connections", sort="bytes_in", order="asc", limit="2", offset="2")
            assert [c["bytes_in"] for c in data["connections"]] == [3000]
            assert data["next_offset"] is None

            backend = first["backend"]
            pool = proxy.services["amqp"].pool
            _, data = await _get(http, f"{url}/api/connections", backend=backend)
            assert data["total"] == pool.by_name[backend].active
            assert {c["backend"] for c in data["connections"]} == {backend}
            _, data = await _get(http, f"{url}/api/connections", service="nope")
            assert data["total"] == 0
            _, data = await _get(http, f"{url}/api/connections", user="alice")
            assert data["total"] == 0

            status, one = await _get(http, f"{url}/api/connections/{ids[1]}")
            assert status == 200 and one["client"] == f"127.0.0.1:{ports[1]}"
        finally:
            for _, w in clients:
                w.close()


@pytest.mark.asyncio
async def test_bad_queries_unknown_ids_and_the_token() -> None:
    async with proxy_with_admin() as (_, url), _http() as http:
        status, data = await _get(http, f"{url}/api/connections", limit="5000", sort="weight")
        assert status == 400
        assert any("limit" in e for e in data["errors"]) and any("sort" in e for e in data["errors"])
        for bad in ("12345", "abc", "-1"):
            status, data = await _get(http, f"{url}/api/connections/{bad}")
            assert status == 404, bad
            async with http.delete(f"{url}/api/connections/{bad}") as resp:
                assert resp.status == 404, bad
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.get(f"{url}/api/connections") as resp:
                assert resp.status == 401
            async with anonymous.delete(f"{url}/api/connections/1") as resp:
                assert resp.status == 401
        # A browser on another site cannot close connections even with a token it somehow has.
        async with http.delete(f"{url}/api/connections/1", headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403


@pytest.mark.asyncio
async def test_delete_without_rabbitmq_closes_by_tcp_with_the_reason_logged() -> None:
    async with proxy_with_admin() as (proxy, url), _http() as http:
        keep_reader, keep = await echo_client(proxy, b"stay")
        reader, writer = await echo_client(proxy, b"go")
        _, data = await _get(http, f"{url}/api/connections", sort="age", order="asc", limit="1")
        victim = data["connections"][0]
        assert victim["client"] == f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
        with capture_logs() as logs:
            async with http.delete(
                f"{url}/api/connections/{victim['id']}", params={"reason": "patching\nrabbit2"}
            ) as resp:
                assert resp.status == 200
                result = await resp.json()
        assert result == {
            "id": victim["id"],
            "service": "amqp",
            "reason": "patching rabbit2",
            "via": "tcp",
            "detail": "no [services.rabbitmq]",
        }
        # The client sees its connection end; the other client is untouched.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        service = proxy.services["amqp"]
        await wait_for(lambda: service.ended[CloseReason.OPERATOR_CLOSE] == 1, what="counted as operator close")
        [event] = [e for e in logs if e["event"] == "connection closed by operator"]
        assert (event["id"], event["reason"], event["via"], event["client"]) == (
            victim["id"],
            "patching rabbit2",
            "tcp",
            victim["client"],
        )
        keep.write(b"again")
        assert await keep_reader.readexactly(5) == b"again"
        # The id is gone with the connection.
        async with http.delete(f"{url}/api/connections/{victim['id']}") as resp:
            assert resp.status == 404
        async with http.delete(f"{url}/api/connections/{victim['id']}", params={"reason": "x" * 201}) as resp:
            assert resp.status == 400
            assert "reason: at most 200 characters" in (await resp.json())["error"]
        keep.close()
        writer.close()


@pytest.mark.asyncio
async def test_delete_with_rabbitmq_asks_the_broker_by_its_name_for_the_connection() -> None:
    async with fake_management(204) as (fake, mport):
        async with proxy_with_admin(rabbitmq={"management_port": mport}) as (proxy, url), _http() as http:
            reader, writer = await echo_client(proxy, b"hello")
            [conn] = proxy.services["amqp"].connections
            assert conn.backend is not None
            local = conn.backend_endpoints()
            assert local is not None
            async with http.delete(f"{url}/api/connections/{conn.id}", params={"reason": "moving you"}) as resp:
                assert resp.status == 200
                result = await resp.json()
            assert (result["via"], result["detail"]) == ("broker", conn.backend.name)
            # The broker's name: the proxy's address towards it -> its own listener (no PROXY header is sent).
            (lhost, lport), (bhost, bport) = local
            assert fake.calls == [(f"{lhost}:{lport} -> {bhost}:{bport}", "moving you")]
            # The broker closes it, not us: until it does (or the grace period ends) the client stays.
            writer.write(b"still")
            assert await reader.readexactly(5) == b"still"
            writer.close()


@pytest.mark.asyncio
async def test_close_falls_back_to_tcp_when_the_broker_does_not_know_the_connection_or_cannot_be_asked() -> None:
    async with fake_management(404) as (fake, mport):
        # echo1's management API refuses (nothing listens there), echo2's is the stand-in that answers 404.
        dead = free_port()
        async with tcp_server(echo_handler) as p1, tcp_server(echo_handler) as p2:
            backends = [
                {"name": "echo1", "address": "127.0.0.1", "port": p1, "management_port": dead},
                {"name": "echo2", "address": "127.0.0.1", "port": p2, "management_port": mport, "weight": 1},
            ]
            async with run_proxy(service_config(backends, rabbitmq={"management_port": mport})) as proxy:
                reader, writer = await echo_client(proxy, b"abc")
                service = proxy.services["amqp"]
                [conn] = service.connections
                assert conn.backend is not None and conn.backend.name == "echo1"
                outcome = await proxy.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, "bye", young=0)
                assert outcome.via == "tcp"
                assert "echo2: the broker knows no connection" in outcome.detail
                assert len(fake.calls) == 1
                assert await asyncio.wait_for(reader.read(), 10) == b""
                await wait_for(lambda: service.ended[CloseReason.OPERATOR_CLOSE] == 1, what="operator close")
                writer.close()


@pytest.mark.asyncio
async def test_a_young_connection_unknown_to_the_broker_is_asked_for_again() -> None:
    async with fake_management(404) as (fake, mport):
        async with tcp_server(echo_handler) as p1:
            backends = [{"name": "echo1", "address": "127.0.0.1", "port": p1}]
            async with run_proxy(service_config(backends, rabbitmq={"management_port": mport})) as proxy:
                _, writer = await echo_client(proxy, b"abc")
                service = proxy.services["amqp"]
                [conn] = service.connections
                task = asyncio.create_task(
                    proxy.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, "bye", young=60)
                )
                # The management API learns of connections late: a second 404 is asked for, then it knows it.
                await wait_for(lambda: len(fake.calls) >= 2, timeout=30, what="a second DELETE")
                fake.status = 204
                outcome = await asyncio.wait_for(task, 30)
                assert outcome.via == "broker"
                assert conn in service.connections
                writer.close()


def _broker_name(conn: Connection) -> str:
    ends = conn.backend_endpoints()
    assert ends is not None
    (lhost, lport), (bhost, bport) = ends
    return f"{lhost}:{lport} -> {bhost}:{bport}"


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A backend that reads everything (the PROXY header included) and answers nothing.
    while await reader.read(65536):
        pass


@pytest.mark.asyncio
async def test_with_a_proxy_header_the_broker_is_asked_by_the_header_s_two_addresses() -> None:
    # RabbitMQ 3.10.8 behind a PROXY header names a connection by both ends the header gives (the client, and the
    # proxy listener it connected to), not by its own socket (tests/fixtures/management, protocols.management).
    async with fake_management(204) as (fake, mport), tcp_server(_sink) as port:
        backends = [{"name": "b1", "address": "127.0.0.1", "port": port}]
        svc = service_config(backends, rabbitmq={"management_port": mport}, send_proxy_protocol="v1")
        async with run_proxy(svc) as proxy:
            listen = listen_addr(proxy)
            _, writer = await asyncio.open_connection(*listen)
            writer.write(b"AMQP\x00\x00\x09\x01")
            service = proxy.services["amqp"]
            await wait_for(lambda: any(c.backend is not None for c in service.connections), what="attached")
            [conn] = service.connections
            outcome = await proxy.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, "bye")
            assert outcome.via == "broker"
            client = writer.get_extra_info("sockname")
            assert fake.calls == [(f"{client[0]}:{client[1]} -> {listen[0]}:{listen[1]}", "bye")]
            writer.close()


@pytest.mark.asyncio
async def test_an_operator_close_does_not_wait_behind_a_running_maint_batch() -> None:
    # close_rate 0.01: the maint batch closes its first connection and then waits 100 s for the next token. The
    # operator's close goes through the same closer but neither draws from the bucket nor waits for the batch.
    async with fake_management(204) as (fake, mport), tcp_server(echo_handler) as p1:
        backends = [{"name": "echo1", "address": "127.0.0.1", "port": p1}]
        svc = service_config(backends, rabbitmq={"management_port": mport, "close_rate": 0.01, "quorum_guard": False})
        async with run_proxy(svc) as proxy:
            writers = [(await echo_client(proxy, b"x"))[1] for _ in range(3)]
            service = proxy.services["amqp"]
            backend = service.pool.by_name["echo1"]
            proxy.steering.set_state(service, backend, "maint")
            await wait_for(lambda: len(fake.calls) == 1, what="the batch's first close")
            # One the batch has not asked for yet (the stand-in answers 204 but closes nothing).
            asked = fake.calls[0][0]
            conn = next(c for c in backend.connections if _broker_name(c) != asked)
            outcome = await asyncio.wait_for(
                proxy.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, "now"), 10
            )
            assert outcome.via == "broker"
            assert len(fake.calls) == 2 and fake.calls[1][1] == "now"
            assert proxy.steering.stats["amqp"].counts["operator", "broker"] == 1
            for w in writers:
                w.close()

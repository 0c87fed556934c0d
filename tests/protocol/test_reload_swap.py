"""Reload on a running in-process proxy: the swap is atomic, new services serve at once, none while stopping.

Issue 12, defects 5 (a change accepted by the admin API during a reload was lost; connects in flight were credited
to discarded Backend objects), 6 (services added by a reload turned clients away until their first health check)
and 8 (a reload during shutdown bound listeners again).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import Config
from rabbitproxy.control import reload as reload_mod
from rabbitproxy.control.reload import ReloadRefusedError
from rabbitproxy.control.supervisor import Supervisor
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

HELLO = b"AMQP\x00\x00\x09\x01"


def full_config(*services: dict[str, Any], admin_port: int | None = None) -> Config:
    admin: dict[str, Any] = {"enabled": False} if admin_port is None else {"listen": f"127.0.0.1:{admin_port}"}
    return config_mod.validate({"services": list(services), "admin": admin}, "test")


@contextlib.asynccontextmanager
async def proxy_with_admin(*services: dict[str, Any]) -> AsyncIterator[tuple[Supervisor, str, int]]:
    admin_port = free_port()
    async with run_proxy(*services, admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy:
        yield proxy, f"http://127.0.0.1:{admin_port}", admin_port


async def echoed(host: str, port: int) -> bytes:
    """What an AMQP hello sent through the proxy brings back (b"" when the proxy closed the connection)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(HELLO)
        try:
            return await asyncio.wait_for(reader.read(len(HELLO)), 30)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def slow_http_check(delay: float) -> AsyncIterator[int]:
    """An HTTP health endpoint that answers 200 only after ``delay`` seconds; yields its port."""

    async def ok(_: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port
    finally:
        await runner.cleanup()


def slow_check(port: int) -> dict[str, Any]:
    return {"type": "http", "url": "http://{address}:{port}/health", "interval": 30.0, "timeout": 5.0}


# -- defect 5: atomic swap ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_patch_landing_while_a_reload_awaits_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATCH answered while the reload waits for the old monitors to end must survive the reload."""
    async with tcp_server(echo_handler) as e1, tcp_server(echo_handler) as e2:
        backends = [
            {"name": "b1", "address": "127.0.0.1", "port": e1},
            {"name": "b2", "address": "127.0.0.1", "port": e2},
        ]
        svc = service_config(backends, connect_timeout=5.0)
        async with proxy_with_admin(svc) as (proxy, url, admin_port), aiohttp.ClientSession() as http:
            answers: list[int] = []
            real = reload_mod.cancel_and_wait

            async def patch_in_the_window(tasks: Iterable[asyncio.Task[Any]]) -> None:
                # Waiting for cancelled monitors is an await inside the reload: an API request can be served here.
                if not answers:
                    for body in ({"weight": 7}, {"state": "drain"}):
                        async with http.patch(f"{url}/api/services/amqp/backends/b1", json=body) as resp:
                            answers.append(resp.status)
                await real(tasks)

            monkeypatch.setattr(reload_mod, "cancel_and_wait", patch_in_the_window)
            await proxy.reload(full_config(dict(svc, connect_timeout=6.0), admin_port=admin_port))
            assert answers == [200, 200]
            b1 = proxy.services["amqp"].pool.by_name["b1"]
            assert (b1.configured_weight, b1.operator_state) == (7, "drain"), "a change answered with 200 was lost"
            async with http.get(f"{url}/api/services/amqp/backends/b1") as resp:
                view = await resp.json()
            assert (view["weight"], view["admin_state"]) == (7, "drain")


@pytest.mark.asyncio
async def test_patches_hammered_against_reloads_are_never_lost() -> None:
    async with tcp_server(echo_handler) as e1, tcp_server(echo_handler) as e2, tcp_server(echo_handler) as e3:
        base = [{"name": "b1", "address": "127.0.0.1", "port": e1}, {"name": "b2", "address": "127.0.0.1", "port": e2}]
        extra = {"name": "b3", "address": "127.0.0.1", "port": e3}
        # Real monitors (tcp checks), so the reload has tasks to cancel and first checks of b3 to wait for.
        check = {"type": "tcp", "interval": 0.2, "timeout": 2.0}
        svc = service_config(base, health_check=check)
        async with proxy_with_admin(svc) as (proxy, url, admin_port), aiohttp.ClientSession() as http:

            async def patch(backend: str, body: dict[str, Any]) -> int:
                async with http.patch(f"{url}/api/services/amqp/backends/{backend}", json=body) as resp:
                    return resp.status

            states = ("drain", "ready", "maint")
            for i in range(50):
                # Every round changes the service (b3 comes and goes, connect_timeout alternates), so every reload
                # builds a new pool and swaps it in while the PATCHes are being served.
                changed = dict(svc, backends=base + [extra] * (i % 2), connect_timeout=5.0 + i % 3)
                weight, state = 1 + i, states[i % 3]
                answers = await asyncio.gather(
                    patch("b1", {"weight": weight}),
                    proxy.reload(full_config(changed, admin_port=admin_port)),
                    patch("b2", {"state": state}),
                    patch("b1", {"state": state}),
                )
                assert [answers[0], answers[2], answers[3]] == [200, 200, 200]
                pool = proxy.services["amqp"].pool
                b1, b2 = pool.by_name["b1"], pool.by_name["b2"]
                assert (b1.configured_weight, b1.operator_state, b2.operator_state) == (weight, state, state), (
                    f"round {i}: a change the API accepted is missing"
                )


class GatedLoop:
    """The service's loop, except that backend connects wait for ``gate``: a connect held in flight at will."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self.gate.wait()
        return await self._loop.create_connection(*args, **kwargs)


@pytest.mark.asyncio
async def test_a_connect_in_flight_across_a_reload_is_credited_to_the_new_backend() -> None:
    async with tcp_server(echo_handler) as echo:
        svc = service_config([{"name": "a", "address": "127.0.0.1", "port": echo, "max_connections": 5}])
        async with run_proxy(svc) as proxy:
            service = proxy.services["amqp"]
            gated = GatedLoop(service.loop)
            service.loop = gated  # type: ignore[assignment]
            host, port = listen_addr(proxy)
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(HELLO)
                old = service.pool.by_name["a"]
                await wait_for(lambda: old.connecting == 1, what="the connect in flight")
                await proxy.reload(full_config(dict(svc, connect_timeout=9.0)))
                new = service.pool.by_name["a"]
                assert new is not old
                # max_connections counts connects in flight: the count must be on the object the pool now uses.
                assert new.connecting == 1 and old.connecting == 0
                gated.gate.set()
                assert await asyncio.wait_for(reader.readexactly(len(HELLO)), 30) == HELLO
                (conn,) = service.connections
                assert conn.backend is new and new.total == 1
            finally:
                gated.gate.set()
                writer.close()
            await wait_for(lambda: service.active == 0, what="the connection closed")
            assert (new.traffic_in, new.traffic_out) == (len(HELLO), len(HELLO))
            assert all(b.connecting == 0 for b in (old, new))
            service.loop = gated._loop


# -- defect 6: reload-added services serve at once ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_service_added_by_a_reload_serves_its_first_client() -> None:
    async with tcp_server(echo_handler) as echo, slow_http_check(0.5) as check_port:
        first = service_config([{"name": "a", "address": "127.0.0.1", "port": echo}])
        async with run_proxy(first) as proxy:
            added = service_config(
                [{"name": "b", "address": "127.0.0.1", "port": echo, "check_port": check_port}],
                name="added",
                health_check=slow_check(check_port),
            )
            result = await proxy.reload(full_config(first, added))
            assert result.added == ["added"]
            # Right after the reload returns, the first client is served, not turned away with "no backend".
            assert await echoed(*listen_addr(proxy, "added")) == HELLO
            assert proxy.services["added"].ended[CloseReason.NO_BACKEND] == 0


@pytest.mark.asyncio
async def test_a_service_whose_backends_all_moved_keeps_serving_across_the_reload() -> None:
    async with tcp_server(echo_handler) as e1, tcp_server(echo_handler) as e2, slow_http_check(0.5) as check_port:
        before = service_config([{"name": "old", "address": "127.0.0.1", "port": e1}])
        async with run_proxy(before) as proxy:
            host, port = listen_addr(proxy)
            moved = dict(
                before,
                backends=[{"name": "new", "address": "127.0.0.1", "port": e2, "check_port": check_port}],
                health_check=slow_check(check_port),
            )
            result = await proxy.reload(full_config(moved))
            assert result.changed == ["amqp"]
            assert await echoed(host, port) == HELLO
            service = proxy.services["amqp"]
            assert service.pool.by_name["new"].total == 1 and service.ended[CloseReason.NO_BACKEND] == 0


# -- defect 8: no reload while stopping -----------------------------------------------------------------------------


def port_is_bound(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.asyncio
async def test_a_reload_after_shutdown_began_is_refused_and_binds_nothing() -> None:
    async with tcp_server(echo_handler) as echo:
        svc = service_config([{"name": "a", "address": "127.0.0.1", "port": echo}], shutdown_timeout=30.0)
        async with proxy_with_admin(svc) as (proxy, url, admin_port), aiohttp.ClientSession() as http:
            # An open connection keeps the drain (and so the admin API) going while the reloads are tried.
            reader, writer = await asyncio.open_connection(*listen_addr(proxy))
            added = service_config([{"name": "b", "address": "127.0.0.1", "port": echo}], name="added")
            new_port = config_mod.split_host_port(added["listen"])[1]
            try:
                writer.write(HELLO)
                await reader.readexactly(len(HELLO))
                shutdown = asyncio.create_task(proxy.shutdown())
                await wait_for(lambda: proxy.state == "stopping", what="shutdown begun")
                with pytest.raises(ReloadRefusedError):
                    await proxy.reload(full_config(svc, added, admin_port=admin_port))
                async with http.post(f"{url}/api/reload", json={}) as resp:
                    assert resp.status == 409
                    assert "shutting down" in (await resp.json())["error"]
            finally:
                writer.close()
            await asyncio.wait_for(shutdown, 60)
            assert "added" not in proxy.services
            assert not port_is_bound(new_port)


@pytest.mark.asyncio
async def test_a_reload_caught_by_the_shutdown_while_it_waits_binds_nothing() -> None:
    async with tcp_server(echo_handler) as echo, slow_http_check(2.0) as check_port:
        svc = service_config([{"name": "a", "address": "127.0.0.1", "port": echo}])
        async with run_proxy(svc) as proxy:
            added = service_config(
                [{"name": "b", "address": "127.0.0.1", "port": echo, "check_port": check_port}],
                name="added",
                health_check=slow_check(check_port),
            )
            new_port = config_mod.split_host_port(added["listen"])[1]
            reload: Awaitable[Any] = asyncio.create_task(proxy.reload(full_config(svc, added)))
            # The reload has bound the new port and waits for the new backend's first check.
            await wait_for(lambda: port_is_bound(new_port), what="the new listener bound")
            await proxy.shutdown()
            with pytest.raises(ReloadRefusedError):
                await reload
            assert "added" not in proxy.services
            assert not port_is_bound(new_port)

"""The node monitor inside a running proxy, against a small fake management API on loopback: it runs only with
[services.rabbitmq], its session is the supervisor's and is closed by a reload that drops the table and at shutdown."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from rabbitproxy import config as config_mod
from tests.support.net import free_port
from tests.support.proxy import run_proxy, service_config
from tests.support.waiting import wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "management"


def _body(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())["body"]


class FakeManagement:
    """Answers the node monitor's requests with recorded 3.10.8 answers and counts them."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        path = request.path
        if path == "/api/overview":
            return web.json_response(_body("overview"))
        if path.startswith("/api/nodes/"):
            return web.json_response(_body("node"))
        if path == "/api/health/checks/local-alarms":
            return web.json_response(_body("local_alarms_ok"))
        return web.json_response(_body("ready_to_serve"), status=404)


@asynccontextmanager
async def fake_management() -> AsyncIterator[FakeManagement]:
    fake = FakeManagement()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    fake.port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", fake.port)
    await site.start()
    try:
        yield fake
    finally:
        await runner.cleanup()


def _service(fake: FakeManagement, *, rabbitmq: bool) -> dict[str, Any]:
    # The backend itself is the fake server's port too: a TCP check against it passes, so the checks run on.
    backend = {"name": "rabbit1", "address": "127.0.0.1", "port": fake.port, "management_port": fake.port}
    svc = service_config([backend], health_check={"type": "tcp", "interval": 0.05, "timeout": 2.0})
    if rabbitmq:
        svc["rabbitmq"] = {"interval": 0.05, "timeout": 2.0}
    return svc


@pytest.mark.asyncio
async def test_without_rabbitmq_no_management_api_is_asked() -> None:
    async with fake_management() as fake, run_proxy(_service(fake, rabbitmq=False)) as proxy:
        backend = proxy.services["amqp"].pool.backends[0]
        times: set[float] = set()

        def checked_often() -> bool:
            if backend.health_time is not None:
                times.add(backend.health_time)
            return len(times) >= 5

        await wait_for(checked_often, timeout=30, what="five health checks")
        assert proxy.management == {}
        assert backend.rabbitmq is None
        # Only the TCP checks' connects reached the server: no HTTP request at all.
        assert fake.requests == []


@pytest.mark.asyncio
async def test_the_monitor_runs_and_its_session_is_closed_on_reload_and_shutdown() -> None:
    async with fake_management() as fake:
        svc = _service(fake, rabbitmq=True)
        async with run_proxy(svc) as proxy:
            backend = proxy.services["amqp"].pool.backends[0]
            await wait_for(
                lambda: backend.rabbitmq is not None and backend.rabbitmq.node is not None,
                timeout=30,
                what="the node named by the monitor",
            )
            assert backend.rabbitmq is not None and backend.rabbitmq.version == "3.10.8"
            session = proxy.management["amqp"]
            kinds = sorted(t.get_name() for t in proxy.monitors[id(backend)])
            assert kinds == ["health check amqp/rabbit1", "node monitor amqp/rabbit1"]
            # A reload that only changes the monitor's settings gets a new session; the old one is closed.
            changed = dict(svc, rabbitmq={"interval": 0.05, "timeout": 3.0})
            await proxy.reload(config_mod.validate({"services": [changed], "admin": {"enabled": False}}))
            assert session.closed
            second = proxy.management["amqp"]
            assert not second.closed
            # The new backend object kept what the monitor knew.
            backend = proxy.services["amqp"].pool.backends[0]
            assert backend.rabbitmq is not None and backend.rabbitmq.node is not None
            # A reload without the table stops the monitor and closes the session.
            plain = {k: v for k, v in svc.items() if k != "rabbitmq"}
            await proxy.reload(config_mod.validate({"services": [plain], "admin": {"enabled": False}}))
            assert second.closed
            assert proxy.management == {}
            backend = proxy.services["amqp"].pool.backends[0]
            assert backend.rabbitmq is None
            assert [t.get_name() for t in proxy.monitors[id(backend)]] == ["health check amqp/rabbit1"]
            asked = len(fake.requests)
            # Back with the table, then shut down: that session is closed by the shutdown.
            await proxy.reload(config_mod.validate({"services": [svc], "admin": {"enabled": False}}))
            third = proxy.management["amqp"]
            await wait_for(lambda: len(fake.requests) > asked, timeout=30, what="the monitor asking again")
        assert third.closed

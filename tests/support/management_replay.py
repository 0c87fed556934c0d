"""A management API that answers with the responses recorded from a real RabbitMQ node (tests/fixtures/management).

For tests of what the proxy makes of those answers (metrics, dashboards), not of the node monitor itself, which has
its own tests against live brokers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "management"


def _recorded(name: str) -> web.Response:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return web.json_response(data["body"], status=data["status"])


@asynccontextmanager
async def replayed_management_api(
    node: str = "node_mem_alarm", alarms: str = "local_alarms_failed"
) -> AsyncIterator[int]:
    """Serve the recorded overview, ``node`` and ``alarms`` answers on a free loopback port; yield the port."""

    async def overview(_: web.Request) -> web.Response:
        return _recorded("overview")

    async def node_answer(_: web.Request) -> web.Response:
        return _recorded(node)

    async def local_alarms(_: web.Request) -> web.Response:
        return _recorded(alarms)

    async def ready(_: web.Request) -> web.Response:
        return _recorded("ready_to_serve")

    app = web.Application()
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/nodes/{name}", node_answer)
    app.router.add_get("/api/health/checks/local-alarms", local_alarms)
    app.router.add_get("/api/health/checks/{check}", ready)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port: int = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()

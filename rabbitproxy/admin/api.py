"""The admin API: JSON over HTTP, Prometheus metrics and the System Overview page, inside the proxy's own loop.

It runs on aiohttp's ``AppRunner(handle_signals=False)`` + ``TCPSite`` so that signals stay with ``serve()`` and
the API sees the live :class:`~rabbitproxy.control.supervisor.Supervisor` without any copying or locking: every
handler runs on the same event loop as the data path. It changes backends only through
:class:`~rabbitproxy.balancing.pool.Backend` methods.

This module routes and starts it; the handlers are in ``admin/routes/`` by resource (services and backends,
connections, the rest), who may call them in ``admin/access.py``, what they answer in ``admin/views.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from rabbitproxy.admin.access import admin_token, guard
from rabbitproxy.admin.common import MAX_BODY, PROXY_KEY, REGISTRY_KEY, TOKEN_KEY
from rabbitproxy.admin.metrics import registry_for
from rabbitproxy.admin.routes import connections, services, system
from rabbitproxy.config import ConfigError, split_host_port

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor

log = structlog.get_logger("rabbitproxy.admin")


def make_app(proxy: Supervisor, token: str | None) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[PROXY_KEY] = proxy
    app[TOKEN_KEY] = token
    app[REGISTRY_KEY] = registry_for(proxy)
    app.router.add_get("/", system.overview)
    app.router.add_get("/healthz", system.healthz)
    app.router.add_get("/livez", system.livez)
    app.router.add_get("/metrics", system.metrics)
    app.router.add_get("/api/services", services.list_services)
    app.router.add_get("/api/services/{service}", services.get_service)
    app.router.add_get("/api/services/{service}/backends/{backend}", services.get_backend)
    app.router.add_patch("/api/services/{service}/backends/{backend}", services.patch_backend)
    app.router.add_post("/api/reload", system.reload)
    app.router.add_get("/api/workers", system.workers)
    app.router.add_get("/api/connections", connections.list_connections)
    app.router.add_get("/api/connections/{id}", connections.get_connection)
    app.router.add_delete("/api/connections/{id}", connections.delete_connection)
    return app


class AdminServer:
    """The running admin API; ``cleanup()`` closes its socket and open requests."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        self.runner = runner
        self.site = site

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(str(a[0]), int(a[1])) for a in self.runner.addresses]

    async def cleanup(self) -> None:
        await self.runner.cleanup()


async def start_admin(proxy: Supervisor) -> AdminServer:
    """Start the admin API on ``[admin] listen``; ConfigError if it cannot listen there."""
    cfg = proxy.config.admin
    token = admin_token(cfg)
    host, port = split_host_port(cfg.listen)
    runner = web.AppRunner(make_app(proxy, token), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError([f"admin.listen: cannot listen on {cfg.listen}: {exc.strerror or exc}"]) from None
    server = AdminServer(runner, site)
    log.info("admin API listening", listen=cfg.listen, token=token is not None)
    return server

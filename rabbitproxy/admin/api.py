"""The admin API: JSON over HTTP, Prometheus metrics and the System Overview page, inside the proxy's own loop.

It runs on aiohttp's ``AppRunner(handle_signals=False)`` + ``TCPSite`` so that signals stay with ``serve()`` and
the API sees the live :class:`~rabbitproxy.control.supervisor.Supervisor` without any copying or locking: every
handler runs on the same event loop as the data path. It changes backends only through
:class:`~rabbitproxy.balancing.pool.Backend` methods.

This module routes and starts it; the handlers are in ``admin/routes/`` by resource (services and backends,
connections, the rest), who may call them in ``admin/access.py``, what they answer in ``admin/views.py``.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from rabbitproxy.admin.access import admin_tokens, guard
from rabbitproxy.admin.common import MAX_BODY, PROXY_KEY, READ_TOKEN_KEY, REGISTRY_KEY, TOKEN_KEY
from rabbitproxy.admin.metrics import registry_for
from rabbitproxy.admin.routes import connections, services, system
from rabbitproxy.config import AdminConfig, ConfigError, split_host_port

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor

log = structlog.get_logger("rabbitproxy.admin")


def make_app(proxy: Supervisor, token: str | None, read_token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[PROXY_KEY] = proxy
    app[TOKEN_KEY] = token
    app[READ_TOKEN_KEY] = read_token
    app[REGISTRY_KEY] = registry_for(proxy)
    app.router.add_get("/", system.overview)
    app.router.add_get("/healthz", system.healthz)
    app.router.add_get("/livez", system.livez)
    app.router.add_get("/metrics", system.metrics)
    app.router.add_get("/api/services", services.list_services)
    app.router.add_get("/api/services/{service}", services.get_service)
    app.router.add_get("/api/services/{service}/backends/{backend}", services.get_backend)
    app.router.add_patch("/api/services/{service}/backends/{backend}", services.patch_backend)
    app.router.add_post("/api/services/{service}/backends/{backend}/reset", services.reset_backend)
    app.router.add_post("/api/reload", system.reload)
    app.router.add_get("/api/workers", system.workers)
    app.router.add_get("/api/connections", connections.list_connections)
    app.router.add_get("/api/connections/{id}", connections.get_connection)
    app.router.add_delete("/api/connections/{id}", connections.delete_connection)
    return app


class AdminServer:
    """The running admin API; ``cleanup()`` closes its sockets and open requests."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, socket_path: Path | None = None) -> None:
        self.runner = runner
        self.site = site
        self.socket_path = socket_path

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(str(a[0]), int(a[1])) for a in self.runner.addresses if isinstance(a, tuple)]

    async def cleanup(self) -> None:
        await self.runner.cleanup()
        if self.socket_path is not None:
            _remove_stale_socket(self.socket_path)


async def start_admin(proxy: Supervisor) -> AdminServer:
    """Start the admin API on ``[admin] listen`` (and ``socket``); ConfigError if it cannot listen there."""
    cfg = proxy.config.admin
    tokens = admin_tokens(cfg)
    host, port = split_host_port(cfg.listen)
    runner = web.AppRunner(make_app(proxy, tokens.operator, tokens.read), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    socket_path = None
    try:
        await site.start()
        if cfg.socket:
            await start_socket(runner, cfg)
            socket_path = Path(cfg.socket)
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError([f"admin.listen: cannot listen on {cfg.listen}: {exc.strerror or exc}"]) from None
    except ConfigError:
        await runner.cleanup()
        raise
    server = AdminServer(runner, site, socket_path)
    log.info(
        "admin API listening",
        listen=cfg.listen,
        token=tokens.operator is not None,
        read_token=tokens.read is not None,
        socket=cfg.socket or None,
    )
    return server


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left behind (by a crash, say); never a file of another kind."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


async def start_socket(runner: web.AppRunner, cfg: AdminConfig) -> None:
    """Listen on ``[admin] socket`` with its mode, owner and group; ConfigError naming the key otherwise."""
    path = Path(cfg.socket)
    try:
        uid = pwd.getpwnam(cfg.socket_owner).pw_uid if cfg.socket_owner else -1
        gid = grp.getgrnam(cfg.socket_group).gr_gid if cfg.socket_group else -1
    except KeyError as exc:
        raise ConfigError([f"admin.socket_owner/socket_group: no such user or group: {exc.args[0]}"]) from None
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Created owner-only, then opened up to socket_mode once owner and group are right: never, even for a
        # moment, more open than configured, whatever the process's umask.
        old_umask = os.umask(0o077)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chown(path, uid, gid)
        os.chmod(path, int(cfg.socket_mode, 8))
        site = web.SockSite(runner, sock)
        await site.start()
    except OSError as exc:
        sock.close()
        raise ConfigError([f"admin.socket: cannot listen on {cfg.socket}: {exc.strerror or exc}"]) from None

"""Proxy configs for tests, and the proxy itself run in-process (uvicorn's ``run_server`` pattern).

One way to build a config: :func:`service_config` for a service, :func:`proxy_config` for the whole file. Both
return plain dicts, so a test can write them as TOML for a subprocess or validate them for ``serve()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from rabbitproxy import config as config_mod
from rabbitproxy.app import serve
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.relay.service import Service

from .net import free_port
from .process import to_toml

# A listen address for services that are built but never started, so the pure tiers open no socket for a port.
UNBOUND_LISTEN = "127.0.0.1:5999"


def service_config(
    backends: list[Mapping[str, Any]], *, name: str = "amqp", listen: str | None = None, **extra: Any
) -> dict[str, Any]:
    """One ``[[services]]`` entry: no health checks, a short drain, a free loopback port unless ``listen`` is given."""
    svc: dict[str, Any] = {
        "name": name,
        "listen": listen or f"127.0.0.1:{free_port()}",
        "health_check": {"type": "none"},
        "shutdown_timeout": 5.0,
        "backends": [dict(b) for b in backends],
    }
    svc.update(extra)
    return svc


def proxy_config(*services: Mapping[str, Any], admin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A whole config file's data: the services, and the admin API off unless ``admin`` says otherwise."""
    return {
        "services": [dict(s) for s in services],
        "admin": dict(admin) if admin is not None else {"enabled": False},
    }


def make_service(backends: list[Mapping[str, Any]], **extra: Any) -> Service:
    """A :class:`Service` built from :func:`service_config` but never started: no listener, no loop."""
    extra.setdefault("listen", UNBOUND_LISTEN)
    return Service(config_mod.ServiceConfig.model_validate(service_config(backends, **extra)))


def agent_service(weight: int = 100, on_marked_down: str = "close") -> Service:
    """A never-started service whose one backend ``a`` is steered by a feedback agent, for the feedback tests."""
    return make_service(
        [{"name": "a", "address": "127.0.0.1", "port": 5672, "weight": weight}],
        health_check={"type": "none", "on_marked_down": on_marked_down},
        feedback={"type": "agent"},
    )


@contextlib.asynccontextmanager
async def run_proxy(
    *services: Mapping[str, Any], admin: Mapping[str, Any] | None = None, config_path: Path | None = None
) -> AsyncIterator[Supervisor]:
    """Run ``serve()`` in this loop (uvicorn's ``run_server`` pattern); yields the running :class:`Supervisor`.

    With ``config_path`` the configuration is also written there, so a reload re-reads that file.
    """
    data = proxy_config(*services, admin=admin)
    cfg = config_mod.validate(data, "test")
    if config_path is not None:
        config_path.write_text(to_toml(data))
    stop = asyncio.Event()
    started: asyncio.Future[Supervisor] = asyncio.get_running_loop().create_future()
    run = serve(cfg, config_path=config_path, shutdown_trigger=stop.wait, ready=started.set_result)
    task = asyncio.create_task(run)
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def listen_addr(proxy: Supervisor, service: str = "amqp") -> tuple[str, int]:
    host, port = proxy.services[service].bound[0]
    return host, port

"""The rest of the admin surface: /healthz, /livez, /metrics, the overview page and ``POST /api/reload``."""

from __future__ import annotations

import asyncio
from importlib import resources

import structlog
from aiohttp import web

from rabbitproxy.admin.common import PROXY_KEY, REGISTRY_KEY, error, json_body, who
from rabbitproxy.admin.metrics import render
from rabbitproxy.admin.readiness import health_status
from rabbitproxy.config import ConfigError
from rabbitproxy.control.reload import ReloadRefusedError

log = structlog.get_logger("rabbitproxy.admin")


async def healthz(request: web.Request) -> web.Response:
    status = health_status(request.app[PROXY_KEY])
    return web.json_response({"status": status}, status=200 if status == "ok" else 503)


async def livez(request: web.Request) -> web.Response:
    # Liveness only: the loop answers. A proxy whose nodes are all down is not helped by a restart.
    return web.json_response({"status": "alive", "state": request.app[PROXY_KEY].state})


async def workers(request: web.Request) -> web.Response:
    """The worker processes (``workers = N``): index, pid, listening, serving, restarts (and why), the configuration
    generation each runs. An empty list with one process."""
    ws = request.app[PROXY_KEY].workers
    if ws is None:
        return web.json_response({"workers": []})
    now = asyncio.get_running_loop().time()
    rows = [
        {
            "index": s.index,
            "pid": s.pid,
            "ready": s.ready,
            "serving": s.serving(now),
            "restarts": s.restarts,
            "restart_causes": dict(s.causes),
            "generation": s.generation,
        }
        for s in ws.slots
    ]
    return web.json_response({"workers": rows, "generation": ws.generation, "serving": ws.serving()})


async def reload(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    await json_body(request)
    caller = who(request)
    log.info("reload requested", who=caller, path=str(proxy.config_path) if proxy.config_path else None)
    try:
        result = await proxy.reload()
    except ReloadRefusedError as exc:
        # Not the file's fault: the proxy is stopping. 409, so a client does not "fix" a valid file.
        log.warning("reload refused", reason="; ".join(exc.errors), who=caller)
        return error(409, "; ".join(exc.errors), errors=exc.errors)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays", errors=exc.errors, who=caller)
        return error(400, "invalid configuration; nothing was changed", errors=exc.errors)
    if result.worker_errors:
        # The parent runs the new configuration, and some worker still the old one: not "reloaded". 500, with the
        # workers' reasons, so the operator fixes the cause and reloads again (or restarts).
        log.error("reload incomplete: a worker kept the old configuration", errors=result.worker_errors, who=caller)
        body = {
            "error": "reload incomplete: some workers kept the old configuration",
            "errors": result.worker_errors,
            "status": "incomplete",
            **result.as_dict(),
        }
        return web.json_response(body, status=500)
    return web.json_response({"status": "reloaded", **result.as_dict()})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = render(request.app[REGISTRY_KEY])
    # prometheus-client's content type carries a version parameter that aiohttp wants passed as a header.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def overview(request: web.Request) -> web.Response:
    page = resources.files("rabbitproxy").joinpath("admin/static/overview.html").read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        # The page embeds its own script; nothing may be loaded from elsewhere, and no other site may frame it.
        headers={
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
            ),
            "Cache-Control": "no-store",
        },
    )

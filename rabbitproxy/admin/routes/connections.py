"""``/api/connections``: list, show and close the open connections of every service."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from rabbitproxy.admin import connections
from rabbitproxy.admin.common import PROXY_KEY, error, who
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import Connection

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.admin")


def _live(proxy: Supervisor) -> Iterator[tuple[str, Connection]]:
    """Every open connection of the configured services, with its service's name.

    A service a reload removed is no longer listed while its last connections drain.
    """
    for name, service in proxy.services.items():
        for conn in service.connections:
            yield name, conn


async def _all(proxy: Supervisor) -> list[tuple[str, Connection]]:
    """:func:`_live`, or with ``workers = N`` every worker's connections (asked now, within a deadline)."""
    if proxy.workers is None:
        return list(_live(proxy))
    return list(await proxy.workers.connections())


def _with_workers(proxy: Supervisor, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """With ``workers = N``: each connection's worker (index and pid), found from its id (control.worker)."""
    if proxy.workers is not None:
        for view in views:
            slot = proxy.workers.worker_of(view["id"])
            view["worker"] = slot.index
            view["worker_pid"] = slot.pid
    return views


async def _find_connection(proxy: Supervisor, raw_id: str) -> tuple[Service, Connection]:
    conn_id = int(raw_id) if raw_id.isascii() and raw_id.isdigit() else None
    found = connections.find(await _all(proxy), conn_id) if conn_id is not None else None
    if found is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"no open connection with id {raw_id!r}"}), content_type="application/json"
        )
    return proxy.services[found[0]], found[1]


async def list_connections(request: web.Request) -> web.Response:
    try:
        query = connections.ConnectionQuery.from_params(request.query)
    except connections.QueryError as exc:
        return error(400, str(exc), errors=exc.errors)
    proxy = request.app[PROXY_KEY]
    page = connections.select(await _all(proxy), query, time.monotonic())
    _with_workers(proxy, page["connections"])
    return web.json_response(page)


async def get_connection(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    service, conn = await _find_connection(proxy, request.match_info["id"])
    view = connections.connection_view(service.name, conn, time.monotonic())
    return web.json_response(_with_workers(proxy, [view])[0])


async def delete_connection(request: web.Request) -> web.Response:
    """Close one connection: through the broker (320 and the reason) with [services.rabbitmq], else by TCP."""
    unknown = sorted(set(request.query) - {"reason"})
    if unknown:
        return error(400, f"unknown parameter(s): {', '.join(unknown)} (only reason)")
    try:
        text = connections.reason_text(request.query.get("reason"))
    except ValueError as exc:
        return error(400, str(exc))
    proxy = request.app[PROXY_KEY]
    service, conn = await _find_connection(proxy, request.match_info["id"])
    view = connections.connection_view(service.name, conn, time.monotonic())
    if proxy.workers is not None:
        # The worker that has it closes it, through its own closer (the broker, else TCP).
        found = await proxy.workers.close_one(conn.id, text)
        if found is None:
            return error(404, f"no open connection with id {conn.id}")
        outcome = found
    else:
        outcome = await proxy.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, text)
    fields = {
        "id": view["id"],
        "service": service.name,
        "backend": view["backend"],
        "client": view["client"],
        "user": view["user"],
        "connection_name": view["connection_name"],
        "reason": text,
        "via": outcome.via,
        "detail": outcome.detail,
        "who": who(request),
    }
    if outcome.via == "tcp" and service.config.rabbitmq is not None:
        # Configured to close through the broker and it could not: the client saw a reset, not our reason.
        log.warning("connection closed by TCP, not through the broker", **fields)
    else:
        log.info("connection closed by operator", **fields)
    return web.json_response(
        {"id": view["id"], "service": service.name, "reason": text, "via": outcome.via, "detail": outcome.detail}
    )

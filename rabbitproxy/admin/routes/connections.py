"""``/api/connections``: list, show and close the open connections of every service."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, TypeVar

import structlog
from aiohttp import web

from rabbitproxy.admin.common import PROXY_KEY, error, who
from rabbitproxy.balancing import listing as connections
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import Connection
from rabbitproxy.control import worker_views

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.admin")
T = TypeVar("T")


def _live(proxy: Supervisor) -> Iterator[tuple[str, Connection]]:
    """Every open connection of the configured services, with its service's name.

    A service a reload removed is no longer listed while its last connections drain.
    """
    for name, service in proxy.services.items():
        for conn in service.connections:
            yield name, conn


def _not_found(raw_id: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(
        text=json.dumps({"error": f"no open connection with id {raw_id!r}"}), content_type="application/json"
    )


def _parse_id(raw_id: str) -> int:
    if raw_id.isascii() and raw_id.isdigit():
        return int(raw_id)
    raise _not_found(raw_id)


def _find_here(proxy: Supervisor, raw_id: str) -> tuple[Service, Connection]:
    found = connections.find(_live(proxy), _parse_id(raw_id))
    if found is None:
        raise _not_found(raw_id)
    return proxy.services[found[0]], found[1]


async def list_connections(request: web.Request) -> web.Response:
    try:
        query = connections.ConnectionQuery.from_params(request.query)
    except connections.QueryError as exc:
        return error(400, str(exc), errors=exc.errors)
    proxy = request.app[PROXY_KEY]
    now = time.monotonic()
    if proxy.workers is None:
        return web.json_response(connections.select(_live(proxy), query, now))
    # With workers = N each worker filters, sorts and cuts its own; the parent merges the pages.
    return web.json_response(await worker_views.list_connections(proxy.workers, query, now))


async def get_connection(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    raw_id = request.match_info["id"]
    if proxy.workers is None:
        service, conn = _find_here(proxy, raw_id)
        return web.json_response(connections.connection_view(service.name, conn, time.monotonic()))
    # One request, to the one worker whose ids look like this one (control.worker_views.worker_of).
    view = await _asking(worker_views.find_connection(proxy.workers, _parse_id(raw_id)))
    if view is None:
        raise _not_found(raw_id)
    return web.json_response(view)


async def _asking(answer: Awaitable[T]) -> T:
    try:
        return await answer
    except TimeoutError:
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": "the worker that has this connection did not answer in time"}),
            content_type="application/json",
        ) from None


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
    raw_id = request.match_info["id"]
    if proxy.workers is None:
        service, conn = _find_here(proxy, raw_id)
        view = connections.connection_view(service.name, conn, time.monotonic())
        outcome = await proxy.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, text)
        rabbitmq = service.config.rabbitmq is not None
    else:
        # The worker that has it closes it, through its own closer (the broker, else TCP).
        found = await _asking(worker_views.close_connection(proxy.workers, _parse_id(raw_id), text))
        if found is None:
            raise _not_found(raw_id)
        view, outcome = found
        here = proxy.services.get(view["service"])
        rabbitmq = here is not None and here.config.rabbitmq is not None
    fields = {
        "id": view["id"],
        "service": view["service"],
        "backend": view["backend"],
        "client": view["client"],
        "user": view["user"],
        "connection_name": view["connection_name"],
        "reason": text,
        "via": outcome.via,
        "detail": outcome.detail,
        "who": who(request),
    }
    if outcome.via == "tcp" and rabbitmq:
        # Configured to close through the broker and it could not: the client saw a reset, not our reason.
        log.warning("connection closed by TCP, not through the broker", **fields)
    else:
        log.info("connection closed by operator", **fields)
    return web.json_response(
        {"id": view["id"], "service": view["service"], "reason": text, "via": outcome.via, "detail": outcome.detail}
    )

"""Closing one client connection, through the broker where it can be (320 CONNECTION_FORCED with our reason).

A TCP close looks like a network failure to a client library; ``connection.close`` 320 with a reason is the broker
telling it to go, which the library logs with that reason and answers with a clean reconnect. Only the broker can
send that frame in the middle of a connection without corrupting the AMQP stream, so the proxy asks it to:
``DELETE /api/connections/{name}`` on the management API of the service's nodes (any node of a cluster can close
any of its connections; the connection's own node is asked first). Without ``[services.rabbitmq]``, when no node
answers, or when the broker knows no connection of that name, the proxy closes it by TCP and says so.

This is the one-connection case behind ``DELETE /api/connections/{id}``. Issue 13's control plane closes many at a
rate (drains, the rebalancer) in ``rabbitproxy.control.closer``; the two do the same job and are meant to share
one implementation once both are merged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import aiohttp

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import Connection
from rabbitproxy.config import RabbitMQConfig, ServiceConfig
from rabbitproxy.control.management import ManagementAPI, ManagementUnavailable, base_url_for, session_for
from rabbitproxy.protocols.management import connection_name

# A client told to go by the broker answers close-ok and the broker then closes the socket; one that does not
# within this long is closed by TCP (house rule 11: no close without a deadline).
BROKER_CLOSE_GRACE: Final = 15.0
# The management API learns of a connection a few seconds after its handshake (its statistics are collected every
# collect_statistics_interval, 5 s by default), so a 404 for a connection younger than this is asked again, once a
# second, before the proxy falls back to TCP.
YOUNG: Final = 10.0
RETRY_EVERY: Final = 1.0

Via = Literal["broker", "tcp", "ended"]


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    """How a close went: ``broker`` (320 sent), ``tcp``, or ``ended`` (it went away by itself meanwhile)."""

    via: Via
    # The node that closed it, or why it was not closed through the broker.
    detail: str


def broker_name(conn: Connection, proxy_protocol: bool) -> str | None:
    """The broker's name of a proxied connection; None when it cannot be known (not connected, or closing).

    Without a PROXY header the broker sees the proxy's address towards it as the client. With one it takes *both*
    ends from the header: the client's address and the address the client connected to (the proxy's listener, or
    what an upstream balancer's header said); measured on RabbitMQ 3.10.8.
    """
    ends = conn.backend_endpoints()
    if ends is None:
        return None
    if not proxy_protocol:
        return connection_name(*ends)
    src, dst = conn.client_src, conn.client_dst
    return connection_name(src, dst) if src is not None and dst is not None else None


def _open(conn: Connection) -> bool:
    backend = conn.backend
    return backend is not None and conn in backend.connections


def _close_if_open(conn: Connection, reason: CloseReason) -> None:
    if _open(conn):
        conn.close(reason)


SessionFactory = Callable[[RabbitMQConfig], aiohttp.ClientSession]


async def close_connection(
    config: ServiceConfig,
    conn: Connection,
    pool: Sequence[Backend],
    reason: CloseReason,
    text: str,
    *,
    session_factory: SessionFactory = session_for,
    young: float = YOUNG,
    grace: float = BROKER_CLOSE_GRACE,
) -> CloseOutcome:
    """Close ``conn`` of the service configured by ``config``: through the broker when possible, else by TCP."""
    rabbitmq = config.rabbitmq
    backend = conn.backend
    if rabbitmq is None or backend is None:
        conn.close(reason)
        return CloseOutcome("tcp", "no [services.rabbitmq]" if rabbitmq is None else "not connected to a backend")
    name = broker_name(conn, config.proxy_protocol_for(backend.config) != "off")
    if name is None:
        conn.close(reason)
        return CloseOutcome("tcp", "the connection's ends are unknown")
    # Named first: the broker's close reaches the proxy as the backend hanging up, which is not why it ended.
    if conn.reason is None:
        conn.reason = reason
    async with session_factory(rabbitmq) as session:
        apis: list[tuple[str, ManagementAPI]] = []
        for b in [backend, *(b for b in pool if b is not backend)]:
            url = base_url_for(config, b.config)
            if url is not None:
                apis.append((b.name, ManagementAPI(session, url, rabbitmq.timeout)))
        problem = "no backend has a management API"
        while apis:
            if not _open(conn):
                return CloseOutcome("ended", "the connection ended while the broker was asked")
            node, api = apis[0]
            try:
                closed = await api.close_connection(name, text)
            except ManagementUnavailable as exc:
                # This node's API is out; any other node of the cluster can close the connection too.
                problem = f"{node}: {exc}"
                apis.pop(0)
                continue
            if closed:
                # The client answers close-ok and the broker hangs up; if either does not, TCP ends it.
                asyncio.get_running_loop().call_later(grace, _close_if_open, conn, reason)
                return CloseOutcome("broker", node)
            problem = f"{node}: the broker knows no connection {name!r}"
            if time.monotonic() - conn.started >= young:
                break
            await asyncio.sleep(RETRY_EVERY)
    if not _open(conn):
        return CloseOutcome("ended", "the connection ended while the broker was asked")
    conn.close(reason)
    return CloseOutcome("tcp", problem)

"""Closing client connections *through the broker*: 320 CONNECTION_FORCED with our reason, at a bounded rate.

A TCP close looks like a network failure to a client library (a reset, a missing heartbeat); ``connection.close``
with 320 CONNECTION_FORCED and a reason is the broker telling it to go, which every library logs with the reason
and answers with a clean reconnect. Only the broker can send that frame in the middle of a connection without
corrupting the AMQP stream, so the proxy asks it to: ``DELETE /api/connections/{name}`` with ``X-Reason``.

The broker names a connection by its two ends as *it* sees them (:func:`broker_connection_name`): the proxy's
socket towards it, or with a PROXY header the two addresses in the header. When the API
cannot close a connection (unreachable, or it knows no connection of that name) the proxy ends it by TCP instead
and says so. Every close of a service (drains, maint, the rebalancer) draws from one :class:`TokenBucket`, so a
drain of a node carrying thousands of clients spreads their reconnects over time instead of hitting the other
nodes all at once.

An operator's close of one connection (``DELETE /api/connections/{id}``, :meth:`BrokerCloser.close_one`) takes the
same path, naming, node order, retry-while-young and TCP fallback, but neither draws from the bucket nor waits for
a running batch: one close is no reconnect wave, and an operator waiting for the answer must not sit behind a
drain of thousands at close_rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import aiohttp
import structlog

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import Connection
from rabbitproxy.config import ServiceConfig
from rabbitproxy.control.management import ManagementAPI, ManagementUnavailable, base_url_for, session_for
from rabbitproxy.protocols.management import connection_name

log = structlog.get_logger("rabbitproxy.closer")

# Why a connection was closed by us, and how: fixed sets, because they are metric labels.
Cause = Literal["drain", "maint", "rebalance", "operator"]
CAUSES: Final[tuple[Cause, ...]] = ("drain", "maint", "rebalance", "operator")
Via = Literal["broker", "tcp"]
VIAS: Final[tuple[Via, ...]] = ("broker", "tcp")
# A client told to go by the broker answers close-ok and the broker then closes the socket; one that does not
# within this long is closed by TCP (house rule 11: no close without a deadline).
BROKER_CLOSE_GRACE = 15.0
# The management API learns of a new connection a moment after its handshake (its statistics are collected every
# few seconds), so a 404 for a connection younger than this is asked again, once a second, before TCP is used.
YOUNG = 10.0
RETRY_EVERY = 1.0


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    """How one close went: ``broker`` (320 sent), ``tcp``, or ``ended`` (it went away by itself meanwhile)."""

    via: Literal["broker", "tcp", "ended"]
    # The node that closed it, or why it was not closed through the broker.
    detail: str


def _open(conn: Connection) -> bool:
    backend = conn.backend
    return backend is not None and conn in backend.connections


class TokenBucket:
    """At most ``rate`` tokens a second, at most ``burst`` at once; pure (the caller passes the clock).

    The default burst of one spaces the closes evenly, 1/rate apart: ``close_rate = 20`` means never more than
    twenty in any second, which is what an operator sizing a reconnect wave reads it as.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float, burst: float = 1.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def reserve(self, now: float) -> float:
        """Take a token; return how many seconds from ``now`` the caller must wait before using it."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def broker_connection_name(
    local: tuple[str, int],
    server: tuple[str, int],
    header: tuple[tuple[str, int] | None, tuple[str, int] | None] | None,
) -> str | None:
    """The broker's name of a proxied connection; None when it cannot be known.

    ``local`` is the proxy's address towards the backend and ``server`` the backend's, as connected. Without a
    PROXY header (``header`` None) the broker sees the proxy as the client. With one, the broker takes *both*
    ends from the header, the client's address and the address the client connected to (the proxy's listener):
    measured on 3.10.8, a client of 127.0.0.1:40348 through a proxy listening on :42185 in front of a broker on
    :27904 is "127.0.0.1:40348 -> 127.0.0.1:42185".
    """
    if header is None:
        return connection_name(local, server)
    src, dst = header
    if src is None or dst is None:
        return None
    return connection_name(src, dst)


class CloseStats:
    """Connections closed by the control plane of one service, by cause and by how; survives reloads."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[tuple[Cause, Via]] = Counter()


class BrokerCloser:
    """Closes connections of one service's backends through the management API, within the service's close_rate."""

    def __init__(self, config: ServiceConfig, stats: CloseStats) -> None:
        self.config = config
        self.stats = stats
        rabbitmq = config.rabbitmq
        rate = rabbitmq.close_rate if rabbitmq is not None else 20.0
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.bucket = TokenBucket(rate, loop.time())
        # One session for the service's nodes, as the monitors use; None without [services.rabbitmq]: TCP closes only.
        self.session: aiohttp.ClientSession | None = session_for(rabbitmq) if rabbitmq is not None else None
        # One close batch at a time per service: the bucket would keep the rate anyway, but the order in which
        # several batches interleave would be arbitrary.
        self.lock = asyncio.Lock()
        # Operator closes in flight (they take no lock): a reload closes the old session only once they are done.
        self.singles = 0
        self.singles_done = asyncio.Event()
        self.singles_done.set()

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _apis(self, backend: Backend, pool: Iterable[Backend]) -> list[tuple[str, ManagementAPI]]:
        """The APIs to ask, the backend's own node first: any node of the cluster can close any connection."""
        if self.session is None or self.session.closed or self.config.rabbitmq is None:
            return []
        out: list[tuple[str, ManagementAPI]] = []
        for b in [backend, *(b for b in pool if b is not backend)]:
            url = base_url_for(self.config, b.config)
            if url is not None:
                out.append((b.name, ManagementAPI(self.session, url, self.config.rabbitmq.timeout)))
        return out

    async def _pace(self) -> None:
        delay = self.bucket.reserve(self.loop.time())
        if delay > 0:
            await asyncio.sleep(delay)

    async def close(
        self,
        backend: Backend,
        conns: Sequence[Connection],
        *,
        pool: Iterable[Backend],
        cause: Cause,
        reason: CloseReason,
        text: str,
    ) -> tuple[int, int]:
        """Close ``conns`` (of ``backend``) through the broker, or by TCP where it cannot; (via broker, via TCP).

        Connections that ended meanwhile are skipped. Cancelling stops the batch where it is.
        """
        async with self.lock:
            return await self._close(backend, conns, list(pool), cause, reason, text)

    async def _close(
        self,
        backend: Backend,
        conns: Sequence[Connection],
        pool: list[Backend],
        cause: Cause,
        reason: CloseReason,
        text: str,
    ) -> tuple[int, int]:
        apis = self._apis(backend, pool)
        proxy_protocol = self.config.proxy_protocol_for(backend.config) != "off"
        by_broker: list[Connection] = []
        by_tcp = 0
        why: dict[str, int] = {}
        queue = list(conns)
        retries: list[Connection] = []
        while queue or retries:
            if not queue:
                # Only connections too young for the API to know them are left: ask again a little later.
                await asyncio.sleep(RETRY_EVERY)
                queue, retries = retries, []
            conn = queue.pop(0)
            if not _open(conn):
                continue  # it ended by itself while the batch waited its turn
            await self._pace()
            if not _open(conn):
                continue
            if conn.reason is None:
                # Set first: the broker's close reaches the proxy as the backend hanging up, which is not the cause.
                conn.reason = reason
            closed, unknown, problem = await _ask(conn, apis, proxy_protocol, text)
            if closed:
                by_broker.append(conn)
                self.stats.counts[cause, "broker"] += 1
            elif unknown and time.monotonic() - conn.started < YOUNG:
                retries.append(conn)
            else:
                conn.close(reason)
                by_tcp += 1
                why[problem] = why.get(problem, 0) + 1
                self.stats.counts[cause, "tcp"] += 1
        if by_broker:
            self.loop.call_later(BROKER_CLOSE_GRACE, _close_leftovers, by_broker, reason)
        # One event per batch, not per connection: a drain of thousands must not flood the log.
        fields = {"service": self.config.name, "backend": backend.name, "cause": cause}
        if by_tcp and self.config.rabbitmq is not None:
            log.warning(
                "connections closed by TCP, not through the broker",
                **fields,
                through_broker=len(by_broker),
                by_tcp=by_tcp,
                why=dict(list(why.items())[:5]),
            )
        else:
            log.info("connections closed", **fields, through_broker=len(by_broker), by_tcp=by_tcp, reason=text)
        return len(by_broker), by_tcp

    async def close_one(
        self,
        conn: Connection,
        *,
        pool: Iterable[Backend],
        reason: CloseReason,
        text: str,
        young: float = YOUNG,
    ) -> CloseOutcome:
        """Close one connection for an operator, through the broker when possible, else by TCP.

        Not paced and not queued behind a running batch (see the module's docstring); counted as cause
        ``operator``.
        """
        self.singles += 1
        self.singles_done.clear()
        try:
            return await self._close_one(conn, list(pool), reason, text, young)
        finally:
            self.singles -= 1
            if not self.singles:
                self.singles_done.set()

    async def _close_one(
        self, conn: Connection, pool: list[Backend], reason: CloseReason, text: str, young: float
    ) -> CloseOutcome:
        backend = conn.backend
        if self.config.rabbitmq is None or backend is None:
            conn.close(reason)
            self.stats.counts["operator", "tcp"] += 1
            why = "no [services.rabbitmq]" if backend is not None else "not connected to a backend"
            return CloseOutcome("tcp", why)
        apis = self._apis(backend, pool)
        proxy_protocol = self.config.proxy_protocol_for(backend.config) != "off"
        if conn.reason is None:
            # Named first: the broker's close reaches the proxy as the backend hanging up, which is not why it ended.
            conn.reason = reason
        while True:
            if not _open(conn):
                return CloseOutcome("ended", "the connection ended while the broker was asked")
            closed, unknown, problem = await _ask(conn, apis, proxy_protocol, text)
            if closed:
                self.stats.counts["operator", "broker"] += 1
                # The client answers close-ok and the broker hangs up; if either does not, TCP ends it.
                self.loop.call_later(BROKER_CLOSE_GRACE, _close_leftovers, [conn], reason)
                return CloseOutcome("broker", problem)
            if not unknown or time.monotonic() - conn.started >= young:
                break
            await asyncio.sleep(RETRY_EVERY)
        if not _open(conn):
            return CloseOutcome("ended", "the connection ended while the broker was asked")
        conn.close(reason)
        self.stats.counts["operator", "tcp"] += 1
        return CloseOutcome("tcp", problem)


async def _ask(
    conn: Connection, apis: list[tuple[str, ManagementAPI]], proxy_protocol: bool, text: str
) -> tuple[bool, bool, str]:
    """Ask the nodes in ``apis`` in turn to close ``conn``: (closed, the broker knows no such name, detail).

    The detail is the node that closed it, or why it was not closed. A node whose API does not answer is dropped
    from ``apis`` (for the rest of a batch); the next node is asked instead, since any node of a cluster can close
    any of its connections.
    """
    ends = conn.backend_endpoints()
    header = (conn.client_src, conn.client_dst) if proxy_protocol else None
    name = broker_connection_name(ends[0], ends[1], header) if ends else None
    problem = "no backend has a management API" if not apis else "the connection's ends are unknown"
    if name is None:
        return False, False, problem
    while apis:
        node, api = apis[0]
        try:
            closed = await api.close_connection(name, text)
        except ManagementUnavailable as exc:
            problem = f"{node}: {exc}"
            apis.pop(0)
            continue
        if closed:
            return True, False, node
        return False, True, f"{node}: the broker knows no connection {name!r}"
    return False, False, problem


def _close_leftovers(conns: list[Connection], reason: CloseReason) -> None:
    for conn in conns:
        if _open(conn):
            conn.close(reason)

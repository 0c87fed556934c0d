"""The node monitor: one task per backend asks the RabbitMQ node behind it what it is doing.

Only with ``[services.rabbitmq]``. Every interval the monitor asks the backend's own management API: ``/api/overview``
once (which node answered, its version; again after every failure, since a node that comes back may have been
upgraded), ``/api/nodes/{node}`` for the figures and the alarms, ``local-alarms`` for an alarm at once (the statistics
behind ``/api/nodes`` lag about ten seconds on 3.10.8), and ``ready-to-serve-clients`` where the release has it.
The result is one :class:`~rabbitproxy.balancing.pool.NodeView` swapped onto the backend.

What the answers mean for balancing lives in :class:`~rabbitproxy.balancing.pool.Backend`: a local alarm scales its
weight down to ``alarm_weight`` percent, maintenance takes no new connections. This module only decides *whether*
the node is in maintenance (:func:`maintenance_reason`, pure):

- the node says so (``being_drained``, 4.x) or its readiness check says it does not serve clients; or
- on 3.10.8, whose management plugins know nothing of maintenance (no ``being_drained``, no endpoint that tells),
  ``rabbitmq-upgrade drain`` closes the node's AMQP *and* management listeners while its peers still call it
  ``running`` (tests/fixtures/management/README.md). A refused management port alone is no evidence: a firewall rule
  or a disabled management plugin refuses just the same on a node that serves clients well. So maintenance is
  inferred only from three things together: the node's own API *refuses* the connection (a frozen node times out
  instead), a peer asked for this node by name reports it ``running`` (a stopped one is not), and the backend's health
  check has marked it down (its AMQP listener is closed too). Without a health check nothing agrees, and nothing is
  inferred: connects to a drained node are refused and go on to the next backend.

An API that cannot be reached never takes a backend down by itself: it is shown (``management.status``) and logged
once per change; the health checks alone decide up and down. Alarms and maintenance are only ever taken from a fresh
answer, so a silent API cannot freeze a backend in a reduced state either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import structlog

from rabbitproxy.balancing.views import ALARM_KINDS, ManagementStatus, NodeStats, NodeView
from rabbitproxy.control.management import ManagementAPI, ManagementUnavailable, base_url_for

if TYPE_CHECKING:
    import aiohttp

    from rabbitproxy.balancing.backend import Backend
    from rabbitproxy.protocols.management import Alarm, NodeState, Overview
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.rabbitmq")


class NodeAPI(Protocol):
    """What the monitor asks of one node's management API (:class:`ManagementAPI`; a fake in unit tests)."""

    async def overview(self) -> Overview: ...

    async def node(self, name: str) -> NodeState: ...

    async def local_alarms(self) -> tuple[Alarm, ...]: ...

    async def ready_to_serve(self) -> bool | None: ...


def maintenance_reason(
    *,
    being_drained: bool | None,
    ready: bool | None,
    own_refused: bool,
    peer_running: bool | None,
    checks_down: bool = False,
) -> str | None:
    """Why the node is in maintenance mode, or None when nothing says it is.

    ``being_drained`` and ``ready`` are the node's own words (None where the release does not say);
    ``own_refused`` means the node's own management API refused the connection, ``peer_running`` is what
    another node reports of it (None when no peer was asked or none answered), and ``checks_down`` that the
    backend's health check has marked it down.
    """
    if being_drained:
        return "the node reports being drained (maintenance mode)"
    if ready is False:
        return "the node's readiness check says it does not serve clients"
    if own_refused and peer_running and checks_down:
        return (
            "its management and AMQP listeners refuse connections while its peers report it running"
            " (rabbitmq-upgrade drain)"
        )
    return None


def alarm_kinds(node: str | None, state: NodeState | None, local: tuple[Alarm, ...] | None) -> tuple[str, ...]:
    """The node's local alarms as kinds from :data:`ALARM_KINDS`, in that order.

    ``local`` (the local-alarms check) is immediate, so it wins when it answered; otherwise the flags of
    ``/api/nodes/{node}``. Any other resource name is ignored: the kinds become metric labels.
    """
    if local is not None:
        found = {a.resource for a in local if node is None or a.node == node}
    elif state is not None:
        found = set(state.alarms)
    else:
        found = set()
    return tuple(kind for kind in ALARM_KINDS if kind in found)


def stats_of(state: NodeState) -> NodeStats:
    return NodeStats(
        fd_used=state.fd_used,
        fd_total=state.fd_total,
        sockets_used=state.sockets_used,
        sockets_total=state.sockets_total,
        mem_used=state.mem_used,
        mem_limit=state.mem_limit,
        proc_used=state.proc_used,
        proc_total=state.proc_total,
    )


class NodeMonitor:
    """Polls one backend's node (``own``) and, when that API is unavailable, asks ``peers`` about it."""

    def __init__(
        self,
        service: str,
        backend: Backend,
        own: NodeAPI,
        peers: Sequence[NodeAPI],
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.backend = backend
        self.own = own
        self.peers = list(peers)
        self.wall_clock = wall_clock
        self.clock = clock
        prev = backend.rabbitmq
        # The node's name, from the last overview (a reload keeps what the old monitor learnt).
        self.node: str | None = prev.node if prev is not None else None
        self.version: str | None = prev.version if prev is not None else None
        self.overview_fresh = False
        # Cleared once the node answers 404 to both readiness endpoints (3.10): not asked again.
        self.readiness_known = True
        self.last_error: str | None = None

    async def poll_once(self) -> None:
        """Ask once and apply the answer; never raises (cancellation aside)."""
        try:
            view = await self._poll()
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - logged with its traceback below
            # House rule 12: our bug must not end the polling, or the node's state would freeze.
            view = self._failed(exc)
        self._apply(view)

    async def _poll(self) -> NodeView:
        prev = self.backend.rabbitmq or NodeView()
        try:
            return await self._ask_own()
        except ManagementUnavailable as exc:
            # A node that comes back may be another release (a rolling upgrade): read its overview again.
            self.overview_fresh = False
            return await self._ask_peers(prev, exc)

    async def _ask_own(self) -> NodeView:
        own = self.own
        if not self.overview_fresh or self.node is None:
            overview = await own.overview()
            self.node, self.version = overview.node, overview.version
            self.overview_fresh = True
        state = await own.node(self.node)
        try:
            local: tuple[Alarm, ...] | None = await own.local_alarms()
        except ManagementUnavailable:
            local = None
        ready: bool | None = None
        if self.readiness_known:
            try:
                ready = await own.ready_to_serve()
            except ManagementUnavailable:
                ready = None
            else:
                self.readiness_known = ready is not None
        reason = maintenance_reason(
            being_drained=state.being_drained, ready=ready, own_refused=False, peer_running=None
        )
        now = self.wall_clock()
        return NodeView(
            node=self.node,
            version=self.version,
            alarms=alarm_kinds(self.node, state, local),
            maintenance=reason is not None,
            maintenance_detail=reason,
            status=ManagementStatus.OK,
            detail=None,
            stats=stats_of(state),
            poll_time=now,
            stats_time=now,
        )

    async def _ask_peers(self, prev: NodeView, exc: ManagementUnavailable) -> NodeView:
        now = self.wall_clock()
        peer_state: NodeState | None = None
        if self.node is not None:
            for peer in self.peers:
                try:
                    peer_state = await peer.node(self.node)
                    break
                except ManagementUnavailable:
                    continue
        if peer_state is None:
            # Nothing fresh is known of the node: no alarm, no maintenance; the health checks decide up or down.
            return replace(
                prev,
                node=self.node,
                alarms=(),
                maintenance=False,
                maintenance_detail=None,
                status=ManagementStatus.UNREACHABLE,
                detail=str(exc),
                poll_time=now,
            )
        b = self.backend
        reason = maintenance_reason(
            being_drained=peer_state.being_drained,
            ready=None,
            own_refused=exc.refused,
            peer_running=peer_state.running,
            # The health check's agreement: a refused management port alone may be a firewall or a disabled plugin.
            checks_down=b.health_time is not None and not b.healthy,
        )
        running = peer_state.running
        return NodeView(
            node=self.node,
            version=self.version,
            # A peer's view of the alarms lags like any statistics, but it is fresher than nothing.
            alarms=alarm_kinds(self.node, peer_state, None) if running else (),
            maintenance=reason is not None,
            maintenance_detail=reason,
            status=ManagementStatus.UNREACHABLE,
            detail=f"{exc}; a peer reports the node {'running' if running else 'not running'}",
            stats=stats_of(peer_state) if running else prev.stats,
            poll_time=now,
            stats_time=now if running else prev.stats_time,
        )

    def _failed(self, exc: Exception) -> NodeView:
        prev = self.backend.rabbitmq or NodeView()
        detail = f"{type(exc).__name__}: {exc}"
        if detail != self.last_error:
            log.error(
                "node monitor poll failed unexpectedly",
                service=self.service,
                backend=self.backend.name,
                reason=detail,
                exc_info=exc,
            )
        self.last_error = detail
        self.overview_fresh = False
        return replace(
            prev,
            alarms=(),
            maintenance=False,
            maintenance_detail=None,
            status=ManagementStatus.ERROR,
            detail=detail,
            poll_time=self.wall_clock(),
        )

    def _apply(self, view: NodeView) -> None:
        """Swap ``view`` onto the backend (no await in between) and log what changed, once per change."""
        b = self.backend
        prev = b.rabbitmq or NodeView()
        b.rabbitmq = view
        now = self.clock()
        b.observe(now)
        if prev.alarms and not view.alarms and b.usable:
            # The weight comes back through slow start, like a node that comes back up.
            b.start_ramp(now)
        fields = {"service": self.service, "backend": b.name, "node": view.node}
        # Once per change of status, not per poll nor per new wording of the same trouble (which request failed).
        if view.status is not prev.status:
            if view.status is ManagementStatus.OK:
                if prev.status is not ManagementStatus.NONE:
                    log.info("management API answers again", **fields)
            elif view.status is ManagementStatus.UNREACHABLE:
                log.warning("management API unreachable", reason=view.detail, **fields)
        if (view.node, view.version) != (prev.node, prev.version) and view.node is not None:
            log.info("rabbitmq node identified", version=view.version, **fields)
        if view.alarms != prev.alarms:
            if view.alarms:
                log.warning(
                    "rabbitmq alarm raised", alarms=list(view.alarms), effective_weight=b.effective_weight, **fields
                )
            else:
                log.info("rabbitmq alarm cleared", alarms_before=list(prev.alarms), **fields)
        if view.maintenance != prev.maintenance:
            if view.maintenance:
                log.warning(
                    "rabbitmq node in maintenance, no new connections",
                    reason=view.maintenance_detail,
                    open_connections=b.active,
                    **fields,
                )
            else:
                log.info("rabbitmq node out of maintenance", **fields)


def monitor_for(service: Service, backend: Backend, session: aiohttp.ClientSession) -> NodeMonitor:
    """A monitor of ``backend`` whose peers are the service's other backends' management APIs."""
    sc = service.config
    cfg = sc.rabbitmq
    if cfg is None:
        raise ValueError(f"service {sc.name!r} has no [services.rabbitmq]")

    def api(url: str | None) -> ManagementAPI:
        assert url is not None  # with [services.rabbitmq] every backend has a management URL
        return ManagementAPI(session, url, cfg.timeout)

    own = api(base_url_for(sc, backend.config))
    peers = [api(base_url_for(sc, other)) for other in sc.backends if other.name != backend.name]
    return NodeMonitor(service.name, backend, own, peers)


async def node_monitor_task(service: Service, backend: Backend, session: aiohttp.ClientSession) -> None:
    """Poll ``backend``'s node every interval until cancelled (reload, shutdown)."""
    monitor = monitor_for(service, backend, session)
    interval = service.config.rabbitmq.interval if service.config.rabbitmq is not None else 5.0
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        await monitor.poll_once()
        next_at = max(next_at + interval, loop.time())
        await asyncio.sleep(next_at - loop.time())

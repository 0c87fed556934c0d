"""Reload: apply a new configuration to a running :class:`~rabbitproxy.control.supervisor.Supervisor` without
dropping a connection.

A reload has three steps (house rule 13): :func:`_prepare` does every await (binding new listeners, first checks of
new backends, opening new servers) before anything visible changes; :func:`_swap` installs the result in one
synchronous step; the cleanup after it (old monitors, steering, management sessions) awaits again. A reload that
fails or is refused before its swap is undone by :func:`_discard`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from rabbitproxy.addresses import format_host_port
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.pool import Pool
from rabbitproxy.config import Config, ConfigError, ServiceConfig
from rabbitproxy.control.health import health_task
from rabbitproxy.relay.service import Service
from rabbitproxy.relay.tls import ServiceTLS
from rabbitproxy.relay.transparent import check_transparent
from rabbitproxy.tasks import cancel_and_wait, log_failure

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor

log = structlog.get_logger("rabbitproxy.supervisor")


class ReloadRefusedError(ConfigError):
    """A reload that cannot be applied now, whatever the file says: the proxy is shutting down."""


@dataclass
class ReloadOutcome:
    """How the last reload ended, for ``rabbitproxy_config_last_reload_*`` (the pair Prometheus itself exports).

    A proxy that has not reloaded yet counts as successful, as of its start: the configuration it runs was loaded
    then. A reload refused because shutdown has begun is not recorded: it says nothing about the file.
    """

    successful: bool = True
    success_time: float = field(default_factory=time.time)

    def record(self, successful: bool) -> None:
        self.successful = successful
        if successful:
            self.success_time = time.time()


@dataclass
class ReloadResult:
    """What a reload changed, for the log and the admin API."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # workers = N: the workers that failed or refused the configuration the parent applied (empty: none).
    worker_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        out = {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "unchanged": self.unchanged,
        }
        if self.worker_errors:
            out["worker_errors"] = self.worker_errors
        return out


async def apply(sup: Supervisor, new: Config) -> ReloadResult:
    """Prepare everything the new configuration needs, swap it in without an await, then clean up.

    House rule 13: an admin PATCH, a health verdict, an agent reply or a connect that completes while this runs
    must land on the objects that stay. So the awaits (first checks of new backends, new servers) come before
    anything visible changes; copying the runtime state into the new pools and installing them is one
    synchronous step; the old monitors are cancelled in that same step and only awaited afterwards.
    """
    # Certificates and keys are read again on every reload (that is how a renewed one is picked up); a file
    # that cannot be loaded refuses the reload before anything changes.
    tls = {sc.name: ServiceTLS(sc) for sc in new.services}
    check_transparent(new.services)
    # Everything that can fail (binding new or moved listeners) before anything changes. A moved listener that
    # takes a port another (removed or moved) service still holds is refused rather than half-applied: two
    # listeners cannot share a port.
    fresh_socks = sup.bind(
        [sc for sc in new.services if sc.name not in sup.services or sup.services[sc.name].config.listen != sc.listen]
    )
    plan = _Plan(new, tls, fresh_socks)
    try:
        await _prepare(sup, plan)
        # Shutdown may have begun during the awaits; from here to the swap nothing awaits.
        sup.refuse_if_stopping()
    except BaseException:
        await _discard(sup, plan)
        raise
    old_tasks = _swap(sup, plan)
    # The swap closed the old servers; the new ones accept from now on (connects meanwhile waited in the
    # backlog). A shutdown that began since has closed them already, and a closed server must not start.
    for server in [*plan.servers.values(), *(n for nodes in plan.node_servers.values() for n in nodes.values())]:
        if sup.state != "stopping" and server.sockets:
            await server.start_serving()
    await cancel_and_wait(old_tasks)
    # What the swap left to clean up and has to await: the steering of removed and changed services, and the
    # management sessions their old monitors used.
    for name in plan.removed:
        await sup.steering.service_removed(name)
        await sup.close_management(name)
    for service in plan.changed:
        await sup.steering.service_changed(service)
    for session in plan.old_sessions:
        await session.close()
    log.info("configuration reloaded", **plan.result.as_dict())
    return plan.result


async def _prepare(sup: Supervisor, plan: _Plan) -> None:
    """The awaiting half of a reload: nothing here is visible to clients, the admin API or the monitors."""
    new = plan.config
    waits: list[Awaitable[Any]] = []
    for sc in new.services:
        old = sup.services.get(sc.name)
        if old is None:
            # A new service checks its backends before it accepts anyone, as at start: otherwise its first
            # clients would all be turned away with "no backend". Its monitors are the permanent ones.
            service = sup.new_service(sc, plan.tls[sc.name])
            plan.added[sc.name] = service
            sup.watch_service(service)
            waits.append(service.first_checks.wait())
            continue
        if old.config != sc and sc.health_check.type != "none" and sup.role != "worker":
            # (A worker checks nothing: its new backends' state comes from the parent, applied in the swap.)
            staged = _stage_new_servers(old, sc, plan.tls[sc.name])
            if staged is not None:
                plan.staged[sc.name] = staged
                waits.append(staged.service.first_checks.wait())
    if waits:
        grace = max(sc.health_check.timeout for sc in new.services) + 1.0
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*waits)
        except TimeoutError:
            log.warning("reload goes on before every new backend's first health check answered", waited=grace)
    if sup.role == "parent":
        # The parent opens no server: the workers listen; its new sockets only hold the ports (sup.hold).
        return
    for sc in new.services:
        target = plan.added.get(sc.name) or sup.services[sc.name]
        old_server_tls = target.tls.server is not None if sc.name not in plan.added else False
        sock = plan.socks.pop(sc.name, None)
        if sock is None and (old_server_tls or plan.tls[sc.name].server is not None):
            # A terminating service gets a new listener with a fresh context on every reload (see relay.tls:
            # a session cached by the old context must not be resumed under new settings); TLS switched on or
            # off needs one too. It takes over a duplicate of the same socket, so the port never closes.
            sock = target.duplicate_listener()
        if sock is None:
            continue
        plan.owned_socks.append(sock)
        server = await target.open_server(sock, sc, plan.tls[sc.name], serving=False)
        plan.owned_socks.remove(sock)
        plan.servers[sc.name] = server
    await _prepare_node_servers(sup, plan)


async def _prepare_node_servers(sup: Supervisor, plan: _Plan) -> None:
    """New node_port servers for the stream services that have them (a reload never adds or moves one).

    Like a terminating service's listener, they take over duplicates of the same sockets, so a new certificate
    or key reaches the node ports too, and the ports never close.
    """
    for sc in plan.config.services:
        service = sup.services.get(sc.name)
        if service is None or not service.node_servers:
            continue
        opened = plan.node_servers[sc.name] = {}
        for name, sock in service.duplicate_node_listeners().items():
            plan.owned_socks.append(sock)
            opened[name] = await service.open_server(sock, sc, plan.tls[sc.name], serving=False, pin=name)
            plan.owned_socks.remove(sock)


def _stage_new_servers(service: Service, sc: ServiceConfig, tls: ServiceTLS) -> _Staged | None:
    """Backends of ``sc`` that are new servers (new name or new address), checked once before the swap.

    They run their first checks on a stand-in service with the new configuration, so that when the swap puts
    them in the pool they already have a verdict: a service whose backends all moved keeps serving from the
    old ones until then, instead of answering "no backend" until the first check after the swap.
    """
    fresh: list[Backend] = []
    for bc in sc.backends:
        port = sc.backend_port(bc)
        prev = service.pool.by_name.get(bc.name)
        if prev is None or prev.address != bc.address or prev.port != port:
            fresh.append(Backend.for_service(sc, bc, healthy=False))
    if not fresh:
        return None
    stand_in = Service(sc, pool=Pool(fresh, sc.balance), tls=tls)
    tasks = [asyncio.ensure_future(health_task(stand_in, b)) for b in fresh]
    for t in tasks:
        t.add_done_callback(log_failure)
    return _Staged(stand_in, {b.name: b for b in fresh}, tasks)


async def _discard(sup: Supervisor, plan: _Plan) -> None:
    """Undo a reload that failed or was refused before its swap: nothing of it may outlive it."""
    for server in [*plan.servers.values(), *(n for nodes in plan.node_servers.values() for n in nodes.values())]:
        server.close()
    for sock in [*plan.socks.values(), *plan.owned_socks]:
        sock.close()
    tasks: list[asyncio.Task[Any]] = []
    for service in plan.added.values():
        for b in service.pool.backends:
            tasks.extend(sup.monitors.pop(id(b), []))
    for staged in plan.staged.values():
        tasks.extend(staged.tasks)
    await cancel_and_wait(tasks)
    for name in plan.added:
        await sup.close_management(name)


def _swap(sup: Supervisor, plan: _Plan) -> list[asyncio.Task[Any]]:
    """Install the prepared reload. Synchronous by design: nothing else runs on the loop until it returns.

    Returns the tasks it cancelled (old monitors, first-check stand-ins), for the caller to await.
    """
    new, result = plan.config, plan.result
    cancelled: list[asyncio.Task[Any]] = []
    new_names = {s.name for s in new.services}
    # Removed services stop accepting and drain in the background.
    for name in [n for n in sup.services if n not in new_names]:
        service = sup.services.pop(name)
        # Close the listener now, not when the drain task first runs: by the time the reload is reported
        # done, a new connect to a removed service must already be refused.
        service.stop_accepting()
        cancelled.extend(sup.cancel_monitors(service.pool.backends))
        # Its management session and its steering (pending closes, rebalancer) go after the swap: they await.
        plan.removed.append(name)
        sup.spawn(service.remove(), name=f"drain {name}")
        result.removed.append(name)
    for sc in new.services:
        added = plan.added.get(sc.name)
        if added is not None:
            sup.services[sc.name] = added
            if sc.name in plan.servers:
                added.replace_server(plan.servers[sc.name])
            sup.steering.service_added(added)
            log.info("service listening", service=sc.name, listen=sc.listen, backends=len(sc.backends))
            result.added.append(sc.name)
            continue
        service = sup.services[sc.name]
        staged = plan.staged.get(sc.name)
        if staged is not None:
            for t in staged.tasks:
                t.cancel()
            cancelled.extend(staged.tasks)
        service.tls = plan.tls[sc.name]
        if sc.name in plan.servers:
            service.replace_server(plan.servers[sc.name])
        if sc.name in plan.node_servers:
            service.replace_node_servers(plan.node_servers[sc.name])
        if service.config == sc:
            result.unchanged.append(sc.name)
            continue
        cancelled.extend(_update_service(sup, service, sc, staged, plan))
        plan.changed.append(service)
        result.changed.append(sc.name)
    if sup.role == "parent":
        sup.release_held(plan.removed)
        sup.hold(plan.socks)
        plan.socks = {}
    sup.config = new
    if sup.on_swap is not None:
        sup.on_swap()
    return cancelled


def _update_service(
    sup: Supervisor, service: Service, sc: ServiceConfig, staged: _Staged | None, plan: _Plan
) -> list[asyncio.Task[Any]]:
    """Give ``service`` its new config and pool (part of the synchronous swap); return the monitors cancelled."""
    old_cfg = service.config
    old_pool = service.pool
    healthy_default = sc.health_check.type == "none"
    checked = staged.backends if staged is not None else {}
    backends: list[Backend] = []
    for bc in sc.backends:
        prev = old_pool.by_name.get(bc.name)
        port = sc.backend_port(bc)
        if prev is not None and prev.address == bc.address and prev.port == port:
            b = Backend.for_service(sc, bc, healthy=healthy_default)
            b.adopt_runtime_state(prev)
            if healthy_default:
                b.healthy = True
                b.health_detail = "no check configured"
        else:
            # A new server: the one whose first check ran before the swap, when there is one.
            b = checked.get(bc.name) or Backend.for_service(sc, bc, healthy=healthy_default)
            if prev is not None:
                # Same name, new address: a different server. Its open connections stay with the old one, but
                # what the operator set (drain, maint, a weight) is about the name and carries over.
                b.adopt_operator_state(prev)
        if prev is not None and prev.weight_overridden and not b.weight_overridden:
            log.info(
                "runtime weight dropped: the file's weight changed since it was set",
                service=sc.name,
                backend=bc.name,
                runtime_weight=prev.configured_weight,
                file_weight=bc.weight,
            )
        backends.append(b)
    pool = Pool(backends, sc.balance)
    if old_cfg.balance == sc.balance:
        # Keep the balancer's position (smooth WRR's running weights) so a reload does not restart the
        # sequence; only the state of backends that are gone is dropped.
        pool.balancer = old_pool.balancer
        for name in old_pool.by_name.keys() - pool.by_name.keys():
            pool.balancer.forget(name)
    # Connects in flight are counted per Backend object (max_connections); the count moves with the server.
    for old_b in old_pool.backends:
        if old_b.successor is not None and old_b.connecting:
            old_b.current().connecting += old_b.connecting
            old_b.connecting = 0
    cancelled = sup.cancel_monitors(old_pool.backends)
    # The credentials or the CA may have changed: the new monitors get a new session, the old one is closed
    # after the swap.
    session = sup.management.pop(service.name, None)
    if session is not None:
        plan.old_sessions.append(session)
    service.pool = pool
    service.config = sc
    service.cancel_connects_to_removed()
    sup.watch_service(service)
    # One event per backend that came or went, so a filter on backend= tells that backend's whole story.
    new_names = {b.name for b in backends}
    for b in backends:
        if b.name not in old_pool.by_name:
            log.info("backend added", service=sc.name, backend=b.name, address=format_host_port(b.address, b.port))
    for b in old_pool.backends:
        if b.name not in new_names:
            log.info("backend removed", service=sc.name, backend=b.name, open_connections=b.active)
    log.info("service updated", service=sc.name, backends=[b.name for b in backends])
    return cancelled


@dataclass
class _Staged:
    """New servers of a changed service, checked on a stand-in before the swap puts them in the pool."""

    service: Service
    backends: dict[str, Backend]
    tasks: list[asyncio.Task[None]]


@dataclass
class _Plan:
    """Everything a reload prepares before its swap."""

    config: Config
    tls: dict[str, ServiceTLS]
    # Bound for new and moved listeners, not yet handed to a server.
    socks: dict[str, socket.socket]
    result: ReloadResult = field(default_factory=ReloadResult)
    added: dict[str, Service] = field(default_factory=dict)
    staged: dict[str, _Staged] = field(default_factory=dict)
    # Servers opened (not serving) for the new services and for services whose listener is replaced.
    servers: dict[str, asyncio.Server] = field(default_factory=dict)
    # A stream service's node_port servers, opened anew on duplicates of their sockets with the new configuration
    # and TLS context (by service, then backend name).
    node_servers: dict[str, dict[str, asyncio.Server]] = field(default_factory=dict)
    # A socket being handed to a server right now; closed by _discard if that fails.
    owned_socks: list[socket.socket] = field(default_factory=list)
    # Left by the swap for the cleanup after it (steering and management sessions await).
    removed: list[str] = field(default_factory=list)
    changed: list[Service] = field(default_factory=list)
    old_sessions: list[aiohttp.ClientSession] = field(default_factory=list)

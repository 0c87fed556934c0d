"""The supervisor: every running service, the monitors that watch its backends, reload and shutdown.

It owns what changes while the process runs. The data path (:mod:`rabbitproxy.relay`) knows nothing of it; the
admin API steers it; :func:`rabbitproxy.app.serve` creates it, starts it and stops it.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.pool import Backend, Pool
from rabbitproxy.config import Config, ConfigError, ServiceConfig
from rabbitproxy.control.feedback import feedback_task
from rabbitproxy.control.health import health_task
from rabbitproxy.control.management import session_for
from rabbitproxy.control.node_monitor import node_monitor_task
from rabbitproxy.control.steering import Steering
from rabbitproxy.relay.listeners import bind_all, quiet_accept_errors
from rabbitproxy.relay.service import Service
from rabbitproxy.relay.tls import ServiceTLS
from rabbitproxy.relay.transparent import check_transparent
from rabbitproxy.tasks import Backoff, OwnedTasks, cancel_and_wait, log_failure, run_restarting

log = structlog.get_logger("rabbitproxy.supervisor")


@dataclass
class ReloadResult:
    """What a reload changed, for the log and the admin API."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "unchanged": self.unchanged,
        }


class Supervisor:
    """All services of one process and what runs beside them."""

    def __init__(self, config: Config, *, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.services: dict[str, Service] = {}
        self.state = "starting"
        # Monitor tasks (health checks, agents, node monitors) per backend object; restarted when a reload changes them.
        self.monitors: dict[int, list[asyncio.Task[None]]] = {}
        # One HTTP session per service with [services.rabbitmq], shared by its node monitors; closed when the
        # service is removed or changed, and at shutdown.
        self.management: dict[str, aiohttp.ClientSession] = {}
        self.background = OwnedTasks()
        # Drain deadlines, closes through the broker, the rebalancers (issue 13).
        self.steering = Steering(self.services)
        self.reload_lock = asyncio.Lock()
        self.listeners_ready = asyncio.Event()

    # -- start and stop ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        quiet_accept_errors(asyncio.get_running_loop())
        # Load every certificate before binding anything: a bad file is a config error, not a half-started proxy.
        tls = {sc.name: ServiceTLS(sc) for sc in self.config.services}
        # Transparent mode needs a capability: refuse now, not at the first client.
        check_transparent(self.config.services)
        # Bind every socket before serving any, so a port conflict fails the start as a whole.
        socks = bind_all(self.config.services)
        for sc in self.config.services:
            service = Service(sc, tls=tls[sc.name])
            self.services[sc.name] = service
            self._watch_service(service)
            self.steering.service_added(service)
        # The sockets already listen, so clients arriving now wait in the backlog. Serving starts once every
        # backend's first check has answered (or its timeout passed): otherwise the first clients after a start or
        # restart would find no healthy backend and be turned away from a perfectly healthy cluster.
        grace = max(sc.health_check.timeout for sc in self.config.services) + 1.0
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(s.first_checks.wait() for s in self.services.values()))
        except TimeoutError:
            log.warning("serving before every backend's first health check answered", waited=grace)
        for sc in self.config.services:
            service = self.services[sc.name]
            await service.start(socks[sc.name])
            log.info("service listening", service=sc.name, listen=sc.listen, backends=len(sc.backends))
        self.state = "running"
        self.listeners_ready.set()

    async def shutdown(self) -> None:
        if self.state == "stopping":
            return
        self.state = "stopping"
        for service in self.services.values():
            service.stop_accepting()
        total = sum(s.active for s in self.services.values())
        log.info("shutting down", open_connections=total)
        # No deadline or rebalancer may close anything while the services drain for the last time.
        await self.steering.stop()
        await asyncio.gather(*(s.drain(s.config.shutdown_timeout) for s in self.services.values()))
        await self._stop_all_monitors()
        for name in list(self.management):
            await self._close_management(name)
        await self.background.cancel_all()
        log.info("stopped")

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run a background task owned by the proxy (drains, reloads); its failure is logged, never lost."""
        return self.background.spawn(coro, name)

    # -- monitors ------------------------------------------------------------------------------------------------

    def _watch_service(self, service: Service) -> None:
        rmq = service.config.rabbitmq
        if rmq is not None and service.name not in self.management:
            self.management[service.name] = session_for(rmq)
        for backend in service.pool.backends:
            self._watch(service, backend)

    async def _close_management(self, service_name: str) -> None:
        """Close a service's management session (its monitors must already be stopped)."""
        session = self.management.pop(service_name, None)
        if session is not None:
            await session.close()

    def _watch(self, service: Service, backend: Backend) -> None:
        # A monitor that dies would freeze the backend's state (up for a dead node, say), so each runs under
        # run_restarting: started again with back-off until a reload or the shutdown cancels it.
        loop = asyncio.get_running_loop()
        tasks = []
        for kind, factory in monitors_for(service, backend, self.management.get(service.name)):
            name = f"{kind} {service.name}/{backend.name}"
            coro = run_restarting(factory, name, Backoff(), service=service.name, backend=backend.name)
            task = loop.create_task(coro, name=name)
            task.add_done_callback(log_failure)
            tasks.append(task)
        self.monitors[id(backend)] = tasks

    async def _unwatch(self, backend: Backend) -> None:
        await cancel_and_wait(self.monitors.pop(id(backend), []))

    async def _stop_all_monitors(self) -> None:
        tasks = [t for ts in self.monitors.values() for t in ts]
        self.monitors.clear()
        await cancel_and_wait(tasks)

    # -- reload --------------------------------------------------------------------------------------------------

    async def reload(self, new: Config | None = None) -> ReloadResult:
        """Apply a new configuration (read from ``config_path`` when not given) without dropping connections.

        Raises :class:`ConfigError` and changes nothing when the new configuration is invalid or a new listener
        cannot be bound.
        """
        async with self.reload_lock:
            if new is None:
                if self.config_path is None:
                    raise ConfigError(["no configuration file to reload (started from command-line options)"])
                new = config_mod.load(self.config_path)
            return await self._apply(new)

    async def _apply(self, new: Config) -> ReloadResult:
        result = ReloadResult()
        new_names = {s.name for s in new.services}
        # Certificates and keys are read again on every reload (that is how a renewed one is picked up); a file
        # that cannot be loaded refuses the reload before anything changes.
        tls = {sc.name: ServiceTLS(sc) for sc in new.services}
        check_transparent(new.services)
        # Phase 1: everything that can fail (binding new or moved listeners) before anything changes.
        # A moved listener that takes a port another (removed or moved) service still holds is refused rather than
        # half-applied: two listeners cannot share a port.
        fresh_socks = bind_all(
            [
                sc
                for sc in new.services
                if sc.name not in self.services or self.services[sc.name].config.listen != sc.listen
            ]
        )

        # Phase 2: apply. Removed services stop accepting and drain in the background.
        for name in [n for n in self.services if n not in new_names]:
            service = self.services.pop(name)
            # Close the listener now, not when the drain task first runs: by the time the reload is reported
            # done, a new connect to a removed service must already be refused.
            service.stop_accepting()
            for b in service.pool.backends:
                await self._unwatch(b)
            await self._close_management(name)
            await self.steering.service_removed(name)
            self.spawn(service.remove(), name=f"drain {name}")
            result.removed.append(name)
        for sc in new.services:
            old_service = self.services.get(sc.name)
            if old_service is None:
                service = Service(sc, tls=tls[sc.name])
                await service.start(fresh_socks[sc.name])
                self.services[sc.name] = service
                self._watch_service(service)
                self.steering.service_added(service)
                result.added.append(sc.name)
                continue
            await old_service.apply_tls(tls[sc.name])
            if old_service.config == sc:
                result.unchanged.append(sc.name)
                continue
            await self._update_service(old_service, sc, fresh_socks.get(sc.name))
            await self.steering.service_changed(old_service)
            result.changed.append(sc.name)
        self.config = new
        log.info("configuration reloaded", **result.as_dict())
        return result

    async def _update_service(self, service: Service, sc: ServiceConfig, sock: socket.socket | None) -> None:
        old_cfg = service.config
        old_pool = service.pool
        healthy_default = sc.health_check.type == "none"
        backends: list[Backend] = []
        for bc in sc.backends:
            prev = old_pool.by_name.get(bc.name)
            b = Backend.for_service(sc, bc, healthy=healthy_default)
            if prev is not None and prev.address == bc.address and prev.port == b.port:
                b.adopt_runtime_state(prev)
                if healthy_default:
                    b.healthy = True
                    b.health_detail = "no check configured"
            elif prev is not None:
                # Same name, new address: a different server. Its open connections stay with the old one, but what
                # the operator set (drain, maint, a weight) is about the name and carries over.
                b.adopt_operator_state(prev)
            backends.append(b)
        pool = Pool(backends, sc.balance)
        if old_cfg.balance == sc.balance:
            # Keep the balancer's position (smooth WRR's running weights) so a reload does not restart the
            # sequence; only the state of backends that are gone is dropped.
            pool.balancer = old_pool.balancer
            for name in old_pool.by_name.keys() - pool.by_name.keys():
                pool.balancer.forget(name)
        for b in old_pool.backends:
            await self._unwatch(b)
        # The credentials or the CA may have changed: the new monitors get a new session.
        await self._close_management(service.name)
        service.pool = pool
        service.config = sc
        service.cancel_connects_to_removed()
        if sock is not None:
            # The new listener is already bound; only now is the old one closed.
            old_server = service.server
            await service.start(sock)
            if old_server is not None:
                old_server.close()
        self._watch_service(service)
        # One event per backend that came or went, so a filter on backend= tells that backend's whole story.
        new_names = {b.name for b in backends}
        for b in backends:
            if b.name not in old_pool.by_name:
                log.info("backend added", service=sc.name, backend=b.name, address=f"{b.address}:{b.port}")
        for b in old_pool.backends:
            if b.name not in new_names:
                log.info("backend removed", service=sc.name, backend=b.name, open_connections=b.active)
        log.info("service updated", service=sc.name, backends=[b.name for b in backends])


Monitor = tuple[str, Callable[[], Awaitable[None]]]


def monitors_for(service: Service, backend: Backend, management: aiohttp.ClientSession | None = None) -> list[Monitor]:
    """What to run for ``backend``: (kind, coroutine factory) pairs: health check, feedback agent, node monitor.

    ``management`` is the service's management API session; the node monitor runs only with [services.rabbitmq].

    Factories rather than coroutines, so a monitor that dies can be started again. Called again for every backend
    after a reload, so a task only ever reads the configuration it was started with.
    """
    out: list[Monitor] = []
    if service.config.health_check.type != "none":
        out.append(("health check", functools.partial(health_task, service, backend)))
    if service.config.feedback.type != "none":
        out.append(("feedback agent", functools.partial(feedback_task, service, backend)))
    if service.config.rabbitmq is not None and management is not None:
        out.append(("node monitor", functools.partial(node_monitor_task, service, backend, management)))
    return out

"""The supervisor: every running service, the monitors that watch its backends, reload and shutdown.

It owns what changes while the process runs. The data path (:mod:`rabbitproxy.relay`) knows nothing of it; the
admin API steers it; :func:`rabbitproxy.app.serve` creates it, starts it and stops it. How a reload prepares and
swaps in a new configuration is :mod:`rabbitproxy.control.reload`; this module only serialises reloads and refuses
them once shutdown has begun.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.config import Config, ConfigError
from rabbitproxy.control.feedback import feedback_task
from rabbitproxy.control.health import health_task
from rabbitproxy.control.management import session_for
from rabbitproxy.control.node_monitor import node_monitor_task
from rabbitproxy.control.reload import ReloadRefusedError, ReloadResult, apply
from rabbitproxy.control.steering import Steering
from rabbitproxy.relay.listeners import bind_all, quiet_accept_errors
from rabbitproxy.relay.service import Service
from rabbitproxy.relay.tls import ServiceTLS
from rabbitproxy.relay.transparent import check_transparent
from rabbitproxy.tasks import Backoff, OwnedTasks, cancel_and_wait, log_failure, run_restarting

log = structlog.get_logger("rabbitproxy.supervisor")


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
            self.watch_service(service)
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
            await self.close_management(name)
        await self.background.cancel_all()
        log.info("stopped")

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run a background task owned by the proxy (drains, reloads); its failure is logged, never lost."""
        return self.background.spawn(coro, name)

    # -- monitors ------------------------------------------------------------------------------------------------

    def watch_service(self, service: Service) -> None:
        rmq = service.config.rabbitmq
        if rmq is not None and service.name not in self.management:
            self.management[service.name] = session_for(rmq)
        for backend in service.pool.backends:
            self._watch(service, backend)

    async def close_management(self, service_name: str) -> None:
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

    def refuse_if_stopping(self) -> None:
        if self.state == "stopping":
            # A reload now would bind listeners the shutdown already closed, and add services its drain misses.
            raise ReloadRefusedError(["the proxy is shutting down; reload refused"])

    async def reload(self, new: Config | None = None) -> ReloadResult:
        """Apply a new configuration (read from ``config_path`` when not given) without dropping connections.

        Raises :class:`ConfigError` and changes nothing when the new configuration is invalid or a new listener
        cannot be bound, and :class:`ReloadRefusedError` (a ConfigError) once shutdown has begun.
        """
        self.refuse_if_stopping()
        async with self.reload_lock:
            self.refuse_if_stopping()
            if new is None:
                if self.config_path is None:
                    raise ConfigError(["no configuration file to reload (started from command-line options)"])
                new = config_mod.load(self.config_path)
            return await apply(self, new)

    def cancel_monitors(self, backends: list[Backend]) -> list[asyncio.Task[Any]]:
        """Cancel the monitors of ``backends`` at once and return them (awaited later, outside the swap).

        A cancelled task resumes only by raising CancelledError at its await, so none of them writes another
        verdict, not even to the old Backend objects, whose connection sets the new ones share.
        """
        tasks: list[asyncio.Task[Any]] = []
        for b in backends:
            tasks.extend(self.monitors.pop(id(b), []))
        for t in tasks:
            t.cancel()
        return tasks


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

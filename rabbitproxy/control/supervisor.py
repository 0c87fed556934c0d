"""The supervisor: every running service, the monitors that watch its backends, reload and shutdown.

It owns what changes while the process runs. The data path (:mod:`rabbitproxy.relay`) knows nothing of it; the
admin API steers it; :func:`rabbitproxy.app.serve` creates it, starts it and stops it. How a reload prepares and
swaps in a new configuration is :mod:`rabbitproxy.control.reload`; this module only serialises reloads and refuses
them once shutdown has begun.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import structlog

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.config import Config, ConfigError, ServiceConfig
from rabbitproxy.config.l4 import L4_NAT
from rabbitproxy.control import state_file
from rabbitproxy.control.feedback import feedback_task
from rabbitproxy.control.health import health_task
from rabbitproxy.control.l4 import L4Nat, NftError
from rabbitproxy.control.management import session_for
from rabbitproxy.control.node_monitor import node_monitor_task
from rabbitproxy.control.reload import ReloadOutcome, ReloadRefusedError, ReloadResult, apply
from rabbitproxy.control.steering import Steering
from rabbitproxy.relay.listeners import bind_all, bind_node_listeners, quiet_accept_errors
from rabbitproxy.relay.service import Service
from rabbitproxy.relay.tls import ServiceTLS
from rabbitproxy.relay.transparent import check_transparent
from rabbitproxy.tasks import Backoff, OwnedTasks, cancel_and_wait, log_failure, run_restarting

if TYPE_CHECKING:
    from rabbitproxy.control.workers import WorkerSet

log = structlog.get_logger("rabbitproxy.supervisor")

# "single": one process does everything (workers = 1). With workers > 1 the supervising process is the "parent":
# monitors, steering, the admin API, no accepting; each worker process runs a "worker" supervisor: the data path
# only, its backends' state copied from the parent (rabbitproxy.control.workers).
Role = Literal["single", "parent", "worker"]


class Supervisor:
    """All services of one process and what runs beside them."""

    def __init__(self, config: Config, *, config_path: Path | None = None, role: Role = "single") -> None:
        self.config = config
        self.config_path = config_path
        self.role: Role = role
        # The parent's bound, not listening, sockets (one per service): they hold each port for the workers.
        self.held: dict[str, socket.socket] = {}
        self.workers: WorkerSet | None = None
        # Called once the services exist and at the end of every reload's swap (synchronously): a worker copies
        # the parent's backend state onto its new Backend objects there, before any of them takes a client.
        self.on_swap: Callable[[], None] | None = None
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
        if role == "parent":
            self.steering.rebalancing = False
            self.steering.remote = self._steer_workers
            self.steering.remote_cancel = self._unsteer_workers
        self.reload_lock = asyncio.Lock()
        self.last_reload = ReloadOutcome()
        # [admin] is read at start only, like the admin API itself: a reload does not move the state file.
        self.state_path = Path(config.admin.state_file) if config.admin.state_file and role != "worker" else None
        self.listeners_ready = asyncio.Event()
        # The nftables table of the mode = "l4-nat" services: programmed by the process that watches the backends
        # (single, or the parent of workers), never by a worker, which has no listener for such a service.
        self.l4 = L4Nat(config.nft_table, self.services) if role != "worker" else None
        if self.l4 is not None:
            self.steering.on_deadline = self.l4.cut_now

    # -- start and stop ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        quiet_accept_errors(asyncio.get_running_loop())
        # Load every certificate before binding anything: a bad file is a config error, not a half-started proxy.
        tls = {sc.name: ServiceTLS(sc) for sc in self.config.services}
        # Transparent mode needs a capability: refuse now, not at the first client.
        check_transparent(self.config.services)
        # Bind every socket before serving any, so a port conflict fails the start as a whole.
        socks = self.bind(self.config.services)
        node_socks = self.bind_nodes(self.config.services, socks)
        for sc in self.config.services:
            service = self.new_service(sc, tls[sc.name])
            self.services[sc.name] = service
            self.watch_service(service)
            self.steering.service_added(service)
        if self.state_path is not None:
            # Before anything serves or a worker copies the state: a drained node must not take a client first.
            state_file.restore(self.state_path, self.services)
            self.save_state()
        if self.on_swap is not None:
            self.on_swap()
        # The sockets already listen, so clients arriving now wait in the backlog. Serving starts once every
        # backend's first check has answered (or its timeout passed): otherwise the first clients after a start or
        # restart would find no healthy backend and be turned away from a perfectly healthy cluster.
        grace = max(sc.health_check.timeout for sc in self.config.services) + 1.0
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(s.first_checks.wait() for s in self.services.values()))
        except TimeoutError:
            log.warning("serving before every backend's first health check answered", waited=grace)
        self._start_l4()
        if self.role == "parent":
            self.hold(socks)
            await self._start_workers()
        else:
            for sc in self.config.services:
                if sc.name not in socks:
                    continue  # an l4 service: the kernel forwards its flows
                service = self.services[sc.name]
                await service.start(socks[sc.name], node_socks[sc.name])
                if self.role == "single":
                    log.info("service listening", service=sc.name, listen=sc.listen, backends=len(sc.backends))
        self.state = "running"
        self.listeners_ready.set()

    async def _start_workers(self) -> None:
        from rabbitproxy.control.workers import WorkerSet

        self.workers = WorkerSet(self)
        try:
            await self.workers.start()
        except BaseException:
            await self.workers.shutdown()
            self.release_held()
            await self._stop_all_monitors()
            await self.steering.stop()
            raise
        for sc in self.config.services:
            log.info(
                "service listening",
                service=sc.name,
                listen=sc.listen,
                backends=len(sc.backends),
                workers=self.config.worker_count,
            )

    def _start_l4(self) -> None:
        """Write the l4 table (after the first checks, so it starts from their verdicts) and keep it in step."""
        if self.l4 is None:
            return
        if self.l4.wanted():
            try:
                self.l4.sync()
            except NftError as exc:
                names = [sc.name for sc in self.config.services if sc.mode == L4_NAT]
                raise ConfigError(
                    [f'services[{name!r}].mode: "l4-nat" could not program nftables table {self.l4.table!r}: {exc}'
                     for name in names]
                ) from None  # fmt: skip
        self.background.spawn(run_restarting(self.l4.run, "l4-nat"), name="l4-nat")

    def l4_now(self) -> None:
        """Apply a state change to the l4 table at once (the admin API's changes), not at the next poll."""
        if self.l4 is None or not self.l4.wanted():
            return
        try:
            self.l4.sync()
        except NftError as exc:
            self.l4.failures += 1
            log.error("nft refused the l4 table; the poll tries again", table=self.l4.table, error=str(exc))

    def bind(self, configs: list[ServiceConfig]) -> dict[str, socket.socket]:
        """Bind listeners as this role does: a worker with SO_REUSEPORT, the parent without listening.

        An l4 service gets none: the kernel forwards its flows (rabbitproxy.control.l4).
        """
        configs = [sc for sc in configs if sc.mode != L4_NAT]
        if self.role == "single":
            return bind_all(configs)
        return bind_all(configs, reuse_port=True, listen=self.role == "worker")

    def bind_nodes(
        self, configs: list[ServiceConfig], socks: dict[str, socket.socket]
    ) -> dict[str, dict[str, socket.socket]]:
        """Bind the stream services' node_port listeners (none in the parent, whose workers listen on them).

        On failure every socket of ``socks`` is closed too: the start fails as a whole.
        """
        out: dict[str, dict[str, socket.socket]] = {sc.name: {} for sc in configs}
        if self.role == "parent":
            return out
        try:
            for sc in configs:
                out[sc.name] = bind_node_listeners(sc, reuse_port=self.role == "worker")
        except ConfigError:
            for s in [*socks.values(), *(n for nodes in out.values() for n in nodes.values())]:
                s.close()
            raise
        return out

    def new_service(self, sc: ServiceConfig, tls: ServiceTLS) -> Service:
        service = Service(sc, tls=tls)
        if self.role == "worker":
            # A worker's backends are checked by the parent, which sends their state before the worker serves.
            service.first_checks.set()
        return service

    def hold(self, socks: dict[str, socket.socket]) -> None:
        """The parent keeps ``socks`` (bound, not listening) in place of any it held for the same services."""
        for name, sock in socks.items():
            old = self.held.pop(name, None)
            if old is not None:
                old.close()
            self.held[name] = sock
            self.services[name].bound = [sock.getsockname()[:2]]

    def release_held(self, names: list[str] | None = None) -> None:
        for name in list(self.held) if names is None else names:
            sock = self.held.pop(name, None)
            if sock is not None:
                sock.close()

    def _steer_workers(self, service: str, backend: str, cause: str) -> None:
        if self.workers is not None:
            # The state goes first: a worker closes only if the backend is still in the state the close is for.
            self.workers.push_state()
            self.workers.tell_all({"t": "steer", "service": service, "backend": backend, "cause": cause})

    def _unsteer_workers(self, service: str, backend: str) -> None:
        if self.workers is not None:
            self.workers.tell_all({"t": "unsteer", "service": service, "backend": backend})

    def kill_workers(self) -> None:
        """The operator asked twice to stop: the workers end now too, with their connections."""
        if self.workers is not None:
            self.workers.kill_all()

    def state_changed(self) -> None:
        """An operator changed a backend (the admin API): the workers get it now, and the state file keeps it."""
        if self.workers is not None:
            self.workers.push_state()
        self.save_state()
        self.l4_now()

    def save_state(self) -> None:
        """Write ``[admin] state_file`` (if configured) from the backends as they are now."""
        if self.state_path is not None:
            # Synchronous on purpose: a few hundred bytes after an operator's change, and no await may let another
            # change write an older picture over this one.
            state_file.save(self.state_path, self.services)

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
        if self.workers is not None:
            # Each worker drains its own connections with shutdown_timeout; the parent has none.
            await self.workers.shutdown()
            self.release_held()
        else:
            await asyncio.gather(*(s.drain(s.config.shutdown_timeout) for s in self.services.values()))
        await self._stop_all_monitors()
        for name in list(self.management):
            await self.close_management(name)
        await self.background.cancel_all()
        if self.l4 is not None:
            # A clean stop takes the table away (a crash leaves it, and traffic keeps flowing meanwhile).
            self.l4.remove()
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
        if self.role == "worker":
            # The parent watches every backend; a worker only copies what it learns.
            return
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
            try:
                result = await self._reload(new)
            except ReloadRefusedError:
                raise
            except Exception:
                self.last_reload.record(successful=False)
                raise
            # With workers, a reload some worker refused left that worker on the old configuration: a failure.
            self.last_reload.record(successful=not result.worker_errors)
            return result

    async def _reload(self, new: Config | None) -> ReloadResult:
        if new is None:
            if self.config_path is None:
                raise ConfigError(["no configuration file to reload (started from command-line options)"])
            # The validation serve and check-config run: every error of the file in one ConfigError.
            new = config_mod.load(self.config_path)
            for warning in config_mod.warnings(new):
                log.warning("configuration warning", warning=warning)
        if "workers" not in new.model_fields_set:
            # A file without the key keeps what runs (set by `serve --workers`, say): not a change.
            new = new.model_copy(update={"workers": self.config.workers})
        if new.worker_count != self.config.worker_count:
            raise ConfigError(
                [
                    f"workers: the number of worker processes cannot change by reload (running "
                    f"{self.config.worker_count}, the new configuration says {new.worker_count}); restart instead"
                ]
            )
        self._refuse_node_port_changes(new)
        self._refuse_l4_changes(new)
        result = await apply(self, new)
        # Backends removed, runtime weights dropped for a weight edited in the file: the state file follows, and
        # the l4 table at once, not at its next poll.
        self.save_state()
        self.l4_now()
        if self.workers is not None:
            result.worker_errors = await self.workers.reload(new)
        return result

    def _refuse_node_port_changes(self, new: Config) -> None:
        """node_port listeners are opened at start only: a reload may not add, move or remove one."""
        old = {sc.name: sc.node_listens for sc in self.config.services}
        errors = [
            f"services[{sc.name!r}]: node_port listeners cannot change by reload (running"
            f" {old.get(sc.name, [])}, the new configuration says {sc.node_listens}); restart instead"
            for sc in new.services
            if sc.node_listens != old.get(sc.name, []) and (sc.node_listens or old.get(sc.name))
        ]
        errors += [
            f"services[{name!r}]: a service with node_port listeners cannot be removed by reload; restart instead"
            for name, listens in old.items()
            if listens and name not in {sc.name for sc in new.services}
        ]
        if errors:
            raise ConfigError(errors)

    def _refuse_l4_changes(self, new: Config) -> None:
        """A service's mode and the table's name cannot change by reload: listeners and table would be half-swapped."""
        errors = [
            f"services[{sc.name!r}].mode: cannot change by reload (running {self.services[sc.name].config.mode!r}, "
            f"the new configuration says {sc.mode!r}); restart instead, or add the service under another name"
            for sc in new.services
            if sc.name in self.services and self.services[sc.name].config.mode != sc.mode
        ]
        if new.nft_table != self.config.nft_table:
            errors.append(
                f"nft_table: cannot change by reload (running {self.config.nft_table!r}, the new configuration says "
                f"{new.nft_table!r}); restart instead"
            )
        if errors:
            raise ConfigError(errors)

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

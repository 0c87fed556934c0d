"""Taking a node out the way RabbitMQ wants it: drain with a deadline, maint through the broker, the quorum guard,
and each service's rebalancer.

One :class:`Steering` per process, owned by the supervisor. The admin API asks it for the quorum guard's verdict
and then to apply an operator's state; reloads and the shutdown tell it which services came, changed or went.

- **Drain with a deadline**: no new connections at once; when the deadline passes, the connections still open
  are closed through the broker with "rabbitproxy: node X is being drained". A later state change of the same
  backend (ready, maint, a new drain) cancels a pending deadline.
- **Maint** with ``[services.rabbitmq]``: the open connections are closed through the broker at close_rate
  instead of by TCP at once.
- **Operator closes** of one connection (``DELETE /api/connections/{id}``) go through the same closer, unpaced.
- **Quorum guard**: before a backend leaves ``ready`` for drain or maint, its node is asked whether it is
  quorum-critical; the answer decides between going ahead, 409 (naming the queues) and 503 (the check could not
  be made), unless the operator forces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from rabbitproxy.balancing.backend import AdminState, Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import Connection
from rabbitproxy.control.closer import YOUNG, BrokerCloser, Cause, CloseOutcome, CloseStats
from rabbitproxy.control.management import ManagementAPI, ManagementUnavailable, base_url_for
from rabbitproxy.control.rebalancer import Rebalancer
from rabbitproxy.relay.service import Service
from rabbitproxy.tasks import Backoff, OwnedTasks, run_restarting

log = structlog.get_logger("rabbitproxy.steering")


def drain_text(backend: str) -> str:
    return f"rabbitproxy: node {backend} is being drained"


def maint_text(backend: str) -> str:
    return f"rabbitproxy: node {backend} is in maintenance"


@dataclass(frozen=True, slots=True)
class Refusal:
    """The quorum guard's no: the HTTP status to answer (409 or 503), why, and the queues at risk."""

    status: int
    message: str
    queues: tuple[str, ...] = ()


@dataclass
class _Pending:
    task: asyncio.Task[None]
    kind: Cause
    # loop time when a drain's deadline passes; None for a maint close in progress.
    due: float | None = None


class Steering:
    def __init__(self, services: Mapping[str, Service]) -> None:
        self.services = services
        self.closers: dict[str, BrokerCloser] = {}
        # Kept by service name over reloads, so the counters behind the metrics never go backwards.
        self.stats: dict[str, CloseStats] = {}
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.rebalancers: dict[str, tuple[Rebalancer, asyncio.Task[None]]] = {}
        self.tasks = OwnedTasks()
        # With workers = N the parent holds no connection: a drain deadline or a maint close is sent to every
        # worker (service, backend, cause), which closes its own through its own closer (close_for); any new state
        # an operator sets cancels what the workers still run for the old one (remote_cancel, cancel_for).
        self.remote: Callable[[str, str, Cause], None] | None = None
        self.remote_cancel: Callable[[str, str], None] | None = None
        # Whether the rebalancers run here: not in the parent of workers, where each worker balances its own share.
        self.rebalancing = True
        # Told (service, backend) when a drain's deadline passes, before the closes: the l4 table cuts the flows
        # the kernel forwards, which no closer knows (rabbitproxy.control.l4).
        self.on_deadline: Callable[[str, str], None] | None = None

    # -- services coming and going ----------------------------------------------------------------------------

    def service_added(self, service: Service) -> None:
        self.stats.setdefault(service.name, CloseStats())
        self.closers[service.name] = BrokerCloser(service.config, self.stats[service.name])
        self._start_rebalancer(service)

    async def service_changed(self, service: Service) -> None:
        """A reload gave ``service`` a new configuration: new closer and rebalancer; forget removed backends."""
        old = self.closers.get(service.name)
        self.closers[service.name] = BrokerCloser(service.config, self.stats.setdefault(service.name, CloseStats()))
        if old is not None:
            # A batch still running finishes with the old session (its closes are already decided); then it goes.
            self.tasks.spawn(_close_when_idle(old), name=f"close session {service.name}")
        for key in [k for k in self.pending if k[0] == service.name and k[1] not in service.pool.by_name]:
            self._cancel(key)
        await self._stop_rebalancer(service.name)
        self._start_rebalancer(service)

    async def service_removed(self, name: str) -> None:
        for key in [k for k in self.pending if k[0] == name]:
            self._cancel(key)
        await self._stop_rebalancer(name)
        closer = self.closers.pop(name, None)
        if closer is not None:
            await closer.aclose()

    async def stop(self) -> None:
        for name in list(self.rebalancers):
            await self._stop_rebalancer(name)
        self.pending.clear()
        await self.tasks.cancel_all()
        for closer in self.closers.values():
            await closer.aclose()
        self.closers.clear()

    def _start_rebalancer(self, service: Service) -> None:
        if not service.config.rebalance.enabled or not self.rebalancing:
            return
        name = service.name
        rebalancer = Rebalancer(name, self.services, lambda: self.closers.get(name))
        task = self.tasks.spawn(
            run_restarting(rebalancer.run, f"rebalancer {name}", Backoff(), service=name), name=f"rebalancer {name}"
        )
        self.rebalancers[name] = (rebalancer, task)

    async def _stop_rebalancer(self, name: str) -> None:
        entry = self.rebalancers.pop(name, None)
        if entry is None:
            return
        rebalancer, task = entry
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rebalancer.stop()

    # -- the quorum guard ---------------------------------------------------------------------------------------

    async def quorum_guard(self, service: Service, backend: Backend) -> Refusal | None:
        """None when ``backend`` may leave service; else why not. Asked only with [services.rabbitmq]."""
        rabbitmq = service.config.rabbitmq
        closer = self.closers.get(service.name)
        url = base_url_for(service.config, backend.config)
        if rabbitmq is None or not rabbitmq.quorum_guard or url is None or closer is None or closer.session is None:
            return None
        try:
            check = await ManagementAPI(closer.session, url, rabbitmq.timeout).quorum_check()
        except ManagementUnavailable as exc:
            # Not knowing is not a yes: the node may be the one a quorum queue's majority depends on.
            return Refusal(
                503,
                f"quorum guard: cannot ask {backend.name} whether it is quorum-critical ({exc}); "
                'nothing was changed; send "force": true to go ahead anyway',
            )
        if not check.critical:
            return None
        queues = ", ".join(check.queues) or "(the broker named none)"
        return Refusal(
            409,
            f"{backend.name} is quorum-critical: taking it out would leave quorum queues without a majority: "
            f'{queues}; nothing was changed; send "force": true to go ahead anyway',
            check.queues,
        )

    # -- operator states ----------------------------------------------------------------------------------------

    def set_state(
        self, service: Service, backend: Backend, state: AdminState, deadline: float | None = None
    ) -> dict[str, object]:
        """Apply an operator's state (after the guard), cancelling whatever an earlier one left pending.

        Returns what happened, for the API's answer: closed_connections (by TCP now), closing_through_broker,
        deadline.
        """
        key = (service.name, backend.name)
        cancelled = self._cancel(key)
        if self.remote_cancel is not None:
            # With workers = N the batches run there, and the parent cannot know whether one still is.
            self.remote_cancel(service.name, backend.name)
        through_broker = service.config.rabbitmq is not None
        closed = backend.set_operator_state(state, CloseReason.BACKEND_MAINT, close=not through_broker)
        out: dict[str, object] = {"closed_connections": closed}
        if cancelled is not None:
            out["cancelled"] = cancelled
        if state == "maint" and through_broker and (backend.connections or self.remote is not None):
            # len(), not a list: in the parent of workers = N the set is a Tally of the workers' connections.
            closing = len(backend.connections)
            task = self.tasks.spawn(
                self._close(key, "maint", CloseReason.BACKEND_MAINT, maint_text(backend.name)),
                name=f"maint {service.name}/{backend.name}",
            )
            self.pending[key] = _Pending(task, "maint")
            out["closing_through_broker"] = closing
        elif state == "drain" and deadline is not None:
            loop = asyncio.get_running_loop()
            task = self.tasks.spawn(self._deadline(key, deadline), name=f"drain deadline {service.name}/{backend.name}")
            self.pending[key] = _Pending(task, "drain", due=loop.time() + deadline)
            out["deadline"] = deadline
        return out

    async def close_one(
        self, service: Service, conn: Connection, reason: CloseReason, text: str, *, young: float = YOUNG
    ) -> CloseOutcome:
        """An operator's close of one connection, through the service's closer (unpaced: see control.closer)."""
        closer = self.closers.get(service.name)
        if closer is None:
            # The service is being removed or the proxy is stopping; its closer and session are gone.
            conn.close(reason)
            return CloseOutcome("tcp", "the service is stopping")
        return await closer.close_one(conn, pool=service.pool.backends, reason=reason, text=text, young=young)

    def close_for(self, service: str, backend: str, cause: Cause) -> None:
        """In a worker: close this worker's connections of ``backend`` as the parent's steering decided."""
        key = (service, backend)
        self._cancel(key)
        if cause == "drain":
            coro = self._close(key, "drain", CloseReason.DRAIN_DEADLINE, drain_text(backend))
        else:
            coro = self._close(key, "maint", CloseReason.BACKEND_MAINT, maint_text(backend))
        task = self.tasks.spawn(coro, name=f"{cause} {service}/{backend}")
        self.pending[key] = _Pending(task, cause)

    def cancel_for(self, service: str, backend: str) -> None:
        """In a worker: the operator set another state; stop this worker's batch of closes for the old one."""
        self._cancel((service, backend))

    def deadline_left(self, service: str, backend: str) -> float | None:
        """Seconds until ``backend``'s drain deadline, or None when none is pending."""
        entry = self.pending.get((service, backend))
        if entry is None or entry.due is None:
            return None
        return max(0.0, entry.due - asyncio.get_running_loop().time())

    def _cancel(self, key: tuple[str, str]) -> str | None:
        entry = self.pending.pop(key, None)
        if entry is None:
            return None
        entry.task.cancel()
        log.info("pending close cancelled", service=key[0], backend=key[1], kind=entry.kind)
        return "drain deadline" if entry.kind == "drain" else "maint close"

    async def _deadline(self, key: tuple[str, str], seconds: float) -> None:
        await asyncio.sleep(seconds)
        log.info("drain deadline passed", service=key[0], backend=key[1], deadline=seconds)
        if self.on_deadline is not None:
            try:
                self.on_deadline(*key)
            except Exception:  # our bug: logged with its traceback; the closes below still run
                log.exception("cutting the flows at a drain deadline failed", service=key[0], backend=key[1])
        await self._close(key, "drain", CloseReason.DRAIN_DEADLINE, drain_text(key[1]))

    async def _close(self, key: tuple[str, str], cause: Cause, reason: CloseReason, text: str) -> None:
        me = asyncio.current_task()
        try:
            # Looked up now, not when the task was started: a reload may have replaced the service's objects.
            service = self.services.get(key[0])
            backend = service.pool.by_name.get(key[1]) if service is not None else None
            closer = self.closers.get(key[0])
            if service is None or backend is None or closer is None:
                return
            expected: AdminState = "drain" if cause == "drain" else "maint"
            if backend.operator_state != expected:
                return
            if self.remote is not None:
                self.remote(key[0], key[1], cause)
                return
            conns = sorted(backend.connections, key=lambda c: c.started, reverse=True)
            await closer.close(backend, conns, pool=service.pool.backends, cause=cause, reason=reason, text=text)
        except Exception:  # our bug: logged with its traceback; the proxy carries on
            log.exception("closing through the broker failed", service=key[0], backend=key[1], cause=cause)
        finally:
            entry = self.pending.get(key)
            if entry is not None and entry.task is me:
                del self.pending[key]


async def _close_when_idle(closer: BrokerCloser) -> None:
    async with closer.lock:
        await closer.singles_done.wait()
        await closer.aclose()

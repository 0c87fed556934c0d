"""The rebalancer of one service: moves clients off backends that hold more than their share, through the broker.

After a node restarts, robust clients have all reconnected to the other nodes and stay there for days. Once a
backend has held more than ``(1 + tolerance)`` x its fair share for ``after`` seconds, the rebalancer closes the
excess through the broker (320, "rabbitproxy: rebalancing"), within the service's close_rate, and holds the
crowded backends (:attr:`Backend.rebalance_hold`) until the ones below their share have filled up, so the clients
it moved reconnect where the room is. The decisions are :mod:`rabbitproxy.balancing.rebalance`'s; this module
only applies them on a clock.

It moves the *youngest* connections first: after an outage those are precisely the clients that moved during it,
they have built up the least (consumers, channels, unacknowledged deliveries), and the long-lived connections of
clients that never saw the outage are left alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.rebalance import Balance, Share, balances, held, to_close
from rabbitproxy.balancing.views import Connection
from rabbitproxy.control.closer import BrokerCloser
from rabbitproxy.relay.service import Service
from rabbitproxy.tasks import OwnedTasks

log = structlog.get_logger("rabbitproxy.rebalancer")

REASON_TEXT = "rabbitproxy: rebalancing"
# How often the shares are looked at; `after` is measured in these steps.
TICK = 1.0
# A hold lasts at most this long after the last close: clients that do not come back must not pin it.
HOLD_FOR = 60.0


def service_balance(service: Service) -> list[Balance]:
    """The shares of the service's regular backends that take new connections (also for the metrics)."""
    return balances(Share(b.name, b.active, b.weight) for b in service.pool.backends if not b.backup)


class Rebalancer:
    """One service's rebalancing loop; :meth:`run` until cancelled, :meth:`tick` is one look (tests call it)."""

    def __init__(self, name: str, services: Mapping[str, Service], closer: Callable[[], BrokerCloser | None]) -> None:
        self.name = name
        self.services = services
        self.closer = closer
        self.over_since: dict[str, float] = {}
        self.hold_until = 0.0
        self.batch: asyncio.Task[None] | None = None
        self.tasks = OwnedTasks(service=name)

    async def run(self) -> None:
        try:
            while True:
                try:
                    self.tick(asyncio.get_running_loop().time())
                except Exception:  # our bug: logged with its traceback, the loop carries on
                    log.exception("rebalancer step failed", service=self.name)
                await asyncio.sleep(TICK)
        finally:
            await self.stop()

    async def stop(self) -> None:
        await self.tasks.cancel_all()
        service = self.services.get(self.name)
        if service is not None:
            for b in service.pool.backends:
                b.rebalance_hold = False

    def tick(self, now: float) -> None:
        service = self.services.get(self.name)
        if service is None:
            return
        cfg = service.config.rebalance
        balance = service_balance(service)
        over_now = {b.name for b in balance if b.over(cfg.tolerance)}
        for name in list(self.over_since):
            if name not in over_now:
                del self.over_since[name]
        for name in over_now:
            self.over_since.setdefault(name, now)
        busy = self.batch is not None and not self.batch.done()
        if not busy:
            due = [n for n in over_now if now - self.over_since[n] >= cfg.after]
            plan = to_close(balance, cfg.tolerance, due)
            if plan:
                self._start(service, balance, plan, now)
        holding = busy or now < self.hold_until
        hold = held(balance) if holding else set()
        for b in service.pool.backends:
            b.rebalance_hold = b.name in hold

    def _start(self, service: Service, balance: list[Balance], plan: dict[str, int], now: float) -> None:
        closer = self.closer()
        if closer is None:
            return
        picks: list[tuple[Backend, list[Connection]]] = []
        for name, n in plan.items():
            backend = service.pool.by_name[name]
            youngest = sorted(backend.connections, key=lambda c: c.started, reverse=True)[:n]
            picks.append((backend, list(youngest)))
            # After a round it must be over for `after` seconds again before the next one.
            self.over_since[name] = now
        self.hold_until = now + HOLD_FOR
        log.info(
            "rebalancing",
            service=self.name,
            close=plan,
            shares={b.name: round(b.share, 3) for b in balance},
            fair={b.name: round(b.fair, 3) for b in balance},
        )
        self.batch = self.tasks.spawn(self._close(service, closer, picks), name=f"rebalance {self.name}")

    async def _close(
        self, service: Service, closer: BrokerCloser, picks: list[tuple[Backend, list[Connection]]]
    ) -> None:
        for backend, conns in picks:
            await closer.close(
                backend,
                conns,
                pool=service.pool.backends,
                cause="rebalance",
                reason=CloseReason.REBALANCE,
                text=REASON_TEXT,
            )

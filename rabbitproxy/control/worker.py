"""One worker process of ``workers = N``: the data path of every service, steered by the parent over its channel.

Started by :mod:`rabbitproxy.control.workers` as ``python -m rabbitproxy.control.worker INDEX FD LOOP``. It waits
for the parent's ``start`` message (configuration and backend state), binds each listener with SO_REUSEPORT,
serves, and from then on applies what the parent sends: backend state (and the closes it implies: a backend in
maint, or marked down with ``on_marked_down = "close"``), reloads, and the shutdown. It runs no health check, agent
or node monitor, and no admin API. When the channel reaches EOF (the parent died) it drains and exits: a worker is
never left orphaned.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from rabbitproxy import config as config_mod
from rabbitproxy import logs
from rabbitproxy.balancing import listing
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.snapshot import apply_backend_state
from rabbitproxy.config import Config, ConfigError
from rabbitproxy.control.channel import Channel, ChannelError, Message
from rabbitproxy.control.closer import Cause, CloseStats
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.control.workers import ID_BLOCK, STATS_INTERVAL
from rabbitproxy.relay import leg_state
from rabbitproxy.relay.legs import ClientLeg
from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.workers")


def share_limits(config: Config, workers: int) -> Config:
    """``config`` with each ``max_connections``, ``connect_rate`` (service and backend) and ``close_rate`` split into
    worker shares.

    SO_REUSEPORT spreads connects evenly over the workers, so ceil(max / N) each keeps the total within N-1 of the
    limit while every worker decides alone, with nothing shared on the data path (docs/configuration.md).
    """
    if workers <= 1:
        return config
    services = []
    for sc in config.services:
        backends = [
            bc.model_copy(
                update={
                    "max_connections": math.ceil(bc.max_connections / workers),
                    "connect_rate": bc.connect_rate / workers,
                }
            )
            for bc in sc.backends
        ]
        update: dict[str, Any] = {"max_connections": math.ceil(sc.max_connections / workers), "backends": backends}
        if sc.connect_rate > 0:
            # Paced alone, each worker takes its share of the rate and of the burst (the default burst follows the
            # share of the rate by itself): the brokers see at most the configured rate and burst in all.
            update["connect_rate"] = sc.connect_rate / workers
            if sc.connect_burst:
                update["connect_burst"] = math.ceil(sc.connect_burst / workers)
        if sc.rabbitmq is not None:
            # Each worker closes its own connections through the broker; together they keep to close_rate.
            update["rabbitmq"] = sc.rabbitmq.model_copy(update={"close_rate": sc.rabbitmq.close_rate / workers})
        services.append(sc.model_copy(update=update))
    return config.model_copy(update={"services": services})


class Worker:
    def __init__(self, index: int, channel: Channel) -> None:
        self.index = index
        self.channel = channel
        self.workers = 1
        self.sup: Supervisor | None = None
        self.state: dict[str, dict[str, list[Any]]] = {}
        self.started: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.stop = asyncio.Event()
        # The parent's number for the configuration this worker runs (control.workers, reloads).
        self.generation = 0

    def config_from(self, data: dict[str, Any]) -> Config:
        return share_limits(config_mod.validate(data, "the parent process"), self.workers)

    async def run(self) -> int:
        # Bound before the channel's task starts: every task made from it (notifications, requests, the closes they
        # start) copies this context, so each line this process logs says which worker wrote it.
        structlog.contextvars.bind_contextvars(worker=self.index)
        serving: asyncio.Future[Any] = asyncio.ensure_future(self.channel.serve(self.notified, self.answer))
        await asyncio.wait([serving, self.started], return_when=asyncio.FIRST_COMPLETED)
        if not self.started.done():
            return 1
        start = self.started.result()
        self.workers = int(start["workers"])
        self.generation = int(start.get("generation", 0))
        try:
            config = self.config_from(start["config"])
        except ConfigError as exc:
            self.channel.send({"t": "failed", "errors": exc.errors})
            await self.channel.writer.drain()
            return 2
        logs.setup(config.log.level, config.log.format)
        # Connection ids unique over all workers and all their restarts, with nothing on the data path: worker i
        # of N numbers its connections first, first+N, first+2N... with first = i+1 modulo N, so (id - 1) % N
        # names the worker that has one; the parent picks `first` past every id an earlier worker i reserved.
        leg_state.use_ids(worker_ids(int(start.get("first_id", self.index + 1)), self.workers, self.reserve_ids))
        sup = Supervisor(config, role="worker")
        sup.on_swap = self.apply_state
        self.sup = sup
        loop = asyncio.get_running_loop()
        # The parent decides when the workers stop: a Ctrl-C reaches the whole process group, and only the
        # parent's handler runs the shutdown (which then tells every worker). SIGTERM sent to a worker alone
        # drains it like the parent's order would.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        try:
            await sup.start()
        except ConfigError as exc:
            self.channel.send({"t": "failed", "errors": exc.errors})
            await self.channel.writer.drain()
            await sup.shutdown()
            return 2
        # As in the single process (app.serve): what start-up allocated lives for the whole run.
        gc.freeze()
        self.channel.send({"t": "ready", "pid": os.getpid(), "generation": self.generation})
        stats = asyncio.ensure_future(self.send_stats())
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            log.warning("the parent process is gone; draining and exiting")
        await sup.shutdown()
        stats.cancel()
        stopping.cancel()
        if not serving.done():
            # One last count for the parent, so the connections closed by the drain are not lost from the totals.
            self.channel.send(self.stats())
            await self.channel.writer.drain()
            self.channel.close()
        return 0

    # -- from the parent -----------------------------------------------------------------------------------------

    def notified(self, message: Message) -> None:
        kind = message.get("t")
        if kind == "start" and not self.started.done():
            # Taken here, not when run() resumes: "state" messages behind it in the same read are newer.
            self.state = message["state"]
            self.started.set_result(message)
        elif kind == "state":
            self.take_state(message["services"], full=bool(message.get("full")))
        elif kind == "steer":
            if self.sup is not None:
                cause: Cause = "drain" if message["cause"] == "drain" else "maint"
                self.sup.steering.close_for(str(message["service"]), str(message["backend"]), cause)
        elif kind == "unsteer":
            # The operator changed the backend's state again (ready, a new drain): a batch of closes still running
            # here for the old one stops where it is.
            if self.sup is not None:
                self.sup.steering.cancel_for(str(message["service"]), str(message["backend"]))
        elif kind == "close":
            found = self.find(int(message["conn"]))
            if found is not None:
                found[1].close(CloseReason(message["reason"]))
        elif kind == "shutdown":
            self.stop.set()
        else:
            log.warning("unknown message from the parent", kind=kind)

    async def answer(self, message: Message) -> Message:
        sup = self.sup
        kind = message.get("t")
        if sup is None:
            return {"error": "not started"}
        if kind == "reload":
            try:
                result = await sup.reload(self.config_from(message["config"]))
            except ConfigError as exc:
                return {"errors": exc.errors}
            self.generation = int(message.get("generation", self.generation))
            return {"result": result.as_dict(), "generation": self.generation}
        if kind == "connections":
            # Filtered, sorted and cut to the page here: only what the page can show crosses the channel.
            query = listing.ConnectionQuery(**message["query"])
            now = float(message["now"])
            total, top = listing.rank(self.live(), query, now)
            return {"total": total, "rows": [[key, listing.connection_view(s, c, now)] for key, s, c in top]}
        if kind in ("connection", "close_one"):
            found = self.find(int(message["conn"]))
            if found is None:
                return {"missing": True}
            service, conn = found
            view = listing.connection_view(service.name, conn, time.monotonic())
            if kind == "connection":
                return {"view": view}
            outcome = await sup.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, str(message["text"]))
            return {"view": view, "via": outcome.via, "detail": outcome.detail}
        return {"error": f"unknown request {kind!r}"}

    def live(self) -> Iterator[tuple[str, ClientLeg]]:
        sup = self.sup
        if sup is None:
            return
        for name, service in sup.services.items():
            for conn in service.connections:
                yield name, conn

    def reserve_ids(self, upto: int) -> None:
        """Tell the parent, before any of them is used, that this worker's ids go up to (not including) ``upto``."""
        try:
            self.channel.send({"t": "ids", "next": upto})
        except ChannelError:
            pass  # the parent is gone: nobody will start a successor that could reuse these ids

    def take_state(self, services: dict[str, dict[str, list[Any]]], *, full: bool) -> None:
        """Keep the parent's backend state (all of it, or the backends that changed) and apply what came."""
        if full:
            self.state = services
        else:
            for sname, backends in services.items():
                self.state.setdefault(sname, {}).update(backends)
        self.apply_state(services)

    def find(self, conn_id: int) -> tuple[Service, ClientLeg] | None:
        sup = self.sup
        if sup is None:
            return None
        for service in sup.services.values():
            for conn in service.connections:
                if conn.id == conn_id:
                    return service, conn
        return None

    def apply_state(self, only: dict[str, dict[str, list[Any]]] | None = None) -> None:
        """Copy the parent's backend state (``only`` these backends, else all) onto this worker's backends, and act
        on what changed (synchronous)."""
        sup = self.sup
        if sup is None:
            return
        for sname, backends in (self.state if only is None else only).items():
            service = sup.services.get(sname)
            if service is None:
                continue
            for bname, state in backends.items():
                backend = service.pool.by_name.get(bname)
                if backend is None:
                    continue
                try:
                    change = apply_backend_state(backend, state)
                except ValueError as exc:
                    log.error("bad backend state from the parent", service=sname, backend=bname, error=str(exc))
                    continue
                if change.entered_maint:
                    if backend.operator_state != "maint" or service.config.rabbitmq is None:
                        backend.close_connections(CloseReason.BACKEND_MAINT)
                    # else: an operator's maint with [services.rabbitmq] closes through the broker, at close_rate,
                    # when the parent's steering says so ("steer").
                elif change.marked_down and service.config.health_check.on_marked_down == "close":
                    backend.close_connections(CloseReason.BACKEND_DOWN)
                if change.unusable:
                    service.cancel_connects_to(backend)

    # -- to the parent -------------------------------------------------------------------------------------------

    def stats(self) -> Message:
        sup = self.sup
        services = (
            {}
            if sup is None
            else {name: _service_stats(s, sup.steering.stats.get(name)) for name, s in sup.services.items()}
        )
        return {"t": "stats", "pid": os.getpid(), "generation": self.generation, "services": services}

    async def send_stats(self) -> None:
        # The first at once, right behind "ready": the parent judges a worker silent from then on (worker_watch).
        while True:
            try:
                self.channel.send(self.stats())
            except Exception:
                log.exception("sending counters to the parent failed")
            await asyncio.sleep(STATS_INTERVAL)


def _service_stats(service: Service, closed: CloseStats | None) -> dict[str, Any]:
    """One service's figures for the parent: counters (summed over restarts) apart from gauges (this worker now)."""
    counted = {}
    gauges = {}
    for b in service.pool.backends:
        traffic_in, traffic_out = b.traffic()
        counted[b.name] = [b.total, b.connect_errors, traffic_in, traffic_out]
        gauges[b.name] = [b.active, 1 if b.rebalance_hold else 0]
    counters = {
        "total": service.total,
        "ended": {str(k): v for k, v in service.ended.items()},
        "close_timeouts": service.close_timeouts,
        "failed_logins": service.failed_logins,
        "handshakes_given_up": service.handshakes_given_up,
        "closed": {} if closed is None else {f"{c}/{v}": n for (c, v), n in closed.counts.items()},
        "backends": counted,
    }
    out: dict[str, Any] = {
        "counters": counters,
        "gauges": {"active": service.active, "vhost_open": dict(service.vhost_open), "backends": gauges},
    }
    figures = service.admission_figures()
    if figures is not None:
        # Admission control: clients held and their waits count up; who is held now is a gauge, and the longest
        # wait is not a sum at all (the parent takes the largest).
        counters["admission"] = [figures.held, figures.wait_sum, list(figures.wait_buckets)]
        out["gauges"]["admission"] = figures.waiting
        out["oldest_wait"] = figures.oldest_wait
    return out


def worker_ids(first: int, step: int, reserve: Callable[[int], None]) -> Iterator[int]:
    """``first``, ``first + step``, ... for ever; ``reserve(end)`` is called before each block of ids is used."""
    n = first
    while True:
        end = n + ID_BLOCK * step
        reserve(end)
        while n < end:
            yield n
            n += step


async def _main(index: int, fd: int) -> int:
    channel = await Channel.open(socket.socket(fileno=fd))
    return await Worker(index, channel).run()


def main(argv: list[str]) -> int:
    index, fd, loop = int(argv[1]), int(argv[2]), argv[3] if len(argv) > 3 else "uvloop"
    if loop == "uvloop":
        import uvloop

        return int(uvloop.run(_main(index, fd)))
    return asyncio.run(_main(index, fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv))

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
import dataclasses
import gc
import itertools
import math
import os
import signal
import socket
import sys
import time
from typing import Any

import structlog

from rabbitproxy import config as config_mod
from rabbitproxy import logs
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.snapshot import apply_backend_state
from rabbitproxy.config import Config, ConfigError
from rabbitproxy.control.channel import Channel, Message
from rabbitproxy.control.closer import Cause
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.control.workers import STATS_INTERVAL
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

    def config_from(self, data: dict[str, Any]) -> Config:
        return share_limits(config_mod.validate(data, "the parent process"), self.workers)

    async def run(self) -> int:
        serving: asyncio.Future[Any] = asyncio.ensure_future(self.channel.serve(self.notified, self.answer))
        await asyncio.wait([serving, self.started], return_when=asyncio.FIRST_COMPLETED)
        if not self.started.done():
            return 1
        start = self.started.result()
        self.workers = int(start["workers"])
        try:
            config = self.config_from(start["config"])
        except ConfigError as exc:
            self.channel.send({"t": "failed", "errors": exc.errors})
            await self.channel.writer.drain()
            return 2
        logs.setup(config.log.level, config.log.format)
        structlog.contextvars.bind_contextvars(worker=self.index)
        # Connection ids unique over all workers, with nothing on the data path: worker i of N numbers its
        # connections i+1, i+1+N, i+1+2N... so (id - 1) % N names the worker that has one.
        leg_state._ids = itertools.count(self.index + 1, self.workers)
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
        self.channel.send({"t": "ready", "pid": os.getpid()})
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
            self.state = message["services"]
            self.apply_state()
        elif kind == "steer":
            if self.sup is not None:
                cause: Cause = "drain" if message["cause"] == "drain" else "maint"
                self.sup.steering.close_for(str(message["service"]), str(message["backend"]), cause)
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
            return {"result": result.as_dict()}
        if kind == "connections":
            return {"connections": [_connection_row(name, c) for name, c in self.live()]}
        if kind == "close_one":
            found = self.find(int(message["conn"]))
            if found is None:
                return {"missing": True}
            service, conn = found
            outcome = await sup.steering.close_one(service, conn, CloseReason.OPERATOR_CLOSE, str(message["text"]))
            return {"via": outcome.via, "detail": outcome.detail}
        return {"error": f"unknown request {kind!r}"}

    def live(self) -> list[tuple[str, ClientLeg]]:
        sup = self.sup
        if sup is None:
            return []
        return [(name, conn) for name, service in sup.services.items() for conn in service.connections]

    def find(self, conn_id: int) -> tuple[Service, ClientLeg] | None:
        sup = self.sup
        if sup is None:
            return None
        for service in sup.services.values():
            for conn in service.connections:
                if conn.id == conn_id:
                    return service, conn
        return None

    def apply_state(self) -> None:
        """Copy the parent's backend state onto this worker's backends, and act on what changed (synchronous)."""
        sup = self.sup
        if sup is None:
            return
        for sname, backends in self.state.items():
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
        services = {} if sup is None else {name: _service_stats(s) for name, s in sup.services.items()}
        return {"t": "stats", "pid": os.getpid(), "time": time.time(), "services": services}

    async def send_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            try:
                self.channel.send(self.stats())
            except Exception:
                log.exception("sending counters to the parent failed")


def _connection_row(service: str, conn: ClientLeg) -> list[Any]:
    """One connection as the parent rebuilds it (control.workers.RemoteConnection): a list, in that order."""
    backend = conn.backend
    hs = conn.handshake
    return [
        service,
        conn.id,
        backend.name if backend is not None else None,
        conn.client_addr,
        conn.bytes_in,
        conn.bytes_out,
        conn.started,
        conn.last_activity,
        dataclasses.asdict(hs) if dataclasses.is_dataclass(hs) and not isinstance(hs, type) else None,
    ]


def _service_stats(service: Service) -> dict[str, Any]:
    backends = {}
    for b in service.pool.backends:
        traffic_in, traffic_out = b.traffic()
        backends[b.name] = [b.active, b.total, b.connect_errors, traffic_in, traffic_out]
    return {
        "active": service.active,
        "total": service.total,
        "ended": {str(k): v for k, v in service.ended.items()},
        "close_timeouts": service.close_timeouts,
        "failed_logins": service.failed_logins,
        "handshakes_given_up": service.handshakes_given_up,
        "vhost_open": dict(service.vhost_open),
        "backends": backends,
        "admission": figures.to_wire() if (figures := service.admission_figures()) is not None else None,
    }


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

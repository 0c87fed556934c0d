"""Fakes for driving the code without sockets: a connection as the pool sees it, a transport, a service.

The transport and service let the relay legs be driven call by call (uvicorn's protocol tests).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.pool import Pool
from rabbitproxy.relay.deadlines import Deadlines
from rabbitproxy.relay.idle_watch import IdleWatch
from rabbitproxy.relay.keepalive import KEEPALIVE_AFTER
from rabbitproxy.relay.legs import BackendLeg, ClientLeg
from rabbitproxy.relay.service import Service

from .proxy import service_config


class FakeConn:
    """A connection as the pool, health checks, feedback and metrics see it: a backend, byte counts, close(reason)."""

    def __init__(self, backend: Backend | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self.backend = backend
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.reasons: list[str] = []

    def close(self, reason: str) -> None:
        self.reasons.append(reason)


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.buffer = bytearray()
        self.eof_written = False
        self.closing = False
        self.aborted = False
        self.reading = True
        self.limits: tuple[int, int] | None = None
        self.extra: dict[str, Any] = {"peername": peer, "sockname": ("127.0.0.1", 5672), "socket": None}
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        assert not self.eof_written, "write after write_eof"
        self.buffer += data

    def write_eof(self) -> None:
        assert not self.eof_written
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high or 0, low or 0)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.protocol is not None:
                # A real transport reports the loss on a later loop iteration.
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()


class HandClientLeg(ClientLeg):
    """A ClientLeg whose backend connects are driven by hand: starting one only counts it on the fake service."""

    def _connect_next(self) -> None:
        self.service.connects_started += 1  # type: ignore[attr-defined]


class FakeService:
    """Just enough of :class:`rabbitproxy.relay.service.Service` for one ClientLeg."""

    def __init__(self, **service: Any) -> None:
        service.setdefault("listen", "127.0.0.1:5672")
        backends = service.pop("backends", [{"name": "b1", "address": "127.0.0.1", "port": 1}])
        data = service_config(backends, name="t", **service)
        self.config = config_mod.ServiceConfig.model_validate(data)
        self.name = "t"
        self.pool = Pool.from_config(self.config, healthy=True)
        self.connections: set[ClientLeg] = set()
        self.accepting = True
        self.total = 0
        self.ended: Counter[str] = Counter()
        self.closed: list[ClientLeg] = []
        self.connects: set[Any] = set()
        self.connects_started = 0
        self.loop = asyncio.get_running_loop()
        self.connect_deadlines = Deadlines(self.loop, self.config.connect_timeout, ClientLeg.connect_timed_out)
        self.hello_deadlines = Deadlines(self.loop, self.config.client_hello_timeout, ClientLeg.hello_expired)
        self.close_deadlines = Deadlines(self.loop, self.config.close_timeout, ClientLeg.close_expired)
        self.keepalive_deadlines = Deadlines(self.loop, KEEPALIVE_AFTER, ClientLeg.keepalive_due)
        self.idle_watch = IdleWatch(self.loop, ClientLeg.idle_check)
        self.close_timeouts = 0
        self.failed_logins = 0
        self.handshakes_given_up = 0
        self.vhost_open: dict[str, int] = {}
        self.warned_no_heartbeat = False
        self.admission = None

    # The real bookkeeping of a finished AMQP handshake (counters, heartbeat watch): it needs only the fields above.
    handshake_finished = Service.handshake_finished

    def connect_failed(self, *args: Any) -> None:
        pass

    def connection_closed(self, conn: ClientLeg) -> None:
        self.connections.discard(conn)
        self.ended[conn.reason or "?"] += 1
        self.closed.append(conn)


def make_pair(
    svc: FakeService | None = None, *, attach: bool = False, **service: Any
) -> tuple[FakeService, ClientLeg, FakeTransport, BackendLeg, FakeTransport]:
    """A client leg and a backend leg over fake transports (a fresh FakeService unless given); ``attach`` joins them."""
    svc = svc or FakeService(**service)
    client = HandClientLeg(svc)  # type: ignore[arg-type]
    ct = FakeTransport()
    ct.protocol = client
    client.connection_made(ct)  # type: ignore[arg-type]
    leg = BackendLeg(client)
    bt = FakeTransport(("127.0.0.1", 1))
    bt.protocol = leg
    leg.connection_made(bt)  # type: ignore[arg-type]
    if attach:
        client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    return svc, client, ct, leg, bt

"""The data path: a client leg and a backend leg per connection, splicing bytes both ways.

Each accepted client gets a :class:`ClientLeg`. It asks the service's pool for a backend, connects to it (with a
deadline, retrying other backends), and from then on every chunk one leg receives is handed untouched to the other
leg's transport. Nothing is copied or parsed on that path.

Flow control is the transports' own: when a leg's write buffer passes its high-water mark the transport calls our
``pause_writing`` and we stop reading from the *other* side until ``resume_writing``. Half-closes are forwarded
with ``write_eof``; once both directions have ended, both transports are closed. Keeping both legs half-open after
both EOFs is what makes uvloop 0.21 to 0.23 abort the process ("double free or corruption"), so we never do that.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from rabbitproxy.pool import Backend
    from rabbitproxy.service import Service

# Why a connection ended; one of these appears in every connection log event and in the metrics.
CLIENT_CLOSED = "client closed"
BACKEND_CLOSED = "backend closed"
CLIENT_RESET = "client reset"
BACKEND_RESET = "backend reset"
CONNECT_FAILED = "connect failed"
NO_BACKEND = "no backend"
LIMIT = "limit"
IDLE_TIMEOUT = "idle timeout"
SHUTDOWN = "shutdown"
BACKEND_DOWN = "backend down"
BACKEND_MAINT = "backend maint"
SERVICE_REMOVED = "service removed"
REASONS = (
    CLIENT_CLOSED,
    BACKEND_CLOSED,
    CLIENT_RESET,
    BACKEND_RESET,
    CONNECT_FAILED,
    NO_BACKEND,
    LIMIT,
    IDLE_TIMEOUT,
    SHUTDOWN,
    BACKEND_DOWN,
    BACKEND_MAINT,
    SERVICE_REMOVED,
)


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            # The peer may already be gone; the transport will report that on its own.
            pass


def _addr(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class BackendLeg(asyncio.Protocol):
    """The proxy's connection to the chosen backend; forwards everything to the client leg."""

    __slots__ = ("client", "conn", "transport")

    def __init__(self, conn: ClientLeg) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.bytes_out += len(data)
        conn.client_write(data)
        if conn.idle_handle is not None:
            conn.last_activity = time.monotonic()

    def eof_received(self) -> bool:
        return self.conn.backend_eof()

    def pause_writing(self) -> None:
        self.conn.pause_client_reading()

    def resume_writing(self) -> None:
        self.conn.resume_client_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.backend_lost(exc)


class ClientLeg(asyncio.Protocol):
    """One client connection and everything about it: the backend leg, counters, and why it ended."""

    __slots__ = (
        "backend",
        "backend_eof_seen",
        "backend_leg",
        "backend_local",
        "backend_lost_flag",
        "backend_transport",
        "backend_write",
        "bytes_in",
        "bytes_out",
        "client_addr",
        "client_eof_seen",
        "client_lost",
        "client_write",
        "closed",
        "connect_task",
        "idle_handle",
        "last_activity",
        "peer_key",
        "pending",
        "reading_paused",
        "reason",
        "service",
        "started",
        "transport",
    )

    def __init__(self, service: Service) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.backend_leg: BackendLeg | None = None
        self.backend_transport: asyncio.Transport | None = None
        self.backend_write: Any = None
        self.client_write: Any = None
        self.backend_local = ""
        self.client_addr = ""
        self.peer_key: bytes | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        # Client bytes that arrive before the backend is connected; None once splicing.
        self.pending: bytearray | None = bytearray()
        self.client_eof_seen = False
        self.backend_eof_seen = False
        self.client_lost = False
        self.backend_lost_flag = False
        self.closed = False
        self.reading_paused = False
        self.reason: str | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_activity = 0.0
        self.started = time.monotonic()

    # -- client side ---------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.client_write = transport.write
        peer = transport.get_extra_info("peername")
        self.client_addr = _addr(peer)
        if isinstance(peer, tuple):
            self.peer_key = str(peer[0]).encode()
        service = self.service
        cfg = service.config
        service.connections.add(self)
        service.total += 1
        if not service.accepting:
            self.close(SHUTDOWN)
            return
        if len(service.connections) > cfg.max_connections:
            self.close(LIMIT)
            return
        _nodelay(transport)
        transport.set_write_buffer_limits(high=cfg.high_water, low=cfg.low_water)
        if cfg.client_idle_timeout > 0:
            self.last_activity = time.monotonic()
            self.idle_handle = asyncio.get_running_loop().call_later(
                cfg.client_idle_timeout, self._idle_check
            )
        self.connect_task = service.spawn(self._connect())

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        pending = self.pending
        if pending is None:
            self.backend_write(data)
        else:
            pending += data
            # Do not let a client that talks before the backend answers fill our memory.
            if len(pending) > self.service.config.high_water:
                self.pause_client_reading()
        if self.idle_handle is not None:
            self.last_activity = time.monotonic()

    def eof_received(self) -> bool:
        self.client_eof_seen = True
        if self.reason is None:
            self.reason = CLIENT_CLOSED
        if self.backend_transport is None:
            # Not connected yet: the EOF is forwarded after the buffered bytes once the backend answers.
            return True
        if self.backend_eof_seen:
            self._finish_both(CLIENT_CLOSED)
            return False
        try:
            self.backend_transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self._finish_both(CLIENT_CLOSED)
            return False
        return True

    def pause_writing(self) -> None:
        # The client is not keeping up: stop reading from the backend until its buffer drains.
        bt = self.backend_transport
        if bt is not None:
            try:
                bt.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def resume_writing(self) -> None:
        bt = self.backend_transport
        if bt is not None:
            try:
                bt.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_lost = True
        if self.reason is None:
            self.reason = CLIENT_RESET if exc is not None else CLIENT_CLOSED
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        bt = self.backend_transport
        if bt is not None and not bt.is_closing():
            bt.close()
        self._maybe_done()

    # -- backend side (called by BackendLeg) ---------------------------------------------------------------------

    def pause_client_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def resume_client_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def backend_eof(self) -> bool:
        self.backend_eof_seen = True
        if self.client_eof_seen:
            self._finish_both(BACKEND_CLOSED)
            return False
        if self.reason is None:
            self.reason = BACKEND_CLOSED
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self._finish_both(BACKEND_CLOSED)
            return False
        return True

    def backend_lost(self, exc: Exception | None) -> None:
        self.backend_lost_flag = True
        if self.reason is None:
            self.reason = BACKEND_RESET if exc is not None else BACKEND_CLOSED
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
        self._maybe_done()

    # -- connecting ----------------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        service = self.service
        cfg = service.config
        loop = asyncio.get_running_loop()
        tried: list[Backend] = []
        local_addr = (cfg.source_address, 0) if cfg.source_address else None
        for _attempt in range(cfg.retries + 1):
            backend = service.pool.choose(self.peer_key, tried)
            if backend is None:
                break
            tried.append(backend)
            leg = BackendLeg(self)
            try:
                async with asyncio.timeout(cfg.connect_timeout):
                    transport, _ = await loop.create_connection(
                        lambda leg=leg: leg, backend.address, backend.port, local_addr=local_addr
                    )
            except (OSError, TimeoutError) as exc:
                backend.connect_errors += 1
                service.connect_failed(backend, self.client_addr, exc)
                continue
            if self.closed or self.client_lost:
                transport.close()
                return
            self._attach(backend, leg, transport)
            return
        self.close(CONNECT_FAILED if tried else NO_BACKEND)

    def _attach(self, backend: Backend, leg: BackendLeg, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.backend = backend
        self.backend_leg = leg
        self.backend_transport = transport
        self.backend_write = transport.write
        backend.opened(self)
        cfg = self.service.config
        transport.set_write_buffer_limits(high=cfg.high_water, low=cfg.low_water)
        local = transport.get_extra_info("sockname")
        self.backend_local = _addr(local)
        pending = self.pending
        self.pending = None
        if pending:
            transport.write(bytes(pending))
        if self.client_eof_seen:
            transport.write_eof()
        self.resume_client_reading()

    # -- ending --------------------------------------------------------------------------------------------------

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.closed:
            return
        timeout = self.service.config.client_idle_timeout
        idle_for = time.monotonic() - self.last_activity
        if idle_for >= timeout:
            self.close(IDLE_TIMEOUT)
            return
        self.idle_handle = asyncio.get_running_loop().call_later(timeout - idle_for, self._idle_check)

    def _finish_both(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        for t in (self.transport, self.backend_transport):
            if t is not None and not t.is_closing():
                t.close()

    def close(self, reason: str) -> None:
        """End this connection (limit, shutdown, backend down, idle...); buffered bytes are still flushed."""
        if self.reason is None:
            self.reason = reason
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for t in (self.transport, self.backend_transport):
            if t is not None and not t.is_closing():
                t.close()

    def abort(self, reason: str) -> None:
        """End this connection now, dropping anything still buffered (the grace period is over)."""
        if self.reason is None:
            self.reason = reason
        for t in (self.transport, self.backend_transport):
            if t is not None:
                t.abort()

    def _maybe_done(self) -> None:
        if self.closed:
            return
        if not self.client_lost:
            return
        if self.backend_transport is not None and not self.backend_lost_flag:
            return
        self.closed = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        backend = self.backend
        if backend is not None:
            backend.closed(self, self.bytes_in, self.bytes_out)
        self.service.connection_closed(self)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

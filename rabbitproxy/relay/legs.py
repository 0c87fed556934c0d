"""The data path: a client leg and a backend leg per connection, splicing bytes both ways.

Each accepted client gets a :class:`ClientLeg`. It asks the service's pool for a backend, connects to it (with a
deadline, retrying other backends), and from then on every chunk one leg receives is handed untouched to the other
leg's transport. Nothing is copied on that path, and nothing is parsed after the AMQP handshake: for a service with
``protocol = "amqp"`` both legs feed a sans-IO :class:`~rabbitproxy.protocols.amqp_handshake.HandshakeReader`
until it is done (the broker's open-ok or refusal, or the reader gave up), then drop it, so from the first
frames on each chunk costs one ``is None`` check more than a plain TCP relay. What it learnt (user, vhost,
connection name, heartbeat) stays on the connection for the log, the admin API and the heartbeat timeout.

TCP_NODELAY is on for both legs without a call of ours: uvloop and asyncio both set it on every TCP transport they
create (accepted or connected), and asking a uvloop transport for its socket to set it again costs a socket object
per leg, a measurable share of a short connection's CPU. tests/protocol/test_relay.py checks it stays so.

Flow control is the transports' own: when a leg's write buffer passes its high-water mark the transport calls our
``pause_writing`` and we stop reading from the *other* side until ``resume_writing``. Half-closes are forwarded
with ``write_eof``; once both directions have ended, both transports are closed. Keeping both legs half-open after
both EOFs is what makes uvloop 0.21 to 0.23 abort the process ("double free or corruption"), so we never do that.


The code that runs once per connection lives in the base classes ClientLeg is built on: the fields and how a
connection ends (:mod:`~rabbitproxy.relay.leg_state`), connecting to a backend (:mod:`~rabbitproxy.relay.connecting`),
and the PROXY header, hello and handshake's end (:mod:`~rabbitproxy.relay.greeting`). Plain single inheritance with
empty ``__slots__`` in between: attribute and method lookups cost what they did in one class.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.amqp_handshake import HandshakeReader
from rabbitproxy.protocols.proxy_header import ProxyHeaderReader, ProxyProtocolError
from rabbitproxy.relay.greeting import HELLO_LENGTH, UNTRUSTED, GreetingLeg


class BackendLeg(asyncio.Protocol):
    """The proxy's connection to the chosen backend; forwards everything to the client leg."""

    __slots__ = ("client", "conn", "transport")

    def __init__(self, conn: ClientLeg) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.bytes_out += len(data)
        conn.client_write(data)
        reader = conn.hs_reader
        if reader is not None:
            # The broker's half of the AMQP handshake; after open-ok (or a refusal) the reader is gone.
            reader.server_data(data)
            if reader.done:
                conn.handshake_done(reader)
        if conn.idle_slot:
            conn.last_activity = time.monotonic()

    def eof_received(self) -> bool:
        conn = self.conn
        if conn.backend_tls:
            # A TLS transport cannot stay half-open (no write_eof; asyncio ignores a True here and warns), so the
            # backend's end closes both legs once what is buffered has been written.
            conn.backend_eof_seen = True
            conn._finish_both(CloseReason.BACKEND_CLOSED)
            return False
        return conn.backend_eof()

    def pause_writing(self) -> None:
        conn = self.conn
        conn.backend_full = True
        conn.pause_client_reading()

    def resume_writing(self) -> None:
        conn = self.conn
        conn.backend_full = False
        conn.resume_client_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        # Only the attached leg speaks for the backend side. A leg whose connect was abandoned after its transport
        # existed (deadline, cancelled for maint, re-check at attach failed) is closed by the loop or by us; its
        # loss must not end a client that has moved on to another backend.
        if conn.backend_leg is self:
            conn.backend_lost(exc)


class ClientLeg(GreetingLeg):
    """One client connection and everything about it: the backend leg, counters, and why it ended."""

    __slots__ = ()

    # -- client side ---------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.client_write = transport.write
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            # The printable address and the source-hash key are derived only when asked for (log, source-hash).
            self.client_src = (peer[0], peer[1])
        # client_dst (the listener address) is read only when a PROXY header needs it: one system call fewer.
        service = self.service
        cfg = service.config
        self.client_tls = cfg.tls is not None
        self.backend_tls = cfg.backend_tls
        service.connections.add(self)
        service.total += 1
        if not service.accepting:
            self.close(CloseReason.SHUTDOWN)
            return
        if len(service.connections) > cfg.max_connections:
            self.close(CloseReason.LIMIT)
            return
        transport.set_write_buffer_limits(high=cfg.high_water, low=cfg.low_water)
        amqp = cfg.protocol == "amqp"
        if amqp:
            reader = self.hs_reader = HandshakeReader()
            self.handshake = reader.handshake
        idle = cfg.client_idle_timeout
        # "auto" starts no timer here: it waits for the heartbeat (handshake_done); the hello deadline covers the start.
        if idle != "auto" and idle > 0:
            self.idle_timeout = idle
            now = self.last_activity = self.client_activity = time.monotonic()
            service.idle_watch.at(self, now + idle)
        if cfg.client_hello_timeout > 0 and (amqp or cfg.protocol == "stream"):
            self.hello_left = HELLO_LENGTH
            service.hello_deadlines.add(self)
        if cfg.accept_proxy_protocol:
            # The backend is chosen (source hash) and connected only once the header says who the client is, or,
            # for a source outside proxy_protocol_from, once its first bytes show it sends no header. Like HAProxy's
            # "expect-proxy layer4 if { src -f trusted }": untrusted sources are plain clients.
            src = self.client_src
            trusted = src is not None and service.proxy_trusted(src[0])
            self.pp_reader = ProxyHeaderReader() if trusted else UNTRUSTED
            if not self.hello_left:
                # Without a hello deadline the header still gets one, or a silent peer would hold its socket forever.
                service.header_deadlines.add(self)
            return
        self._connect_next()

    def data_received(self, data: bytes) -> None:
        if self.pp_reader is not None:
            data = self._read_proxy_header(data)
            if not data:
                return
        if self.hello_left > 0:
            self.hello_left -= len(data)
            if self.hello_left <= 0:
                self.service.hello_deadlines.discard(self)
        self.bytes_in += len(data)
        pending = self.pending
        if pending is None:
            self.backend_write(data)
        else:
            pending += data
            # Do not let a client that talks before the backend answers fill our memory.
            if len(pending) > self.service.config.high_water:
                self.pause_client_reading()
        reader = self.hs_reader
        if reader is not None:
            # The client's half of the handshake, buffered or spliced alike: the reader sees every byte once.
            reader.client_data(data)
            if reader.done:
                self.handshake_done(reader)
        if self.idle_slot:
            self.last_activity = self.client_activity = time.monotonic()

    def eof_received(self) -> bool:
        self.client_eof_seen = True
        if self.pp_reader is UNTRUSTED:
            # A plain client that left before saying anything that tells a header from AMQP.
            self._header_done()
            self.close(CloseReason.CLIENT_CLOSED)
            return False
        if self.pp_reader is not None:
            self._bad_proxy_header(ProxyProtocolError("connection closed before the PROXY header was complete"))
            return False
        if self.reason is None:
            self.reason = CloseReason.CLIENT_CLOSED
        if self.client_tls:
            # TLS cannot be half-closed; end both legs after flushing (the connect, if running, is cancelled).
            self.close(CloseReason.CLIENT_CLOSED)
            return False
        if self.backend_transport is None:
            desk = self.service.admission
            if desk is not None and not self.pending and self in desk:
                # Held for a connect token and gone without a word: it gives up its place, and no broker
                # connection is spent on it.
                self.close(CloseReason.CLIENT_CLOSED)
                return False
            # Not connected yet: the EOF is forwarded after the buffered bytes once the backend answers.
            return True
        if self.backend_eof_seen or self.backend_tls:
            self._finish_both(CloseReason.CLIENT_CLOSED)
            return False
        try:
            self.backend_transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self._finish_both(CloseReason.CLIENT_CLOSED)
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
            self.reason = CloseReason.CLIENT_RESET if exc is not None else CloseReason.CLIENT_CLOSED
        self._cancel_connect()
        bt = self.backend_transport
        if bt is not None and not bt.is_closing():
            bt.close()
            self._close_deadline()
        self._maybe_done()

    # -- backend side (called by BackendLeg) ---------------------------------------------------------------------

    def backend_eof(self) -> bool:
        self.backend_eof_seen = True
        if self.client_eof_seen:
            self._finish_both(CloseReason.BACKEND_CLOSED)
            return False
        if self.reason is None:
            self.reason = CloseReason.BACKEND_CLOSED
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self.client_tls:
            self._finish_both(CloseReason.BACKEND_CLOSED)
            return False
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self._finish_both(CloseReason.BACKEND_CLOSED)
            return False
        return True

    def backend_lost(self, exc: Exception | None) -> None:
        self.backend_lost_flag = True
        if self.reason is None:
            self.reason = CloseReason.BACKEND_RESET if exc is not None else CloseReason.BACKEND_CLOSED
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
            self._close_deadline()
        self._maybe_done()


ClientLeg.backend_leg_type = BackendLeg

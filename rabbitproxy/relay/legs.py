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

A transport's ``close()`` waits until its buffer is written, which is forever when the peer stopped reading (a
frozen broker, a stalled client). So every close starts the service's close deadline (``close_timeout``, one
timer for all connections, see :mod:`rabbitproxy.relay.deadlines`); when it expires both transports are aborted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Any, cast

from rabbitproxy import logs
from rabbitproxy.balancing.algorithms import source_key
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import SOURCE_CLIENT
from rabbitproxy.protocols.amqp_handshake import Handshake, HandshakeReader
from rabbitproxy.protocols.proxy_header import (
    NEED_DATA,
    ProxyHeaderReader,
    ProxyProtocolError,
    header_for,
    looks_like_header,
)
from rabbitproxy.relay.keepalive import set_keepalive
from rabbitproxy.relay.tls import cert_subject
from rabbitproxy.relay.transparent import connect_as_client

if TYPE_CHECKING:
    from rabbitproxy.balancing.pool import Backend
    from rabbitproxy.relay.service import Service

# The AMQP 0-9-1 protocol header ("AMQP" 0 0 9 1) is what every client sends first; client_hello_timeout waits for it.
HELLO_LENGTH = 8

# Stands in for the PROXY reader of a client outside proxy_protocol_from: it is a plain client, but its first bytes
# are looked at (never fed to a parser) so that a forged header is refused instead of passed on to the backend.
UNTRUSTED = ProxyHeaderReader()

# client_idle_timeout = "auto" closes a client that sent nothing for this many of its negotiated heartbeats. A live
# client sends a frame at least every heartbeat; 2.5 leaves room for a late one (RabbitMQ gives up after 2 to 3).
HEARTBEAT_FACTOR = 2.5

# Connection ids: small, unique in the process, never reused while it runs (the admin API names connections by them).
_ids = itertools.count(1)


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
        if conn.idle_handle is not None:
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


class ClientLeg(asyncio.Protocol):
    """One client connection and everything about it: the backend leg, counters, and why it ended."""

    __slots__ = (
        "backend",
        "backend_eof_seen",
        "backend_full",
        "backend_leg",
        "backend_local",
        "backend_lost_flag",
        "backend_tls",
        "backend_transport",
        "backend_write",
        "bytes_in",
        "bytes_out",
        "client_activity",
        "client_dst",
        "client_eof_seen",
        "client_lost",
        "client_src",
        "client_tls",
        "client_write",
        "close_aborted",
        "close_started",
        "closed",
        "connect_expired",
        "connect_leg",
        "connect_redirected",
        "connect_task",
        "handshake",
        "hello_left",
        "hs_reader",
        "id",
        "idle_handle",
        "idle_reason",
        "idle_timeout",
        "last_activity",
        "pending",
        "pp_reader",
        "reading_paused",
        "reason",
        "service",
        "started",
        "transport",
        "tried",
        "vhost_label",
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
        # The client's real endpoints: from the PROXY header when one was accepted, else the socket's.
        self.client_src: tuple[str, int] | None = None
        self.client_dst: tuple[str, int] | None = None
        self.client_tls = False
        self.backend_tls = False
        # Set while an upstream load balancer's PROXY header is still being read.
        self.pp_reader: ProxyHeaderReader | None = None
        # Bytes of the AMQP hello still expected while the hello deadline runs; 0 once it is done (or not used).
        self.hello_left = 0
        self.bytes_in = 0
        self.bytes_out = 0
        # Client bytes that arrive before the backend is connected; None once splicing.
        self.pending: bytearray | None = bytearray()
        self.client_eof_seen = False
        self.backend_eof_seen = False
        self.client_lost = False
        self.backend_lost_flag = False
        self.closed = False
        # A close has begun (its deadline runs), and whether that deadline expired and aborted both legs.
        self.close_started = False
        self.close_aborted = False
        self.reading_paused = False
        # The backend transport's buffer is past high_water (between its pause_writing and resume_writing).
        self.backend_full = False
        self.reason: CloseReason | None = None
        # The connect in flight: its task, the leg it will attach, whether its deadline cancelled it, and whether
        # it was cancelled to send the client elsewhere (its backend went into maint or out of the config).
        self.connect_task: asyncio.Task[Any] | None = None
        self.connect_leg: BackendLeg | None = None
        self.connect_expired = False
        self.connect_redirected = False
        # Backends tried so far, the last one being the connect in flight.
        self.tried: list[Backend] = []
        self.idle_handle: asyncio.TimerHandle | None = None
        # While idle_handle is set: the last byte either way, and the last byte from the client.
        self.last_activity = 0.0
        self.client_activity = 0.0
        # The timeout idle_handle watches (a fixed client_idle_timeout, or 2.5 x the heartbeat) and its reason.
        self.idle_timeout = 0.0
        self.idle_reason = CloseReason.IDLE_TIMEOUT
        self.started = time.monotonic()
        self.id = next(_ids)
        # AMQP services: the handshake reader, fed both sides until it is done and then dropped (None), and what it
        # learnt, which stays for the log event and the admin API.
        self.hs_reader: HandshakeReader | None = None
        self.handshake: Handshake | None = None
        # The vhost's label in the service's open-connections-per-vhost gauge, once the broker has opened it.
        self.vhost_label: str | None = None

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
            self.last_activity = self.client_activity = time.monotonic()
            self.idle_handle = service.loop.call_later(idle, self._idle_check)
        if cfg.client_hello_timeout > 0 and amqp:
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
        if self.idle_handle is not None:
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

    # -- connecting ----------------------------------------------------------------------------------------------

    def _connect_next(self) -> None:
        """Start connecting to the next backend the pool picks, or end the connection when none is left.

        Callbacks, not a coroutine: a connect is a task running ``create_connection``, its deadline is kept by the
        service (one timer for all connects), and its outcome arrives in :meth:`_connect_done`. A wrapping
        coroutine with ``asyncio.timeout`` cost a second task step, a ``Timeout`` object with its timer and
        three running-loop lookups (each a ``getpid()`` system call on Python 3.11) per connection; with the
        eager address lookups that went at the same time, about a sixth of a short connection's CPU.
        """
        service = self.service
        cfg = service.config
        tried = self.tried
        full = service.full_backends()
        backend = None
        if len(tried) <= cfg.retries:
            backend = service.pool.choose(self.peer_key, tried + full if full else tried)
        if backend is None:
            self.close(CloseReason.CONNECT_FAILED if tried else (CloseReason.LIMIT if full else CloseReason.NO_BACKEND))
            return
        tried.append(backend)
        leg = BackendLeg(self)
        ssl_ctx = service.backend_ssl
        server_hostname = (cfg.backend_tls_server_name or backend.address) if ssl_ctx is not None else None
        service.connecting[backend] += 1
        self.connect_leg = leg
        loop = service.loop
        source = cfg.source_address
        src = self.client_src
        if source == SOURCE_CLIENT and src is not None:
            # Transparent mode: the backend sees the client's address (the PROXY header's, when one was accepted).
            connect = connect_as_client(
                loop, lambda: leg, backend.address, backend.port, src[0], ssl_ctx, server_hostname
            )
        else:
            connect = loop.create_connection(
                lambda: leg,
                backend.address,
                backend.port,
                local_addr=(source, 0) if source and source != SOURCE_CLIENT else None,
                ssl=ssl_ctx,
                server_hostname=server_hostname,
            )
        task = loop.create_task(connect)
        self.connect_task = task
        service.connect_started(self, task)
        task.add_done_callback(self._connect_done)

    def connect_timed_out(self) -> None:
        """The service's deadline timer: this connect has had its connect_timeout."""
        task = self.connect_task
        if task is not None and not task.done():
            self.connect_expired = True
            task.cancel()

    def redirect_connect(self) -> bool:
        """Cancel the connect in flight and try the next backend instead; False when no connect is in flight.

        Called by the service when the backend being connected to is put in maint or removed: the client should
        not wait out a connect (possibly the whole connect_timeout) to a backend it may no longer use.
        """
        task = self.connect_task
        if task is None or task.done():
            return False
        self.connect_redirected = True
        task.cancel()
        return True

    def _connect_done(self, task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        self.connect_task = None
        service = self.service
        service.connect_ended(self, task)
        backend = self.tried[-1]
        if backend.successor is not None:
            backend = self._follow_reload()
        leg = self.connect_leg
        self.connect_leg = None
        left = service.connecting[backend] - 1
        if left:
            service.connecting[backend] = left
        else:
            del service.connecting[backend]
        exc: BaseException | None
        if task.cancelled():
            if self.connect_redirected:
                # Not this backend's failure: it stopped taking connections while we connected.
                self.connect_redirected = self.connect_expired = False
                if not self._ending():
                    self._connect_next()
                return
            if not self.connect_expired:
                return  # cancelled by close(): the connection is over already
            self.connect_expired = False
            exc = TimeoutError(f"no answer within connect_timeout ({service.config.connect_timeout:g} s)")
        else:
            exc = task.exception()
        if exc is None:
            transport = task.result()[0]
            if self._ending() or leg is None:
                transport.close()
                return
            current = service.pool.by_name.get(backend.name)
            if current is not None and current is not backend and (current.address, current.port) == (
                backend.address,
                backend.port,
            ):
                # A reload replaced the Backend object of the same server while we connected: count it there.
                backend = current
            if current is not backend or backend.weight <= 0:
                # The state this connect relied on is gone (house rule 13): the backend went down, into maint or
                # drain (a connect in flight is a new connection), its weight to 0, or out of the config. Not a
                # connect error of that backend; the client tries the next one, retry budget permitting.
                transport.close()
                self._connect_next()
                return
            if not transport.is_closing():
                self._attach(backend, leg, transport)
                return
            # The backend accepted and closed before we could use the connection: a failed connect like any other.
            exc = ConnectionResetError("the backend closed the connection before it was used")
        # Anything else a connect raises is still this backend's failure, not the client's: getaddrinfo raises
        # UnicodeError, not OSError, for a name IDNA cannot encode ("rabbit1..example.com"), and a resolver or
        # loop may raise what it likes. The client tries the next backend either way; the service logs an
        # unexpected kind of error with its traceback once per backend and kind, then like any failed connect.
        backend.connect_errors += 1
        service.connect_failed(backend, self.client_addr, exc)
        if not self._ending():
            self._connect_next()

    def _follow_reload(self) -> Backend:
        """A reload replaced the Backend objects this connect was started with: use the ones now in the pool.

        The reload moved the in-flight count to the new object, so that is the one to credit; the backends already
        tried are mapped too, so a retry does not pick the same server again under its new object.
        """
        tried = self.tried = [b.current() for b in self.tried]
        return tried[-1]

    def _ending(self) -> bool:
        """True once the client side is gone or being closed: no backend should be (re)connected for it."""
        t = self.transport
        return self.closed or self.client_lost or (t is not None and t.is_closing())

    def _attach(self, backend: Backend, leg: BackendLeg, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.backend = backend
        self.backend_leg = leg
        self.backend_transport = transport
        self.backend_write = transport.write
        backend.opened(self)
        cfg = self.service.config
        transport.set_write_buffer_limits(high=cfg.high_water, low=cfg.low_water)
        # The client socket inherited keepalive from the listener; this one has to be told (see keepalive.py).
        if cfg.tcp_keepalive is not None:
            set_keepalive(transport.get_extra_info("socket"), cfg.tcp_keepalive)
        if logs.info_enabled:
            # Only the connection log shows the proxy's own address; skip the system call when nothing logs it.
            self.backend_local = _addr(transport.get_extra_info("sockname"))
        version = cfg.proxy_protocol_for(backend.config)
        if version != "off":
            if self.client_dst is None and self.transport is not None:
                local = self.transport.get_extra_info("sockname")
                if isinstance(local, tuple):
                    self.client_dst = (str(local[0]), int(local[1]))
            # Once, before any client byte: the backend learns the client's real address (RabbitMQ's
            # proxy_protocol = true shows it as the connection's peer).
            transport.write(header_for(version, self.client_src, self.client_dst))
        pending = self.pending
        self.pending = None
        if pending:
            transport.write(bytes(pending))
        if self.client_eof_seen:
            if self.backend_tls:
                self._finish_both(CloseReason.CLIENT_CLOSED)
                return
            transport.write_eof()
        # The bytes buffered while connecting may have filled the backend's buffer just now: its pause_writing
        # then stopped the client, and resuming here would undo that with no second pause_writing to come
        # until the buffer drains, so a slow backend would let the client fill our memory.
        if not self.backend_full:
            self.resume_client_reading()

    # -- PROXY header and hello ----------------------------------------------------------------------------------

    def _read_proxy_header(self, data: bytes) -> bytes:
        """Feed the PROXY reader; return the stream bytes after the header once it is complete, else b""."""
        reader = self.pp_reader
        assert reader is not None
        if reader is UNTRUSTED:
            return self._check_untrusted(data)
        try:
            reader.receive_data(data)
            event = reader.next_event()
        except ProxyProtocolError as exc:
            self._bad_proxy_header(exc)
            return b""
        if event is NEED_DATA:
            return b""
        self._header_done()
        if event.src is not None:
            # LOCAL and UNKNOWN headers carry no client; the socket's own addresses stand.
            self.client_src = event.src
            self.client_dst = event.dst
        self._connect_next()
        return event.rest

    def _check_untrusted(self, data: bytes) -> bytes:
        """A source outside proxy_protocol_from: refuse a PROXY header, else return its bytes so far."""
        pending = self.pending
        assert pending is not None
        # The bytes that were too few to decide on wait in pending (nothing is connected yet).
        start = pending + data if pending else data
        verdict = looks_like_header(start)
        if verdict is None:
            pending += data
            return b""
        self._header_done()
        if verdict:
            self.service.untrusted_proxy_header(self.client_addr)
            self.close(CloseReason.UNTRUSTED_PROXY_HEADER)
            return b""
        if pending:
            data = bytes(start)
            pending.clear()
        self._connect_next()
        return data

    def _header_done(self) -> None:
        self.pp_reader = None
        self.service.header_deadlines.discard(self)

    def _bad_proxy_header(self, exc: ProxyProtocolError) -> None:
        self._header_done()
        self.service.bad_proxy_header(self.client_addr, exc)
        self.close(CloseReason.BAD_PROXY_HEADER)

    def header_expired(self) -> None:
        """The PROXY header deadline (used when client_hello_timeout is 0): the header is not complete in time."""
        if not self.closed and self.pp_reader is not None:
            self.pp_reader = None
            self.close(CloseReason.HELLO_TIMEOUT)

    def hello_expired(self) -> None:
        """The service's hello deadline: the client has not sent its 8-byte AMQP header in time."""
        if not self.closed:
            self.close(CloseReason.HELLO_TIMEOUT)

    # -- the AMQP handshake ----------------------------------------------------------------------------------------

    def handshake_done(self, reader: HandshakeReader) -> None:
        """The reader has nothing more to learn (open, refused, the client closed, or it gave up): drop it.

        From here on each chunk costs the splice path one ``is None`` check for the reader.
        """
        self.hs_reader = None
        hs = reader.handshake
        if hs.mechanism == "EXTERNAL" and hs.user is None and self.client_tls and self.transport is not None:
            # EXTERNAL logs in as the client certificate's subject, which only the TLS layer knows.
            hs.user = cert_subject(self.transport.get_extra_info("peercert"))
        self.service.handshake_finished(self, reader.gave_up)

    def watch_heartbeat(self, heartbeat: int) -> None:
        """client_idle_timeout = "auto": close the client once it is silent for 2.5 x its negotiated heartbeat."""
        timeout = HEARTBEAT_FACTOR * heartbeat
        self.idle_timeout = timeout
        self.idle_reason = CloseReason.HEARTBEAT_TIMEOUT
        self.last_activity = self.client_activity = time.monotonic()
        if self.idle_handle is None and not self.closed:
            self.idle_handle = self.service.loop.call_later(timeout, self._idle_check)

    # -- ending --------------------------------------------------------------------------------------------------

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.closed:
            return
        if self.idle_reason is CloseReason.HEARTBEAT_TIMEOUT:
            # Only the client's silence counts. A heartbeat binds each side on its own, and the broker goes on
            # heartbeating to a client that froze or vanished without a FIN (its kernel, or nobody, acknowledges),
            # so counting the broker's bytes would never notice the very clients this timeout is for.
            timeout = self.idle_timeout
            idle_for = time.monotonic() - self.client_activity
        else:
            # A fixed timeout follows a reload; one set to 0 or "auto" stops watching the connections it watched.
            timeout = self.service.config.idle_seconds
            if timeout <= 0:
                return
            idle_for = time.monotonic() - self.last_activity
        if idle_for >= timeout:
            if self.reason is CloseReason.BACKEND_CLOSED and self.idle_reason is CloseReason.HEARTBEAT_TIMEOUT:
                # The broker gave up on the silent client first (it allows 2 to 3 heartbeats) and only our half
                # to the client is left: the client's silence is still why this connection ended.
                self.reason = CloseReason.HEARTBEAT_TIMEOUT
            self.close(self.idle_reason)
            return
        self.idle_handle = self.service.loop.call_later(timeout - idle_for, self._idle_check)

    def _finish_both(self, reason: CloseReason) -> None:
        if self.reason is None:
            self.reason = reason
        for t in (self.transport, self.backend_transport):
            if t is not None and not t.is_closing():
                t.close()
        self._close_deadline()

    def _close_deadline(self) -> None:
        """A flushing close has begun: start the close deadline, once (a second close must not extend it)."""
        if not self.close_started and not self.closed:
            self.close_started = True
            self.service.close_deadlines.add(self)

    def close_expired(self) -> None:
        """The service's close deadline: the flush did not finish within close_timeout, so drop what is left.

        The connection keeps the reason that started the close; the abort is counted apart (``close_timeouts``).
        """
        if self.closed:
            return
        self.close_aborted = True
        self.service.close_timeouts += 1
        for t in (self.transport, self.backend_transport):
            if t is not None:
                t.abort()

    def close(self, reason: CloseReason) -> None:
        """End this connection (limit, shutdown, backend down, idle...); buffered bytes are still flushed."""
        self._cancel_connect()
        self._finish_both(reason)

    def _cancel_connect(self) -> None:
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()

    def abort(self, reason: CloseReason) -> None:
        """End this connection now, dropping anything still buffered (the grace period is over)."""
        if self.reason is None:
            self.reason = reason
        self._cancel_connect()
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
        if self.hello_left > 0:
            self.service.hello_deadlines.discard(self)
        if self.pp_reader is not None:
            self.service.header_deadlines.discard(self)
        if self.close_started:
            self.service.close_deadlines.discard(self)
        backend = self.backend
        if backend is not None:
            backend.closed(self, self.bytes_in, self.bytes_out)
        self.service.connection_closed(self)

    @property
    def client_addr(self) -> str:
        """The client as host:port (the PROXY header's source when one was accepted)."""
        src = self.client_src
        return _addr(src) if src is not None else "unknown"

    @property
    def peer_key(self) -> bytes | None:
        """What source-hash balancing hashes: the client's address."""
        src = self.client_src
        return source_key(src[0]) if src is not None else None

    def backend_endpoints(self) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """(our address towards the backend, the backend's address) as connected; None before or after.

        Read from the transport when asked (a close through the broker names the connection by them), so the
        data path pays no system call for it.
        """
        bt = self.backend_transport
        if bt is None or bt.is_closing():
            return None
        local = bt.get_extra_info("sockname")
        peer = bt.get_extra_info("peername")
        if not (isinstance(local, tuple) and isinstance(peer, tuple)):
            return None
        return (str(local[0]), int(local[1])), (str(peer[0]), int(peer[1]))

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

"""The state of one client connection and how it ends: close, abort, the close deadline, the idle timeout.

:class:`LegState` is the base of :class:`~rabbitproxy.relay.legs.ClientLeg`: it holds every per-connection field
(one ``__slots__`` for the whole chain, so the subclasses add methods, never fields) and the code that ends a
connection, which runs once per connection, never per chunk. The connect machinery
(:mod:`rabbitproxy.relay.connecting`) and what the client says first (:mod:`rabbitproxy.relay.greeting`) build on it;
the per-chunk data path stays in :mod:`rabbitproxy.relay.legs`.

A transport's ``close()`` waits until its buffer is written, which is forever when the peer stopped reading (a
frozen broker, a stalled client). So every close starts the service's close deadline (``close_timeout``, one
timer for all connections, see :mod:`rabbitproxy.relay.deadlines`); when it expires both transports are aborted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rabbitproxy.balancing.algorithms import source_key
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.relay.keepalive import set_keepalive

if TYPE_CHECKING:
    from rabbitproxy.balancing.backend import Backend
    from rabbitproxy.protocols.amqp_handshake import Handshake, HandshakeFollower
    from rabbitproxy.protocols.proxy_header import ProxyHeaderReader
    from rabbitproxy.protocols.stream import StreamSession
    from rabbitproxy.relay.legs import BackendLeg
    from rabbitproxy.relay.service import Service

# client_idle_timeout = "auto" closes a client that sent nothing for this many of its negotiated heartbeats. A live
# client sends a frame at least every heartbeat; 2.5 leaves room for a late one (RabbitMQ gives up after 2 to 3).
HEARTBEAT_FACTOR = 2.5

# Connection ids: small, unique for the life of the proxy, never reused (the admin API names connections by them).
# One process numbers them 1, 2, 3...; a worker of ``workers = N`` takes its share through use_ids().
_ids: Iterator[int] = itertools.count(1)


def use_ids(source: Iterator[int]) -> None:
    """Number the connections opened from now on with ``source`` (each id used once, never reused)."""
    global _ids  # the one seam; read once per connection, so a module global is the cheap place
    _ids = source


def _addr(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class LegState(asyncio.Protocol):
    """Every field of one client connection, and the ways it ends."""

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
        "idle_reason",
        "idle_slot",
        "idle_timeout",
        "last_activity",
        "pending",
        "pinned",
        "pp_reader",
        "reading_paused",
        "reason",
        "service",
        "started",
        "stream",
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
        # The slot of this connection's pending idle check in the service's IdleWatch, 0 when not watched; while
        # watched, the data path keeps the last byte either way and the last byte from the client.
        self.idle_slot = 0
        self.last_activity = 0.0
        self.client_activity = 0.0
        # The timeout the idle check watches (a fixed client_idle_timeout, or 2.5 x the heartbeat) and its reason.
        self.idle_timeout = 0.0
        self.idle_reason = CloseReason.IDLE_TIMEOUT
        self.started = time.monotonic()
        self.id = next(_ids)
        # AMQP services: the handshake reader, fed both sides until it is done and then dropped (None), and what it
        # learnt, which stays for the log event and the admin API.
        self.hs_reader: HandshakeFollower | None = None
        self.handshake: Handshake | None = None
        # The vhost's label in the service's open-connections-per-vhost gauge, once the broker has opened it.
        self.vhost_label: str | None = None
        # A node_port listener's connection: the name of the one backend it goes to (None: the pool chooses).
        self.pinned: str | None = None
        # Stream services: what the stream relay reads and rewrites on this connection (rabbitproxy.relay.stream).
        self.stream: StreamSession | None = None

    # -- flow control (the backend leg's pause_writing and resume_writing, and the attach) ----------------------

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
            if self.idle_slot:
                # The client's silence while we were not reading it was ours, not its own: count afresh from here.
                self.last_activity = self.client_activity = time.monotonic()
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    # -- ending --------------------------------------------------------------------------------------------------

    def _ending(self) -> bool:
        """True once the client side is gone or being closed: no backend should be (re)connected for it."""
        t = self.transport
        return self.closed or self.client_lost or (t is not None and t.is_closing())

    def watch_heartbeat(self, heartbeat: int) -> None:
        """client_idle_timeout = "auto": close the client once it is silent for 2.5 x its negotiated heartbeat."""
        timeout = HEARTBEAT_FACTOR * heartbeat
        self.idle_timeout = timeout
        self.idle_reason = CloseReason.HEARTBEAT_TIMEOUT
        now = self.last_activity = self.client_activity = time.monotonic()
        if not self.closed:
            self.service.idle_watch.at(self, now + timeout)

    def admission_expired(self) -> None:
        """The admission desk: held for connect_queue_timeout without a connect token."""
        if not self.closed:
            self.close(CloseReason.ADMISSION_TIMEOUT)

    def header_expired(self) -> None:
        """The PROXY header deadline (used when client_hello_timeout is 0): the header is not complete in time."""
        if not self.closed and self.pp_reader is not None:
            self.pp_reader = None
            self.close(CloseReason.HELLO_TIMEOUT)

    def hello_expired(self) -> None:
        """The service's hello deadline: the client has not sent its 8-byte AMQP header in time."""
        if not self.closed:
            self.close(CloseReason.HELLO_TIMEOUT)

    def idle_check(self) -> None:
        """The service's IdleWatch: this connection's idle check is due; close it, or check again later."""
        if self.closed:
            return
        if self.idle_reason is CloseReason.HEARTBEAT_TIMEOUT:
            # Only the client's silence counts. A heartbeat binds each side on its own, and the broker goes on
            # heartbeating to a client that froze or vanished without a FIN (its kernel, or nobody, acknowledges),
            # so counting the broker's bytes would never notice the very clients this timeout is for.
            timeout = self.idle_timeout
            last = self.client_activity
        else:
            # A fixed timeout follows a reload; one set to 0 or "auto" stops watching the connections it watched.
            timeout = self.service.config.idle_seconds
            if timeout <= 0:
                return
            last = self.last_activity
        now = time.monotonic()
        if self.reading_paused:
            # We stopped reading the client (the broker stopped reading us: a blocked publisher during an alarm,
            # whose heartbeats now wait unread in its socket). RabbitMQ does not time out a blocked connection and
            # neither do we; resuming starts the count again. Checked here, once per timeout, so that neither the
            # chunks nor the pause pay for it.
            self.service.idle_watch.at(self, now + timeout)
            return
        if now - last >= timeout:
            if self.reason is CloseReason.BACKEND_CLOSED and self.idle_reason is CloseReason.HEARTBEAT_TIMEOUT:
                # The broker gave up on the silent client first (it allows 2 to 3 heartbeats) and only our half
                # to the client is left: the client's silence is still why this connection ended.
                self.reason = CloseReason.HEARTBEAT_TIMEOUT
            self.close(self.idle_reason)
            return
        self.service.idle_watch.at(self, last + timeout)

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

    def keepalive_due(self) -> None:
        """The backend leg has been attached for ``KEEPALIVE_AFTER`` seconds: switch its TCP keepalive on now.

        Settings as the service has them now (a reload in between may have changed or disabled them).
        """
        transport = self.backend_transport
        if transport is None or self.close_started or self.closed or transport.is_closing():
            return
        set_keepalive(transport.get_extra_info("socket"), self.service.config.tcp_keepalive)

    def _maybe_done(self) -> None:
        if self.closed:
            return
        if not self.client_lost:
            return
        if self.backend_transport is not None and not self.backend_lost_flag:
            return
        self.closed = True
        if self.idle_slot:
            self.service.idle_watch.discard(self)
        if self.hello_left > 0:
            self.service.hello_deadlines.discard(self)
        if self.pp_reader is not None:
            self.service.header_deadlines.discard(self)
        if self.close_started:
            self.service.close_deadlines.discard(self)
        backend = self.backend
        desk = self.service.admission
        if desk is not None and backend is None:
            # Held for a connect token when it ended (it left, or the service closed it).
            desk.discard(self)
        if backend is not None:
            # Not left for the keepalive timer to skip: held there for a second, short connections would outlive
            # the young generation and cost the collector more than the keepalive system calls saved.
            self.service.keepalive_deadlines.discard(self)
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

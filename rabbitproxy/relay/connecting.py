"""Connecting a client to a backend: choose, connect with a deadline, retry, re-check, attach.

Runs once or a few times per connection (never per chunk), as callbacks rather than a coroutine (see
:meth:`ConnectingLeg._connect_next` for why). Anything that completes later than it began (a connect in flight)
re-checks the state it relied on before it attaches (house rule 13).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar, cast

from rabbitproxy import logs
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import SOURCE_CLIENT
from rabbitproxy.protocols.proxy_header import header_for
from rabbitproxy.relay.leg_state import LegState, _addr
from rabbitproxy.relay.transparent import connect_as_client

if TYPE_CHECKING:
    from rabbitproxy.balancing.backend import Backend
    from rabbitproxy.relay.admission import AdmissionDesk
    from rabbitproxy.relay.legs import BackendLeg


class ConnectingLeg(LegState):
    """The connect machinery of a client leg."""

    __slots__ = ()

    # The backend leg's class: legs.py defines it on top of this module and sets it here, which keeps the import
    # graph one-way; a class attribute costs nothing more than the global name did.
    backend_leg_type: ClassVar[type[BackendLeg]]

    def _connect_next(self, gate: bool = True) -> None:
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
        desk = service.admission
        if desk is not None and gate and not tried and not desk.admit(self):
            return  # held over the service's connect_rate: the desk calls admitted() when a token is free
        full = service.full_backends()
        backend = None
        if self.pinned is not None:
            # A node_port listener's client asked for this node and no other: one try, no stand-in.
            pinned = service.pool.by_name.get(self.pinned)
            if pinned is not None and not tried and pinned.usable and pinned not in full:
                backend = pinned
        elif len(tried) <= cfg.retries:
            exclude = tried + full if full else tried
            if desk is not None and desk.backend_gates:
                backend = self._choose_paced(desk, exclude)
                if backend is None and self in desk:
                    return
            else:
                backend = service.pool.choose(self.peer_key, exclude)
        if backend is None:
            self.close(CloseReason.CONNECT_FAILED if tried else (CloseReason.LIMIT if full else CloseReason.NO_BACKEND))
            return
        tried.append(backend)
        # Every ConnectingLeg is a ClientLeg; saying so with cast() would cost a call per connect.
        leg = self.backend_leg_type(self)  # type: ignore[arg-type]
        ssl_ctx = service.backend_ssl
        server_hostname = (cfg.backend_tls_server_name or backend.address) if ssl_ctx is not None else None
        backend.connecting += 1
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

    def _choose_paced(self, desk: AdmissionDesk[LegState], exclude: list[Backend]) -> Backend | None:
        """Choose among the backends that have a connect token now; hold the client when only the others are left.

        A backend with a ``connect_rate`` of its own and no token is passed over like a full one. When every backend
        the client could use is such a one, the client waits first in the service's queue for the earliest token.
        """
        pool = self.service.pool
        limited = desk.limited(pool.backends)
        if not limited:
            backend = pool.choose(self.peer_key, exclude)
        else:
            backend = pool.choose(self.peer_key, exclude + limited)
            if backend is None:
                waiting = [b for b in limited if b.weight > 0 and b not in exclude]
                if waiting:
                    desk.hold_for(self, waiting)
                    return None
        if backend is not None:
            desk.took(backend)
        return backend

    def admitted(self) -> None:
        """The admission desk: this held client's turn has come; connect it (unless it is already leaving)."""
        if not self._ending():
            self._connect_next(gate=False)

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
        backend.connecting -= 1
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
            if (
                current is not None
                and current is not backend
                and (current.address, current.port)
                == (
                    backend.address,
                    backend.port,
                )
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

    def _attach(self, backend: Backend, leg: BackendLeg, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.backend = backend
        self.backend_leg = leg
        self.backend_transport = transport
        self.backend_write = transport.write
        backend.opened(self)
        cfg = self.service.config
        transport.set_write_buffer_limits(high=cfg.high_water, low=cfg.low_water)
        # The client socket inherited keepalive from the listener; this one is told a little later (keepalive.py):
        # a connection that ends within KEEPALIVE_AFTER never pays for it.
        if cfg.tcp_keepalive is not None:
            self.service.keepalive_deadlines.add(self)
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

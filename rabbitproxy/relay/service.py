"""One running virtual service: its listener, its backend pool, its live connections and counters."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import structlog

from rabbitproxy import logs
from rabbitproxy.balancing.admission import AdmissionFigures
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.pool import Pool
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import ServiceConfig
from rabbitproxy.protocols.proxy_header import source_trusted
from rabbitproxy.relay import admission, outcomes
from rabbitproxy.relay.admission import AdmissionDesk
from rabbitproxy.relay.connecting import ConnectingLeg
from rabbitproxy.relay.deadlines import Deadlines
from rabbitproxy.relay.idle_watch import IdleWatch
from rabbitproxy.relay.keepalive import KEEPALIVE_AFTER, set_keepalive
from rabbitproxy.relay.leg_state import LegState
from rabbitproxy.relay.legs import ClientLeg
from rabbitproxy.relay.listeners import bind_listener, bind_node_listeners
from rabbitproxy.relay.stream import StreamClientLeg
from rabbitproxy.relay.tls import ServiceTLS
from rabbitproxy.tasks import cancel_and_wait

log = structlog.get_logger("rabbitproxy.connection")

# Seconds a client of a service with accept_proxy_protocol has to complete its PROXY header when
# client_hello_timeout is 0 (otherwise the hello deadline, which starts at accept, covers the header too).
PROXY_HEADER_TIMEOUT = 10.0


class Service:
    """A virtual service (VIP) as it runs: config, pool, listener and the connections it owns."""

    def __init__(self, config: ServiceConfig, *, pool: Pool | None = None, tls: ServiceTLS | None = None) -> None:
        self._config = config
        # Whether any backend has a max_connections; asked on every connect, so kept, not recomputed.
        self.limited = any(b.max_connections for b in config.backends)
        # SSL contexts are phase two of the config: built here (or handed in by a reload that built them first).
        self.tls = tls if tls is not None else ServiceTLS(config)
        self.name = config.name
        # The parsed proxy_protocol_from, asked once per connection of a service that accepts PROXY headers.
        self.proxy_networks = config.proxy_networks
        # Without a health check a backend is trusted from the start; with one it must pass a check first.
        self.pool = pool or Pool.from_config(config, healthy=config.health_check.type == "none")
        self.connections: set[ClientLeg] = set()
        self.accepting = True
        self.total = 0
        self.ended: Counter[CloseReason] = Counter()
        # Closes whose flush did not finish within close_timeout and were aborted (their reason is counted too).
        self.close_timeouts = 0
        # AMQP handshakes: logins the broker refused, handshakes the reader could not follow (the bytes flowed on),
        # and open connections per vhost label (see MAX_VHOST_LABELS).
        self.failed_logins = 0
        self.handshakes_given_up = 0
        self.vhost_open: dict[str, int] = {}
        # Stream services: broker entries that matched no backend, logged once each (rabbitproxy.relay.stream).
        self.stream_unmapped: set[tuple[str, int]] = set()
        # Stream services: the node_port listeners, by backend name (opened with the service, closed with it).
        self.node_servers: dict[str, asyncio.Server] = {}
        # A negotiated heartbeat of 0 under a fixed client_idle_timeout is warned about once per service.
        self.warned_no_heartbeat = False
        self.server: asyncio.Server | None = None
        # Connect attempts in flight; cancelled when the service stops.
        self.connects: set[asyncio.Task[Any]] = set()
        # Set by start(): the loop the data path schedules on, kept here because asking asyncio for the running
        # loop costs a getpid() system call on Python 3.11, several times per connection; and the connect, hello
        # and close deadlines, one timer each for all connections (rabbitproxy.relay.deadlines).
        self.loop: asyncio.AbstractEventLoop
        self.connect_deadlines: Deadlines[ConnectingLeg]
        self.hello_deadlines: Deadlines[LegState]
        self.header_deadlines: Deadlines[LegState]
        self.close_deadlines: Deadlines[LegState]
        self.keepalive_deadlines: Deadlines[LegState]
        self.idle_watch: IdleWatch[LegState]
        # Admission control (connect_rate): None while neither the service nor any backend has a rate.
        self.admission: AdmissionDesk[LegState] | None = None
        # The parent of ``workers = N`` holds no clients itself: it shows the sum of its workers' desks.
        self.remote_admission: AdmissionFigures | None = None
        self.conn_log: logs.EventWriter
        self._started = False
        self.bound: list[tuple[str, int]] = []
        # Set once every backend has had its first health-check verdict; the proxy starts serving after it.
        self.first_checks = asyncio.Event()
        if config.health_check.type == "none":
            self.first_checks.set()
        # (backend name, exception type) of unexpected connect errors already logged with a traceback.
        self._unexpected_errors: set[tuple[str, type[BaseException]]] = set()
        # Set while a drain waits for the last connection to end.
        self._empty: asyncio.Event | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(
        self, sock: socket.socket | None = None, node_socks: dict[str, socket.socket] | None = None
    ) -> None:
        """Start listening, on ``sock`` if given (the supervisor binds every socket before any serves).

        A stream service also listens on each backend's ``node_port`` (``node_socks``, by backend name; bound here
        when not given).
        """
        if sock is None:
            sock = bind_listener(self.config)
        if node_socks is None:
            node_socks = bind_node_listeners(self.config)
        self.replace_server(await self.open_server(sock, self.config, self.tls, serving=True))
        for name, node_sock in node_socks.items():
            self.node_servers[name] = await self.open_server(node_sock, self.config, self.tls, serving=True, pin=name)

    @property
    def backend_ssl(self) -> ssl.SSLContext | None:
        return self.tls.backend

    def _prepare(self) -> None:
        """What the data path needs from the running loop, set up once before the first listener opens."""
        if self._started:
            return
        self._started = True
        self.loop = asyncio.get_running_loop()
        # The per-connection event's writer, built once from the logging set up by now (rabbitproxy.logs): it
        # renders and writes the line itself where it can, and holds a concrete structlog logger where not.
        self.conn_log = logs.EventWriter(log, "connection closed", service=self.name)
        self.connect_deadlines = Deadlines(self.loop, self._config.connect_timeout, ConnectingLeg.connect_timed_out)
        self.hello_deadlines = Deadlines(self.loop, self._config.client_hello_timeout, LegState.hello_expired)
        self.header_deadlines = Deadlines(self.loop, PROXY_HEADER_TIMEOUT, LegState.header_expired)
        self.close_deadlines = Deadlines(self.loop, self._config.close_timeout, LegState.close_expired)
        self.keepalive_deadlines = Deadlines(self.loop, KEEPALIVE_AFTER, LegState.keepalive_due)
        self.idle_watch = IdleWatch(self.loop, LegState.idle_check)
        self._follow_admission(self._config)

    def _follow_admission(self, config: ServiceConfig) -> None:
        """Admission control as ``config`` has it: made when first asked for, retuned by a reload.

        Once made, the desk stays (a reload that removes every rate lets the held clients go at once), so a client
        held under the old settings is never forgotten.
        """
        desk = self.admission
        if desk is not None:
            if admission.wanted(config):
                desk.retune(config)
            else:
                desk.release_all()
        elif admission.wanted(config):
            # Every leg of a service is a ConnectingLeg; the desk is typed by the base its deadline queue needs.
            admitted = cast(Callable[[LegState], object], ConnectingLeg.admitted)
            self.admission = AdmissionDesk(self.loop, config, admitted, LegState.admission_expired)

    async def open_server(
        self, sock: socket.socket, config: ServiceConfig, tls: ServiceTLS, *, serving: bool, pin: str | None = None
    ) -> asyncio.Server:
        """A server for this service on ``sock``, set up as ``config`` and ``tls`` say; not installed here.

        A reload opens its servers with ``serving=False`` before anything changes, installs them with
        :meth:`replace_server` in the same synchronous step that swaps the configuration in, and only then lets
        them accept: no client is ever accepted with a TLS context that belongs to another configuration.
        """
        self._prepare()
        # Accepted sockets inherit keepalive from the listener (rabbitproxy.relay.keepalive): no cost per client.
        set_keepalive(sock, config.tcp_keepalive)
        server_tls = tls.server
        return await self.loop.create_server(
            self._leg_factory(config, pin),
            sock=sock,
            backlog=config.backlog,
            ssl=server_tls.listener if server_tls is not None else None,
            # A client that never finishes its TLS handshake is a slowloris too: it gets the hello timeout.
            ssl_handshake_timeout=(config.client_hello_timeout or None) if server_tls is not None else None,
            start_serving=serving,
        )

    def _leg_factory(self, config: ServiceConfig, pin: str | None) -> Callable[[], ClientLeg]:
        """What a listener makes of an accepted client: the plain legs, or the stream relay's (pinned to a node)."""
        if config.protocol != "stream":
            return lambda: ClientLeg(self)

        def stream_leg() -> ClientLeg:
            leg = StreamClientLeg(self)
            leg.pinned = pin
            return leg

        return stream_leg

    def duplicate_listener(self) -> socket.socket | None:
        """A new descriptor for the listening socket, so a second server can take over without closing the port."""
        if self.server is None or not self.server.sockets:
            return None
        return socket.socket(fileno=os.dup(self.server.sockets[0].fileno()))

    def duplicate_node_listeners(self) -> dict[str, socket.socket]:
        """New descriptors for the node_port listeners (by backend name), for a reload's new servers."""
        return {
            name: socket.socket(fileno=os.dup(server.sockets[0].fileno()))
            for name, server in self.node_servers.items()
            if server.sockets
        }

    def replace_node_servers(self, servers: dict[str, asyncio.Server]) -> None:
        """Install a reload's node_port servers and close the previous ones (synchronous, in the swap)."""
        old, self.node_servers = self.node_servers, servers
        for name, server in old.items():
            if servers.get(name) is not server:
                server.close()

    def replace_server(self, server: asyncio.Server) -> None:
        """Make ``server`` this service's listener and close the previous one (synchronous, for the reload swap).

        Closing the old server closes only its own descriptor: when the new one listens on a duplicate of the same
        socket, connects queued meanwhile wait in the kernel's backlog for the new server. Connections already
        accepted are not touched.
        """
        old = self.server
        self.server = server
        self.bound = [s.getsockname()[:2] for s in server.sockets]
        if old is not None and old is not server:
            old.close()

    def full_backends(self) -> list[Backend]:
        """Backends at their max_connections (counting connects in flight); empty when none has a limit."""
        if not self.limited:
            return []
        return [
            b
            for b in self.pool.backends
            if b.config.max_connections and b.load >= b.config.max_connections
        ]

    @property
    def config(self) -> ServiceConfig:
        return self._config

    @config.setter
    def config(self, config: ServiceConfig) -> None:
        # A reload hands the running service its new config.
        self._config = config
        self.limited = any(b.max_connections for b in config.backends)
        self.proxy_networks = config.proxy_networks
        if self._started:
            self.connect_deadlines.delay = config.connect_timeout
            self.hello_deadlines.delay = config.client_hello_timeout
            self.close_deadlines.delay = config.close_timeout
            self._follow_admission(config)
            if self.server is not None:
                # Clients accepted from now on get the new keepalive settings; open connections keep theirs.
                for listener in self.server.sockets:
                    set_keepalive(listener, config.tcp_keepalive)

    def stop_accepting(self) -> None:
        """Close the listening socket at once; new connects are refused by the kernel from now on."""
        self.accepting = False
        if self.server is not None:
            self.server.close()
        for server in self.node_servers.values():
            server.close()

    async def drain(self, grace: float, reason: CloseReason = CloseReason.SHUTDOWN) -> None:
        """Wait up to ``grace`` seconds for open connections to end by themselves, then close the rest.

        The closes flush for up to ``close_timeout`` before what is left is aborted, so a drain takes at most
        ``grace + close_timeout`` (the stop systemd's ``TimeoutStopSec`` is sized for).
        """
        self.stop_accepting()
        try:
            if not await self._wait_empty(grace):
                for conn in list(self.connections):
                    conn.close(reason)
                # Closing flushes what is buffered; a peer that does not read gets close_timeout, as every close
                # does (the close deadline aborts it then; this abort is the backstop for anything left).
                if not await self._wait_empty(self.config.close_timeout):
                    for conn in list(self.connections):
                        conn.abort(reason)
        except asyncio.CancelledError:
            # The process is stopping while this (removed) service still drains: nothing may outlive it.
            for conn in list(self.connections):
                conn.abort(CloseReason.SHUTDOWN)
            raise
        finally:
            await cancel_and_wait(self.connects)

    async def _wait_empty(self, seconds: float) -> bool:
        """True once no connection is open, False if that did not happen within ``seconds``."""
        if not self.connections:
            return True
        self._empty = asyncio.Event()
        try:
            async with asyncio.timeout(seconds):
                await self._empty.wait()
        except TimeoutError:
            return False
        finally:
            self._empty = None
        return True

    async def remove(self) -> None:
        await self.drain(self.config.shutdown_timeout, CloseReason.SERVICE_REMOVED)

    def note_checked(self) -> None:
        """A health check answered; once every backend has an answer, ``first_checks`` is set."""
        if not self.first_checks.is_set() and all(b.health_time is not None for b in self.pool.backends):
            self.first_checks.set()

    def cancel_connects_to(self, backend: Backend) -> int:
        """Send every client still connecting to ``backend`` on to another backend; return how many.

        For the control plane and the admin API when a backend goes into maint (or drain) or down with
        ``on_marked_down = "close"``: :meth:`Backend.close_connections` only sees attached connections, and a
        connect in flight would otherwise wait out its connect_timeout, or attach to a backend it may no longer use.
        Backends are matched by name and address, so a connect begun before a reload (which made new Backend
        objects for the same servers) is found too.
        """
        server = (backend.name, backend.address, backend.port)
        return self._redirect(lambda b: (b.name, b.address, b.port) == server)

    def cancel_connects_to_removed(self) -> int:
        """Send every client still connecting to a backend that is no longer in the pool on; return how many.

        A reload calls this after swapping in the new pool.
        """
        by_name = self.pool.by_name

        def removed(b: Backend) -> bool:
            current = by_name.get(b.name)
            return current is None or (current.address, current.port) != (b.address, b.port)

        return self._redirect(removed)

    def _redirect(self, match: Callable[[Backend], bool]) -> int:
        if not self._started:
            return 0
        # The connect deadlines hold exactly the connects in flight: scanning them here costs nothing per connect.
        moved = 0
        for conn in list(self.connect_deadlines):
            if conn.tried and match(conn.tried[-1]) and conn.redirect_connect():
                moved += 1
        return moved

    # -- events from the data path -------------------------------------------------------------------------------

    def connect_started(self, conn: ConnectingLeg, task: asyncio.Task[Any]) -> None:
        self.connects.add(task)
        self.connect_deadlines.add(conn)

    def connect_ended(self, conn: ConnectingLeg, task: asyncio.Task[Any]) -> None:
        self.connects.discard(task)
        self.connect_deadlines.discard(conn)

    def connect_failed(self, backend: Any, client: str, exc: BaseException) -> None:
        if not isinstance(exc, OSError | TimeoutError):
            # Not a network error: a bad name the resolver cannot even encode, or a bug of ours or of the loop.
            # Its traceback is logged once per backend and kind of error, so a misconfigured backend that every
            # client tries does not write one per connect; later ones are logged like any failed connect.
            key = (backend.name, type(exc))
            if key not in self._unexpected_errors:
                self._unexpected_errors.add(key)
                log.error(
                    "backend connect raised an unexpected error",
                    service=self.name,
                    backend=backend.name,
                    client=client,
                    exc_info=exc,
                )
                return
        log.warning(
            "backend connect failed",
            service=self.name,
            backend=backend.name,
            client=client,
            error=str(exc) or type(exc).__name__,
        )

    def bad_proxy_header(self, client: str, exc: BaseException) -> None:
        log.warning("bad PROXY header, connection closed", service=self.name, client=client, error=str(exc))

    def proxy_trusted(self, host: str) -> bool:
        """Whether a PROXY header from ``host`` is believed (``proxy_protocol_from``)."""
        return source_trusted(host, self.proxy_networks)

    def untrusted_proxy_header(self, client: str) -> None:
        log.warning(
            "PROXY header from a source not in proxy_protocol_from, connection closed", service=self.name, client=client
        )

    # Counted and logged once per connection (rabbitproxy.relay.outcomes); bound here, so no extra call.
    handshake_finished = outcomes.handshake_finished
    connection_closed = outcomes.connection_closed

    def admission_figures(self) -> AdmissionFigures | None:
        """What admission control shows now (the workers' sum in their parent); None where it is not used."""
        desk = self.admission
        return desk.figures() if desk is not None else self.remote_admission

    @property
    def active(self) -> int:
        return len(self.connections)

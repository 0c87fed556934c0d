"""Active health checks: one task per backend probes it and moves it up or down with rise/fall.

A probe answers one question (does this backend serve?) and says why not: ``refused``, ``timeout``,
``bad reply: ...`` or ``HTTP 503``. :class:`RiseFall` turns a stream of verdicts into transitions, and
:func:`health_task` applies them to the pool: a backend marked down stops getting new clients and, with
``on_marked_down = "close"``, loses the ones it has. While a backend is in ``maint`` its checks are paused.
A probe that raises anything unexpected (our bug, or a library's surprise) is logged with its traceback and counts as
a failed check, ``check error: ...``: a health state that freezes is worse than a wrong one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from ssl import SSLContext
from typing import TYPE_CHECKING

import aiohttp
import structlog

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.stream_check import probe_stream
from rabbitproxy.protocols import amqp
from rabbitproxy.protocols.proxy_header import check_header

if TYPE_CHECKING:
    from rabbitproxy.balancing.backend import Backend
    from rabbitproxy.config import HealthCheckConfig
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.health")

# RabbitMQ 3.13+ answers 503 on this endpoint while a node is being taken out of service (rabbitmq-upgrade drain
# or shutdown). That is a request to stop sending clients, not a failure, so it maps to drain.
READINESS_ENDPOINT = "ready-to-serve-clients"
_READ_CHUNK = 4096
# An HTTP check only needs the status; the body is read (up to this much) just so a small one lets the connection
# be reused. A backend that sends more, or never stops, must not make the check hold it all in memory.
MAX_HTTP_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One check's verdict. ``drain`` is only set by an HTTP readiness check answering 503."""

    ok: bool
    detail: str
    drain: bool = False


class RiseFall:
    """Consecutive-result counting, pure: ``rise`` successes make a backend up, ``fall`` failures make it down.

    The very first verdict decides at once (a backend must not wait ``rise`` intervals after start before it may
    take clients, nor look healthy before anything was checked); from then on rise/fall apply.
    """

    __slots__ = ("fall", "healthy", "rise", "streak", "verdicts")

    def __init__(self, rise: int, fall: int, healthy: bool, checked: bool) -> None:
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.verdicts = 1 if checked else 0
        # Consecutive results that disagree with the current state.
        self.streak = 0

    def record(self, ok: bool) -> bool:
        """Count one verdict; return True when the state flips (or is first established)."""
        first = self.verdicts == 0
        self.verdicts += 1
        if first:
            # "Not checked yet" becoming down is news too: the log then says why the backend never came up.
            self.healthy = ok
            self.streak = 0
            return True
        if ok == self.healthy:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (self.rise if ok else self.fall):
            self.healthy = ok
            self.streak = 0
            return True
        return False


def check_port(backend: Backend) -> int:
    return backend.config.check_port or backend.port


def _proxy_header(writer: asyncio.StreamWriter, version: str) -> bytes:
    """The PROXY header for a check's own connection, or b"" when the backend expects none."""
    if version not in ("v1", "v2"):
        return b""
    local, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    return check_header("v1" if version == "v1" else "v2", local[:2], peer[:2])


async def probe_tcp(host: str, port: int, within: float, proxy_protocol: str = "off") -> ProbeResult:
    """Up when a TCP connection opens; closed again at once, having sent nothing but a PROXY header if required."""
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(_proxy_header(writer, proxy_protocol))
    except (TimeoutError, OSError) as exc:
        return _connect_failure(exc)
    writer.close()
    return ProbeResult(True, "TCP connect ok")


def _connect_failure(exc: TimeoutError | OSError) -> ProbeResult:
    """The verdict for a probe whose connection failed, named the way operators read it in the log."""
    if isinstance(exc, TimeoutError):
        return ProbeResult(False, "timeout")
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult(False, "refused")
    if isinstance(exc, ConnectionResetError):
        return ProbeResult(False, "reset")
    return ProbeResult(False, exc.strerror or type(exc).__name__)


async def probe_amqp(
    host: str,
    port: int,
    within: float,
    proxy_protocol: str = "off",
    ssl: SSLContext | None = None,
    server_hostname: str = "",
) -> ProbeResult:
    """Up when the peer answers the AMQP 0-9-1 protocol header with connection.start on channel 0.

    The connection is closed right after connection.start: the broker drops a connection that ends during the
    handshake without keeping any session for it. A PROXY header goes first when ``proxy_protocol`` is v1/v2
    (a backend with proxy_protocol = true drops a connection without one);
    with ``ssl`` the check speaks AMQPS, as the data path does with backend_tls.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl, server_hostname=(server_hostname or host) if ssl is not None else None
            )
            writer.write(_proxy_header(writer, proxy_protocol) + amqp.PROTOCOL_HEADER)
            probe = amqp.StartProbe()
            while True:
                data = await reader.read(_READ_CHUNK)
                probe.receive_data(data)
                start = probe.result()
                if start is not amqp.NEED_DATA:
                    break
    except (TimeoutError, OSError) as exc:
        return _connect_failure(exc)
    except amqp.AMQPProtocolError as exc:
        return ProbeResult(False, f"bad reply: {exc}")
    finally:
        if writer is not None:
            writer.close()
    product = start.product or "AMQP broker"
    version = start.server_version
    return ProbeResult(True, f"{product} {version}" if version else product)


def http_url(template: str, backend: Backend) -> str:
    address = f"[{backend.address}]" if ":" in backend.address else backend.address
    return template.format(address=address, port=check_port(backend))


async def probe_http(session: aiohttp.ClientSession, url: str, headers: dict[str, str], within: float) -> ProbeResult:
    """Up on any 2xx answer; 503 from RabbitMQ's readiness endpoint means drain; anything else is a failure."""
    try:
        async with asyncio.timeout(within), session.get(url, headers=headers, allow_redirects=False) as resp:
            status = resp.status
            # Read a small body to its end so the connection can be reused for the next check; past the cap,
            # stop reading and close the connection instead (what is left of the body is never read).
            read = 0
            while read < MAX_HTTP_BODY:
                chunk = await resp.content.read(MAX_HTTP_BODY - read)
                if not chunk:
                    break
                read += len(chunk)
            if not resp.content.at_eof():
                resp.close()
    except TimeoutError:
        return ProbeResult(False, "timeout")
    except aiohttp.ClientConnectorError as exc:
        cause = exc.os_error
        if isinstance(cause, ConnectionRefusedError):
            return ProbeResult(False, "refused")
        return ProbeResult(False, cause.strerror or str(cause))
    except aiohttp.ClientError as exc:
        return ProbeResult(False, f"bad reply: {exc or type(exc).__name__}")
    return classify_http(status, url)


def classify_http(status: int, url: str) -> ProbeResult:
    """The verdict for an HTTP check's status code (pure, for tests)."""
    if 200 <= status < 300:
        return ProbeResult(True, f"HTTP {status}")
    if status == 503 and READINESS_ENDPOINT in url:
        # Alive but leaving service: healthy, and no new clients.
        return ProbeResult(True, "HTTP 503: being taken out of service", drain=True)
    return ProbeResult(False, f"HTTP {status}")


class Checker:
    """Runs the configured kind of probe against one backend."""

    def __init__(
        self,
        cfg: HealthCheckConfig,
        backend: Backend,
        proxy_protocol: str = "off",
        ssl: SSLContext | None = None,
        server_hostname: str = "",
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        # A backend that expects a PROXY header drops a connection without one, checks included.
        self.proxy_protocol = proxy_protocol
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.session: aiohttp.ClientSession | None = None

    async def probe(self) -> ProbeResult:
        cfg, b = self.cfg, self.backend
        if cfg.type == "tcp":
            return await probe_tcp(b.address, check_port(b), cfg.timeout, self.proxy_protocol)
        if cfg.type == "amqp":
            return await probe_amqp(
                b.address, check_port(b), cfg.timeout, self.proxy_protocol, self.ssl, self.server_hostname
            )
        if cfg.type == "stream":
            return await self._probe_stream()
        if self.session is None:
            # One connection, kept alive between checks: a fresh TCP handshake every interval is wasted work.
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        # A header rather than aiohttp.BasicAuth, which aiohttp 3.14 deprecates.
        headers = {"Authorization": aiohttp.encode_basic_auth(cfg.username, cfg.password)} if cfg.username else {}
        return await probe_http(self.session, http_url(cfg.url, b), headers, cfg.timeout)

    async def _probe_stream(self) -> ProbeResult:
        cfg, b = self.cfg, self.backend
        try:
            ok, detail, found = await probe_stream(
                b.address,
                check_port(b),
                cfg.timeout,
                username=cfg.username,
                password=cfg.password,
                vhost=cfg.vhost,
                ssl=self.ssl,
                server_hostname=self.server_hostname,
            )
        except (TimeoutError, OSError) as exc:
            return _connect_failure(exc)
        if found is not None:
            # What the stream relay maps metadata entries by (and, with workers, what the state push carries).
            b.stream_advertised = found
        return ProbeResult(ok, detail)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def apply_result(service: Service, backend: Backend, state: RiseFall, result: ProbeResult, duration: float) -> None:
    """Feed one verdict into rise/fall and the pool; log and act on a transition."""
    backend.check_duration = duration
    if backend.check_drain != result.drain:
        backend.check_drain = result.drain
        log.info(
            "backend readiness changed",
            service=service.name,
            backend=backend.name,
            admin_state=backend.admin_state,
            reason=result.detail,
        )
    flipped = state.record(result.ok)
    if not flipped:
        # No transition: refresh the detail only while it describes the current state, so a down backend keeps
        # the failure that brought it down, and an up one its last good answer, until the state really changes.
        if result.ok == backend.healthy:
            backend.mark_health(backend.healthy, result.detail, time.time())
        return
    backend.mark_health(state.healthy, result.detail, time.time())
    if state.healthy:
        log.info("backend up", service=service.name, backend=backend.name, reason=result.detail)
        return
    closed = 0
    if service.config.health_check.on_marked_down == "close":
        closed = backend.close_connections(CloseReason.BACKEND_DOWN)
        service.cancel_connects_to(backend)
    log.warning(
        "backend down", service=service.name, backend=backend.name, reason=result.detail, closed_connections=closed
    )


async def health_task(service: Service, backend: Backend) -> None:
    """Probe ``backend`` every interval for as long as the task runs (it is cancelled on reload and shutdown)."""
    cfg = service.config.health_check
    checker = Checker(
        cfg,
        backend,
        service.config.proxy_protocol_for(backend.config),
        service.backend_ssl,
        service.config.backend_tls_server_name,
    )
    state = RiseFall(cfg.rise, cfg.fall, backend.healthy, checked=backend.health_time is not None)
    loop = asyncio.get_running_loop()
    # Checks start on a fixed schedule rather than an interval after the previous one ended, so a backend that
    # times out is declared down within fall x interval + timeout, not fall x (interval + timeout).
    next_at = loop.time()
    # The last unexpected error, so a probe that keeps raising the same thing logs its traceback once, not on
    # every interval (the backend's health detail keeps saying it meanwhile).
    last_error: str | None = None
    try:
        while True:
            if backend.admin_state != "maint":
                # The data path's context, read at every check: a reload replaces it (a new backend CA) also for
                # services whose configuration, and so whose monitors, did not change.
                checker.ssl = service.backend_ssl
                began = loop.time()
                try:
                    result = await checker.probe()
                    last_error = None
                except Exception as exc:
                    # House rule 12: our bug, or a library's surprise (getaddrinfo raises UnicodeError, not
                    # OSError, for "rabbit1..example.com"), is a failed check, so rise/fall carry on and a backend
                    # that cannot be checked goes down after `fall` of them instead of freezing in its last state.
                    result = ProbeResult(False, f"check error: {type(exc).__name__}: {exc}")
                    if result.detail != last_error:
                        log.error(
                            "health check failed unexpectedly",
                            service=service.name,
                            backend=backend.name,
                            reason=result.detail,
                            exc_info=exc,
                        )
                    last_error = result.detail
                    # The HTTP session may be what broke; the next check starts with a new one.
                    await checker.close()
                apply_result(service, backend, state, result, loop.time() - began)
                service.note_checked()
            next_at = max(next_at + cfg.interval, loop.time())
            await asyncio.sleep(next_at - loop.time())
    finally:
        await checker.close()

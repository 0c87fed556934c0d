"""Asking one RabbitMQ node's management API: the I/O around :mod:`rabbitproxy.protocols.management`.

One :class:`ManagementAPI` per backend, sharing one aiohttp session per service (``session_for``). Every call
has the configured timeout, and every way it can fail (refused, timed out, an HTTP error, a body that is not
the expected JSON) is one :class:`ManagementUnavailable` whose text says which, so the monitors that use it have
exactly one peer error to handle and keep their own bugs apart from the broker's.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from rabbitproxy.config import BackendConfig, RabbitMQConfig, ServiceConfig, format_host_port
from rabbitproxy.protocols.management import (
    CHECK_PASSED,
    Alarm,
    ManagementError,
    NodeState,
    Overview,
    QuorumCheck,
    parse_alarms_check,
    parse_node,
    parse_overview,
    parse_quorum_check,
)

# Health-check endpoints answer 503 when the check fails; that is an answer, not an error.
_CHECK_STATUSES = (200, 503)


class ManagementUnavailable(Exception):  # noqa: N818 - a state of the peer, reported as such
    """The management API could not be asked or did not answer as expected; the message says how.

    ``refused`` is True when the connection was refused: the node is up but its listener is closed (maintenance
    mode on 3.10), which a node that is frozen or gone (a timeout) is not.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def session_for(cfg: RabbitMQConfig) -> aiohttp.ClientSession:
    """One HTTP session (connection pool, credentials, CA) for the management APIs of one service's nodes."""
    ssl_ctx: ssl.SSLContext | bool = True
    if cfg.scheme == "https" and cfg.ca:
        ssl_ctx = ssl.create_default_context(cafile=cfg.ca)
    return aiohttp.ClientSession(
        # A header rather than aiohttp.BasicAuth, which aiohttp 3.14 deprecates.
        headers={"Authorization": aiohttp.encode_basic_auth(cfg.username, cfg.password)},
        # A new connection per request: `rabbitmq-upgrade drain` closes the node's management *listener*, but a
        # kept-alive connection to it goes on being answered, and the refused connect is how the node monitor
        # tells maintenance (3.10.8) from a node that is frozen. A handshake every few seconds per node is nothing.
        connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit_per_host=2, force_close=True),
        # Never follow a redirect to somewhere the credentials were not meant for.
        raise_for_status=False,
    )


def base_url_for(service: ServiceConfig, backend: BackendConfig) -> str | None:
    """``http(s)://address:port`` of ``backend``'s management API, or None without [services.rabbitmq]."""
    port = service.management_port_for(backend)
    if port is None or service.rabbitmq is None:
        return None
    return f"{service.rabbitmq.scheme}://{format_host_port(backend.address, port)}"


class ManagementAPI:
    """The management API of one node."""

    __slots__ = ("base_url", "session", "timeout")

    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    async def _call(
        self, method: str, path: str, *, statuses: tuple[int, ...] = (200,), headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        url = self.base_url + path
        try:
            async with self.session.request(
                method,
                url,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                if resp.status not in statuses:
                    raise ManagementUnavailable(f"{method} {path}: HTTP {resp.status}")
                if resp.status == 204:
                    return resp.status, None
                # Bounded: the answers we read are a few KiB; a node listing thousands of queues is not asked.
                body = await resp.content.read(4 << 20)
                try:
                    return resp.status, json.loads(body)
                except ValueError as exc:
                    raise ManagementUnavailable(f"{method} {path}: not JSON ({exc})") from None
        except TimeoutError:
            raise ManagementUnavailable(f"{method} {path}: no answer within {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            # "refused" is what tells a node that stopped its listeners (maintenance) from one that is frozen.
            cause = exc.os_error
            refused = isinstance(cause, ConnectionRefusedError)
            why = "refused" if refused else (cause.strerror or str(cause))
            raise ManagementUnavailable(f"{method} {path}: {why}", refused=refused) from None
        except aiohttp.ClientError as exc:
            raise ManagementUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def overview(self) -> Overview:
        _, body = await self._call("GET", "/api/overview")
        return _parsed(parse_overview, body)

    async def node(self, name: str) -> NodeState:
        _, body = await self._call("GET", f"/api/nodes/{quote(name, safe='')}")
        return _parsed(parse_node, body)

    async def local_alarms(self) -> tuple[Alarm, ...]:
        status, body = await self._call("GET", "/api/health/checks/local-alarms", statuses=_CHECK_STATUSES)
        try:
            return parse_alarms_check(status, body)
        except ManagementError as exc:
            raise ManagementUnavailable(str(exc)) from None

    async def ready_to_serve(self) -> bool | None:
        """Whether the node says it serves clients (False while it is being drained); None where the release has
        neither ``ready-to-serve-clients`` nor ``is-in-service`` (3.10 answers 404 to both)."""
        for check in ("ready-to-serve-clients", "is-in-service"):
            status, _ = await self._call("GET", f"/api/health/checks/{check}", statuses=(*_CHECK_STATUSES, 404))
            if status != 404:
                return status == CHECK_PASSED
        return None

    async def quorum_check(self) -> QuorumCheck:
        status, body = await self._call("GET", "/api/health/checks/node-is-quorum-critical", statuses=_CHECK_STATUSES)
        try:
            return parse_quorum_check(status, body)
        except ManagementError as exc:
            raise ManagementUnavailable(str(exc)) from None

    async def close_connection(self, name: str, reason: str) -> bool:
        """Have the broker close connection ``name`` (320 CONNECTION_FORCED with ``reason``).

        True when it did; False when it knows no such connection (already gone, or named differently).
        """
        status, _ = await self._call(
            "DELETE",
            f"/api/connections/{quote(name, safe='')}",
            statuses=(200, 204, 404),
            # Header values must be latin-1; the reason is our own text, but keep it safe anyway.
            headers={"X-Reason": reason.encode("latin-1", "replace").decode("latin-1")},
        )
        return status != 404


_T = TypeVar("_T")


def _parsed(parse: Callable[[object], _T], body: object) -> _T:
    try:
        return parse(body)
    except ManagementError as exc:
        raise ManagementUnavailable(str(exc)) from None

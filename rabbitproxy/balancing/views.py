"""The typed views other layers read of the pool: a backend's RabbitMQ node, a live connection, its handshake.

Pure data and Protocols, no behaviour: the node monitor writes a :class:`NodeView`, the data path's legs satisfy
:class:`Connection`, and the admin API, the metrics and the control plane read both through these types only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rabbitproxy.balancing.backend import Backend
    from rabbitproxy.balancing.reasons import CloseReason

ALARM_KINDS = ("memory", "disk")


class ManagementStatus(StrEnum):
    """The outcome of the node monitor's last poll of a backend's management API: a closed set (a metric label)."""

    NONE = "none"  # not polled yet
    OK = "ok"
    UNREACHABLE = "unreachable"  # refused, timeout, HTTP error, an answer of the wrong shape
    ERROR = "error"  # the poll raised unexpectedly (our bug)


@dataclass(frozen=True, slots=True)
class NodeStats:
    """The figures of ``/api/nodes/{node}``; None where the broker has not collected them yet."""

    fd_used: int | None = None
    fd_total: int | None = None
    sockets_used: int | None = None
    sockets_total: int | None = None
    mem_used: int | None = None
    mem_limit: int | None = None
    proc_used: int | None = None
    proc_total: int | None = None


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the node monitor last learnt of a backend's RabbitMQ node; replaced whole, never changed in place.

    ``alarms`` holds only kinds from :data:`ALARM_KINDS` and ``status`` is a :class:`ManagementStatus`, so both
    may be metric labels; ``detail``, ``maintenance_detail`` and the node's name are the broker's text.
    """

    node: str | None = None
    version: str | None = None
    alarms: tuple[str, ...] = ()
    maintenance: bool = False
    maintenance_detail: str | None = None
    status: ManagementStatus = ManagementStatus.NONE
    detail: str | None = "not polled yet"
    stats: NodeStats | None = None
    # Wall-clock times (time.time()) of the last poll and of the statistics shown.
    poll_time: float | None = None
    stats_time: float | None = None


class HandshakeInfo(Protocol):
    """What an AMQP connection's handshake said (``rabbitproxy.protocols.amqp_handshake.Handshake``), read-only.

    Every field is None until seen. The text fields come from the client and are cut to 256 characters: fine for
    logs and the admin API, never for metric labels. ``user`` is only ever the name, never a password.
    """

    # "0-9-1", "1.0" (AMQP) or "stream": which protocol the client spoke, as far as the reader saw.
    @property
    def protocol(self) -> str | None: ...
    @property
    def connection_name(self) -> str | None: ...
    @property
    def product(self) -> str | None: ...
    @property
    def version(self) -> str | None: ...
    @property
    def platform(self) -> str | None: ...
    @property
    def mechanism(self) -> str | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def vhost(self) -> str | None: ...
    @property
    def channel_max(self) -> int | None: ...
    @property
    def frame_max(self) -> int | None: ...
    @property
    def heartbeat(self) -> int | None: ...
    # "open" (the broker sent open-ok) or "refused" (it closed the connection during the handshake).
    @property
    def outcome(self) -> str | None: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def close_text(self) -> str | None: ...


class Connection(Protocol):
    """What the pool, the control plane and the admin API may know of a live connection.

    The data path's legs satisfy it; nothing above the relay reads any other field of a leg. ``backend`` is
    re-pointed by a reload that hands a connection to the new :class:`Backend` object of the same server.
    """

    backend: Backend | None
    bytes_in: int
    bytes_out: int
    # The client's address and the address it connected to (from a PROXY header when one was accepted): what a
    # broker sent a PROXY header names the connection by.
    client_src: tuple[str, int] | None
    client_dst: tuple[str, int] | None
    # time.monotonic() when the client connected: the rebalancer moves the youngest connections first.
    started: float
    # Why it ended; a close through the broker names its cause here first, before the backend hangs up.
    reason: CloseReason | None

    # A small integer, unique among the connections of this process (never reused while it runs).
    @property
    def id(self) -> int: ...

    # time.monotonic() of the last byte either way; only kept while an idle timeout watches the connection (a
    # fixed client_idle_timeout, or "auto" once the heartbeat is known), else 0.0: keeping it costs a clock read
    # per chunk.
    @property
    def last_activity(self) -> float: ...

    # The AMQP handshake as far as it was read; None for a "tcp" service.
    @property
    def handshake(self) -> HandshakeInfo | None: ...

    # The client as host:port (the PROXY header's source when one was accepted).
    @property
    def client_addr(self) -> str: ...

    def close(self, reason: CloseReason) -> None: ...

    def backend_endpoints(self) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """(the proxy's address towards the backend, the backend's address) as connected, or None if not."""
        ...

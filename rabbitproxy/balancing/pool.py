"""Runtime state of a service's backends and the choice of one for a new connection.

Pure bookkeeping, no I/O: health checks, feedback agents and the admin API change a :class:`Backend`'s state
through the methods here, the data path asks :meth:`Pool.choose` for a backend and tells the backend when a
connection opens and closes.

A backend has two independent states, as in HAProxy: *health* (up/down, from checks) and *admin state*
(ready/drain/maint). The admin state has two sources, the operator (admin API, CLI) and the feedback agent; the
stricter of the two wins, so an agent saying ``ready`` cannot undo an operator's ``maint``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Literal, Protocol

from rabbitproxy.balancing.algorithms import Balancer, make_balancer
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import BackendConfig, ServiceConfig

AdminState = Literal["ready", "drain", "maint"]
ADMIN_STATES: tuple[AdminState, ...] = ("ready", "drain", "maint")
_STRICTNESS: dict[AdminState, int] = {"ready": 0, "drain": 1, "maint": 2}


class AgentStatus(StrEnum):
    """The outcome of a backend's last feedback-agent poll: a closed set, so it can be a metric label.

    The agent's own words and the reason a poll failed are free text; they go to ``Backend.agent_detail`` (the admin
    API and the log), never into a label, or every new reply would start a new time series.
    """

    NONE = "none"  # no agent configured, or not polled yet
    OK = "ok"
    UNREACHABLE = "unreachable"  # refused, timeout, HTTP error: the last good value is kept
    BAD_REPLY = "bad reply"  # the agent answered something the parser rejects: the last good value is kept
    ERROR = "error"  # the poll raised unexpectedly (our bug): the last good value is kept


# The largest weight the configuration accepts; an agent's percentage cannot push a backend beyond it.
MAX_WEIGHT = 1000


class HandshakeInfo(Protocol):
    """What an AMQP connection's handshake said (``rabbitproxy.protocols.amqp_handshake.Handshake``), read-only.

    Every field is None until seen. The text fields come from the client and are cut to 256 characters: fine for
    logs and the admin API, never for metric labels. ``user`` is only ever the name, never a password.
    """

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

    # A small integer, unique among the connections of this process (never reused while it runs).
    @property
    def id(self) -> int: ...

    # time.monotonic() at accept.
    @property
    def started(self) -> float: ...

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


class Backend:
    """One real server of one service: configuration plus everything that changes at runtime."""

    __slots__ = (
        "address",
        "agent_detail",
        "agent_down",
        "agent_duration",
        "agent_percent",
        "agent_reply",
        "agent_state",
        "agent_status",
        "backup",
        "check_drain",
        "check_duration",
        "config",
        "configured_weight",
        "connect_errors",
        "connections",
        "health_detail",
        "health_time",
        "healthy",
        "name",
        "operator_state",
        "port",
        "total",
        "traffic_in",
        "traffic_out",
        "weight_overridden",
    )

    def __init__(self, config: BackendConfig, port: int, *, healthy: bool) -> None:
        self.config = config
        self.name = config.name
        self.address = config.address
        self.port = port
        self.backup = config.backup
        self.configured_weight = config.weight
        # True once an operator set the weight at runtime; such a weight survives reloads.
        self.weight_overridden = False
        self.healthy = healthy
        self.health_detail = "no check configured" if healthy else "not checked yet"
        self.health_time: float | None = None
        self.check_duration: float | None = None
        # An HTTP readiness check can answer "being taken out of service" (RabbitMQ's 503 from
        # ready-to-serve-clients): the node is alive but wants no new clients, i.e. drain, not down.
        self.check_drain = False
        self.operator_state: AdminState = "ready"
        self.agent_state: AdminState = "ready"
        self.agent_percent: int | None = None
        self.agent_reply: str | None = None
        self.agent_status = AgentStatus.NONE
        # Why the last poll was not ``ok`` (e.g. "refused", the parser's complaint); None while it is.
        self.agent_detail: str | None = None
        # The agent's reason when it last said down/fail/stopped; None while it says up or nothing about health.
        self.agent_down: str | None = None
        self.agent_duration: float | None = None
        self.connections: set[Connection] = set()
        self.total = 0
        self.connect_errors = 0
        self.traffic_in = 0
        self.traffic_out = 0

    # -- derived state -------------------------------------------------------------------------------------------

    @property
    def admin_state(self) -> AdminState:
        a, b = self.operator_state, self.agent_state
        state = a if _STRICTNESS[a] >= _STRICTNESS[b] else b
        return "drain" if state == "ready" and self.check_drain else state

    @property
    def usable(self) -> bool:
        """True when a new connection may be sent here (weight aside)."""
        return self.healthy and self.agent_down is None and self.admin_state == "ready"

    @property
    def effective_weight(self) -> int:
        """Configured weight scaled by the agent's percentage, capped at 1000. 0 means no new connections."""
        if self.agent_percent is None:
            return self.configured_weight
        # Agents may ask for more than 100%; the cap keeps one agent from outweighing the config's own limit.
        return min(MAX_WEIGHT, self.configured_weight * self.agent_percent // 100)

    @property
    def weight(self) -> int:
        # The balancer's view: an unusable backend weighs nothing.
        return self.effective_weight if self.usable else 0

    @property
    def active(self) -> int:
        return len(self.connections)

    def traffic(self) -> tuple[int, int]:
        """Bytes (client to backend, backend to client) so far, the open connections' bytes included."""
        # Finished connections are added at close; open ones are counted live so the totals never jump.
        live_in = live_out = 0
        for conn in self.connections:
            live_in += conn.bytes_in
            live_out += conn.bytes_out
        return self.traffic_in + live_in, self.traffic_out + live_out

    @property
    def status(self) -> str:
        """One word for people: maint, drain, down or up (in that order of precedence)."""
        state = self.admin_state
        if state != "ready":
            return state
        if not self.healthy or self.agent_down is not None:
            return "down"
        # An agent's 0% takes no new connections but is not a failure: HAProxy shows it as DRAIN too.
        return "drain" if self.effective_weight == 0 and self.agent_percent is not None else "up"

    def mark_health(self, healthy: bool, detail: str, now: float) -> bool:
        """Record a check's verdict; True when ``healthy`` changed."""
        changed = healthy != self.healthy
        self.healthy = healthy
        self.health_detail = detail
        self.health_time = now
        return changed

    # -- connection accounting -----------------------------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.total += 1

    def closed(self, conn: Connection, traffic_in: int, traffic_out: int) -> None:
        self.connections.discard(conn)
        self.traffic_in += traffic_in
        self.traffic_out += traffic_out

    def close_connections(self, reason: CloseReason) -> int:
        """End every connection through this backend (marked down, maint); return how many."""
        conns = list(self.connections)
        for conn in conns:
            conn.close(reason)
        return len(conns)

    # -- operator changes (admin API, CLI) -----------------------------------------------------------------------

    def set_operator_state(self, state: AdminState, close_reason: CloseReason) -> int:
        """Set the operator's admin state; ``maint`` also ends the open connections. Returns how many were closed.

        ``drain`` only stops new connections: the clients already here stay until they leave, which is the
        point of draining a RabbitMQ node before patching it.
        """
        if state not in _STRICTNESS:
            raise ValueError(f"state must be one of {', '.join(ADMIN_STATES)}, not {state!r}")
        self.operator_state = state
        return self.close_connections(close_reason) if state == "maint" else 0

    def set_weight(self, weight: int) -> None:
        """Set the configured weight at runtime; it then survives reloads until the process restarts."""
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
            raise ValueError(f"weight must be a whole number from 0 to 1000, not {weight!r}")
        self.configured_weight = weight
        self.weight_overridden = True

    def adopt_operator_state(self, old: Backend) -> None:
        """Carry only what an operator set (state, weight): ``old`` had this name but was another server."""
        self.operator_state = old.operator_state
        if old.weight_overridden:
            self.configured_weight = old.configured_weight
            self.weight_overridden = True

    def adopt_runtime_state(self, old: Backend) -> None:
        """Carry what an operator and the checks learnt over a reload of an unchanged-name backend."""
        self.adopt_operator_state(old)
        self.healthy = old.healthy
        self.health_detail = old.health_detail
        self.health_time = old.health_time
        self.agent_state = old.agent_state
        self.agent_percent = old.agent_percent
        self.agent_reply = old.agent_reply
        self.agent_status = old.agent_status
        self.agent_detail = old.agent_detail
        self.agent_down = old.agent_down
        self.agent_duration = old.agent_duration
        self.check_drain = old.check_drain
        self.check_duration = old.check_duration
        self.connections = old.connections
        # The open connections must report their close (and bytes) to this object from now on, or the traffic of
        # every connection older than the reload would be credited to a Backend nobody looks at any more.
        for conn in self.connections:
            if conn.backend is old:
                conn.backend = self
        self.total = old.total
        self.connect_errors = old.connect_errors
        self.traffic_in = old.traffic_in
        self.traffic_out = old.traffic_out


class Pool:
    """The backends of one service and its balancing algorithm."""

    __slots__ = ("backends", "balancer", "by_name")

    def __init__(self, backends: Sequence[Backend], algorithm: str) -> None:
        self.backends = list(backends)
        self.by_name = {b.name: b for b in self.backends}
        self.balancer: Balancer = make_balancer(algorithm)

    @classmethod
    def from_config(cls, service: ServiceConfig, *, healthy: bool) -> Pool:
        return cls(
            [Backend(b, service.backend_port(b), healthy=healthy) for b in service.backends], service.balance
        )

    def choose(self, key: bytes | None = None, exclude: Iterable[Backend] = ()) -> Backend | None:
        """Pick a backend for a new connection, or None when no backend may take one.

        Backup backends are considered only while no regular backend is usable at all; ``exclude`` (backends a
        retry already failed on) does not count towards that, so a failed regular backend does not open the backups
        while another regular one is still there.
        """
        # One pass and one weight read per backend: this runs for every new connection.
        regular: list[Backend] = []
        backups: list[Backend] = []
        for b in self.backends:
            if b.weight > 0:
                (backups if b.backup else regular).append(b)
        candidates = regular or backups
        if exclude:
            skip = set(exclude)
            candidates = [b for b in candidates if b not in skip]
        if not candidates:
            return None
        return self.balancer.choose(candidates, key)

    @property
    def active(self) -> int:
        return sum(b.active for b in self.backends)

    def usable_count(self) -> int:
        return sum(1 for b in self.backends if b.weight > 0)

"""One backend of a service as it runs: health, admin state, weight arithmetic, connection accounting.

Pure bookkeeping, no I/O: health checks, feedback agents and the admin API change a :class:`Backend`'s state
through the methods here, the data path asks :meth:`Pool.choose` for a backend and tells the backend when a
connection opens and closes.

A backend has two independent states, as in HAProxy: *health* (up/down, from checks) and *admin state*
(ready/drain/maint). The admin state has two sources, the operator (admin API, CLI) and the feedback agent; the
stricter of the two wins, so an agent saying ``ready`` cannot undo an operator's ``maint``.

With ``[services.rabbitmq]`` the node monitor adds what the RabbitMQ node says of itself (:class:`NodeView`): a
local alarm scales the weight down to ``alarm_weight`` percent, and maintenance mode (``rabbitmq-upgrade drain``)
takes no new connections, like drain. Slow start ramps the weight of a backend that has just become usable again;
the ramp is computed from a clock value handed in, so all of it stays pure.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import NodeView

if TYPE_CHECKING:
    from rabbitproxy.balancing.views import Connection
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
# Slow start begins at this fraction of the full weight (HAProxy starts near zero; a tenth still lets a node that
# came back take a first few clients at once, so an operator sees it working).
SLOW_START_FLOOR = 0.1


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
        "alarm_weight",
        "backup",
        "check_drain",
        "check_duration",
        "config",
        "configured_weight",
        "connect_errors",
        "connecting",
        "connections",
        "health_detail",
        "health_time",
        "healthy",
        "name",
        "operator_state",
        "port",
        "rabbitmq",
        "ramp_start",
        "rebalance_hold",
        "slow_start",
        "stream_advertised",
        "successor",
        "total",
        "traffic_in",
        "traffic_out",
        "usable_before",
        "weight_overridden",
    )

    def __init__(
        self,
        config: BackendConfig,
        port: int,
        *,
        healthy: bool,
        slow_start: float = 0.0,
        alarm_weight: int = 100,
        rabbitmq: NodeView | None = None,
    ) -> None:
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
        # Connects in flight to this backend: clients already sent here whose connection is not open yet. Counted
        # by least-connections and max_connections, or a burst of clients (all connecting at once, as clients
        # do after a node restart) would all see the same counts and pile onto one backend.
        self.connecting = 0
        # Set by the rebalancer while it moves clients: this backend holds its share already, so new connections go
        # to the backends below theirs (see Pool.choose); never a reason for a connection to be refused.
        self.rebalance_hold = False
        self.total = 0
        self.connect_errors = 0
        self.traffic_in = 0
        self.traffic_out = 0
        # Seconds of slow start (0 = off) and the percent of weight kept under a local alarm, from the service.
        self.slow_start = slow_start
        self.alarm_weight = alarm_weight
        # What the node monitor knows of the RabbitMQ node; None without [services.rabbitmq].
        self.rabbitmq = rabbitmq
        # protocol = "stream": the (host, port) this node advertises to stream clients, learnt from its Open
        # response (its check's or a relayed connection's); None until then.
        self.stream_advertised: tuple[str, int] | None = None
        # Monotonic time a slow-start ramp began; None while no ramp is running.
        self.ramp_start: float | None = None
        # Whether the backend was usable when last observed (None: never seen usable or unusable after a check),
        # so observe() can tell the moment it becomes usable again.
        self.usable_before: bool | None = None

        # The object that replaced this one in its pool when a reload kept the same server (same name and
        # address); None while this one is current. A connect in flight across the reload follows it.
        self.successor: Backend | None = None

    @classmethod
    def for_service(cls, service: ServiceConfig, config: BackendConfig, *, healthy: bool) -> Backend:
        """A backend of ``service``, with the service's slow start and alarm weight."""
        rmq = service.rabbitmq
        return cls(
            config,
            service.backend_port(config),
            healthy=healthy,
            slow_start=service.slow_start,
            alarm_weight=rmq.alarm_weight if rmq is not None else 100,
            rabbitmq=NodeView() if rmq is not None else None,
        )

    # -- derived state -------------------------------------------------------------------------------------------

    @property
    def admin_state(self) -> AdminState:
        a, b = self.operator_state, self.agent_state
        state = a if _STRICTNESS[a] >= _STRICTNESS[b] else b
        return "drain" if state == "ready" and self.check_drain else state

    @property
    def in_maintenance(self) -> bool:
        """The node monitor found the RabbitMQ node in maintenance mode (``rabbitmq-upgrade drain``)."""
        rmq = self.rabbitmq
        return rmq is not None and rmq.maintenance

    @property
    def alarms(self) -> tuple[str, ...]:
        rmq = self.rabbitmq
        return rmq.alarms if rmq is not None else ()

    @property
    def usable(self) -> bool:
        """True when a new connection may be sent here (weight aside)."""
        rmq = self.rabbitmq
        return (
            self.healthy
            and self.agent_down is None
            and self.admin_state == "ready"
            and (rmq is None or not rmq.maintenance)
        )

    def effective_weight_at(self, now: float) -> int:
        """The weight for new connections at monotonic time ``now``, usable or not; 0 means none.

        Configured weight x the agent's percentage (capped at 1000) x ``alarm_weight`` % while the node has a local
        alarm x the slow-start ramp (from :data:`SLOW_START_FLOOR` to 1 over ``slow_start`` seconds). A reduced
        weight never rounds down to 0 unless one of the factors is 0: a node on the ramp must still get clients.
        """
        weight = self.configured_weight
        if self.agent_percent is not None:
            # Agents may ask for more than 100%; the cap keeps one agent from outweighing the config's own limit.
            weight = min(MAX_WEIGHT, weight * self.agent_percent // 100)
        if weight and self.rabbitmq is not None and self.rabbitmq.alarms:
            weight = max(1, weight * self.alarm_weight // 100) if self.alarm_weight else 0
        if weight and self.ramp_start is not None and self.slow_start > 0:
            elapsed = now - self.ramp_start
            if elapsed < self.slow_start:
                share = SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * max(0.0, elapsed) / self.slow_start
                weight = max(1, int(weight * share))
        return weight

    @property
    def effective_weight(self) -> int:
        """:meth:`effective_weight_at` now; the clock is read only while a slow-start ramp runs."""
        if self.ramp_start is None:
            # The common case, read for every backend on every new connection: no agent, no alarm, no ramp.
            rmq = self.rabbitmq
            if self.agent_percent is None and (rmq is None or not rmq.alarms):
                return self.configured_weight
            return self.effective_weight_at(0.0)
        now = time.monotonic()
        if now - self.ramp_start >= self.slow_start:
            # The ramp is over: forget it, so the path for every later connection reads no clock at all.
            self.ramp_start = None
        return self.effective_weight_at(now)

    @property
    def weight(self) -> int:
        # The balancer's view: an unusable backend weighs nothing.
        usable = self.usable
        if self.slow_start and usable is not self.usable_before:
            # Read for every backend on every choice, so a backend that became usable since the last connection
            # (a reload, an API change) starts its ramp at the latest with the next connection. The clock is read
            # only on such a change.
            self.observe(time.monotonic())
        return self.effective_weight if usable else 0

    def observe(self, now: float) -> None:
        """Note whether the backend is usable now; one that becomes usable again starts its slow-start ramp.

        Called by whatever changes the state (checks, agents, the node monitor, the admin API) and on every weight
        read while slow start is on. The first time a backend is seen usable (at start) it gets its full weight at
        once, as in HAProxy: there is no crowd of clients waiting for it then.
        """
        usable = self.usable
        if usable == self.usable_before:
            return
        if not usable and self.health_time is None and not self.healthy:
            # Not checked yet: nothing has been observed.
            return
        if usable and self.usable_before is False:
            self.start_ramp(now)
        elif not usable:
            self.ramp_start = None
        self.usable_before = usable

    def start_ramp(self, now: float) -> None:
        """Begin a slow-start ramp at ``now`` (a no-op with slow start off), e.g. when a local alarm clears."""
        if self.slow_start > 0:
            self.ramp_start = now

    @property
    def active(self) -> int:
        return len(self.connections)

    @property
    def load(self) -> int:
        """What least-connections balances: open connections plus connects in flight."""
        return len(self.connections) + self.connecting

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
        """One word for people: maint, drain, maintenance, down or up (in that order of precedence).

        ``maintenance`` goes before ``down``: a node in RabbitMQ's maintenance mode has closed its AMQP listener,
        so its health check fails too, but the node monitor knows why and an operator should not see a crash.
        """
        state = self.admin_state
        if state != "ready":
            return state
        if self.in_maintenance:
            return "maintenance"
        if not self.healthy or self.agent_down is not None:
            return "down"
        # An agent's 0% (or a local alarm with alarm_weight = 0) takes no new connections but is not a failure:
        # HAProxy shows an agent's 0% as DRAIN too.
        if self.effective_weight == 0 and (self.agent_percent is not None or self.alarms):
            return "drain"
        return "up"

    def mark_health(self, healthy: bool, detail: str, now: float) -> bool:
        """Record a check's verdict; True when ``healthy`` changed."""
        changed = healthy != self.healthy
        self.healthy = healthy
        self.health_detail = detail
        self.health_time = now
        self.observe(time.monotonic())
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
        """End every connection through this backend (marked down, maint); return how many.

        The count is taken from ``len(connections)``: in the parent of ``workers = N`` that is the workers' sum (a
        connection set that holds none itself), and the workers close their own when the new state reaches them,
        so the parent's log line says how many the verdict ends rather than 0.
        """
        count = len(self.connections)
        for conn in list(self.connections):
            conn.close(reason)
        return count

    # -- operator changes (admin API, CLI) -----------------------------------------------------------------------

    def set_operator_state(self, state: AdminState, close_reason: CloseReason, *, close: bool = True) -> int:
        """Set the operator's admin state; ``maint`` also ends the open connections. Returns how many were closed.

        ``drain`` only stops new connections: the clients already here stay until they leave, which is the
        point of draining a RabbitMQ node before patching it. ``close=False`` leaves the closing of a ``maint``
        backend's connections to the caller (the control plane closes them through the broker, at a rate).
        """
        if state not in _STRICTNESS:
            raise ValueError(f"state must be one of {', '.join(ADMIN_STATES)}, not {state!r}")
        self.operator_state = state
        self.observe(time.monotonic())
        return self.close_connections(close_reason) if state == "maint" and close else 0

    def set_weight(self, weight: int) -> None:
        """Set the weight at runtime; it survives reloads (and restarts, with a state file) until reset."""
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
            raise ValueError(f"weight must be a whole number from 0 to 1000, not {weight!r}")
        self.configured_weight = weight
        self.weight_overridden = True

    def clear_weight_override(self) -> None:
        """Drop a runtime weight: the configuration's weight applies again."""
        self.configured_weight = self.config.weight
        self.weight_overridden = False

    def adopt_operator_state(self, old: Backend) -> None:
        """Carry only what an operator set (state, weight): ``old`` had this name but was another server.

        A runtime weight is kept only while the file's weight is the one it overrode: a weight edited in the file
        since then is the newer decision and wins (HAProxy's rule for its server-state file).
        """
        self.operator_state = old.operator_state
        if old.weight_overridden and old.config.weight == self.config.weight:
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
        if self.rabbitmq is not None and old.rabbitmq is not None:
            self.rabbitmq = old.rabbitmq
        self.ramp_start = old.ramp_start
        self.usable_before = old.usable_before
        if (self.address, self.port) == (old.address, old.port):
            self.stream_advertised = old.stream_advertised
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
        old.successor = self

    def current(self) -> Backend:
        """The object that now stands for this server in its pool (itself unless a reload replaced it)."""
        backend = self
        while backend.successor is not None:
            backend = backend.successor
        return backend

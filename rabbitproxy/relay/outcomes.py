"""What a service counts and logs when a connection's handshake is read and when the connection ends.

Both run once per connection, never per chunk. They are :class:`~rabbitproxy.relay.service.Service` methods,
defined here and bound in the class body (``handshake_finished = outcomes.handshake_finished``), so a call costs
what it did when they were written inline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from rabbitproxy import logs
from rabbitproxy.addresses import format_host_port
from rabbitproxy.balancing.reasons import CloseReason

if TYPE_CHECKING:
    from rabbitproxy.relay.leg_state import LegState
    from rabbitproxy.relay.service import Service

# The same logger as the service's: these events have always been "rabbitproxy.connection" events.
log = structlog.get_logger("rabbitproxy.connection")

# Open connections per vhost are counted under at most this many vhost names per service; the rest under
# OTHER_VHOST. A vhost name is chosen by the client (it is counted only once the broker has opened it, so it names a
# vhost that exists), and every distinct label value is a time series in Prometheus.
MAX_VHOST_LABELS = 50
OTHER_VHOST = "other"

# The broker's reply codes for a refused login (wrong user or password) and a vhost the user may not open.
ACCESS_REFUSED = 403
NOT_ALLOWED = 530
# The stream protocol's: authentication failure (and its loopback variant), vhost access failure, access refused.
STREAM_REFUSED = frozenset({8, 11, 12, 16})


def handshake_finished(self: Service, conn: LegState, gave_up: str | None) -> None:
    """A connection's handshake reader is done: count the outcome, start the heartbeat watch, warn."""
    hs = conn.handshake
    if hs is None:
        return
    if gave_up is not None:
        # AMQP 1.0 is another protocol, not a handshake we failed to follow.
        if hs.protocol != "1.0":
            self.handshakes_given_up += 1
            log.debug("AMQP handshake not followed", service=self.name, client=conn.client_addr, why=gave_up)
        return
    if hs.outcome == "open":
        vhosts = self.vhost_open
        label = hs.vhost or "/"
        if label not in vhosts and len(vhosts) >= MAX_VHOST_LABELS:
            label = OTHER_VHOST
        vhosts[label] = vhosts.get(label, 0) + 1
        conn.vhost_label = label
        cfg = self.config
        heartbeat = hs.heartbeat
        if cfg.heartbeat_idle:
            if heartbeat:
                conn.watch_heartbeat(heartbeat)
        elif heartbeat == 0 and cfg.idle_seconds > 0 and not self.warned_no_heartbeat:
            self.warned_no_heartbeat = True
            log.warning(
                "client negotiated no heartbeat, but client_idle_timeout is fixed: an idle client of this kind"
                ' is cut when it stays silent longer than the timeout (consider client_idle_timeout = "auto")',
                service=self.name,
                client=conn.client_addr,
                user=hs.user,
                connection_name=hs.connection_name,
                client_idle_timeout=cfg.idle_seconds,
            )
    elif hs.outcome == "refused" and (
        hs.close_code in STREAM_REFUSED if hs.protocol == "stream" else hs.close_code in (ACCESS_REFUSED, NOT_ALLOWED)
    ):
        self.failed_logins += 1
        # RabbitMQ logs the refusal too, but behind SNAT it sees our address; this line has the client's.
        log.warning(
            "login refused by the broker",
            service=self.name,
            client=conn.client_addr,
            backend=conn.backend.name if conn.backend else None,
            user=hs.user,
            vhost=hs.vhost,
            code=hs.close_code,
            text=hs.close_text,
        )


def connection_closed(self: Service, conn: LegState) -> None:
    self.connections.discard(conn)
    if self._empty is not None and not self.connections:
        self._empty.set()
    label = conn.vhost_label
    if label is not None:
        left = self.vhost_open[label] - 1
        if left:
            self.vhost_open[label] = left
        else:
            # A vhost with no connection left frees its label for another (the gauge shows it no more).
            del self.vhost_open[label]
    # Every path that ends a connection names its reason first; a client that vanished is the fallback.
    reason = conn.reason or CloseReason.CLIENT_RESET
    self.ended[reason] += 1
    if not logs.info_enabled:
        return
    # Only an aborted close and what the handshake showed add fields: the usual TCP event stays as it was.
    extra: dict[str, Any] = {"close_timeout_expired": True} if conn.close_aborted else {}
    hs = conn.handshake
    if hs is not None:
        for key, value in (
            ("user", hs.user),
            ("vhost", hs.vhost),
            ("connection_name", hs.connection_name),
            ("client_product", hs.product),
            ("client_version", hs.version),
            ("heartbeat", hs.heartbeat),
        ):
            if value is not None:
                extra[key] = value
        if hs.outcome == "refused":
            extra["refused_code"] = hs.close_code
            extra["refused_text"] = hs.close_text
    backend = conn.backend
    self.conn_log.info(
        {
            "client": conn.client_addr,
            "backend": backend.name if backend else None,
            "backend_addr": format_host_port(backend.address, backend.port) if backend else None,
            "local": conn.backend_local or None,
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "duration": round(conn.duration, 3),
            # The value, not the member: a terminal's ConsoleRenderer would print the enum's repr.
            "reason": reason.value,
            **extra,
        }
    )

"""Why a connection ended: one closed set of words, shared by the data path, the control plane and the metrics.

Every connection log event carries exactly one of these, and ``rabbitproxy_service_connections_ended`` counts by
them. Keeping them in one ``StrEnum`` here, below every other layer, lets the health checks, the agents and the
admin API name a reason without importing the data path, and keeps the metric's label values a fixed set.
"""

from __future__ import annotations

from enum import StrEnum


class CloseReason(StrEnum):
    """The reason in a ``connection closed`` event; its value is what logs and metrics show."""

    CLIENT_CLOSED = "client closed"
    BACKEND_CLOSED = "backend closed"
    CLIENT_RESET = "client reset"
    BACKEND_RESET = "backend reset"
    CONNECT_FAILED = "connect failed"
    NO_BACKEND = "no backend"
    LIMIT = "limit"
    IDLE_TIMEOUT = "idle timeout"
    # client_idle_timeout = "auto": the client sent nothing for 2.5 x its negotiated heartbeat (vanished or froze).
    HEARTBEAT_TIMEOUT = "heartbeat timeout"
    SHUTDOWN = "shutdown"
    BACKEND_DOWN = "backend down"
    BACKEND_MAINT = "backend maint"
    SERVICE_REMOVED = "service removed"
    HELLO_TIMEOUT = "hello timeout"
    BAD_PROXY_HEADER = "bad proxy header"
    # A PROXY header from a source not in proxy_protocol_from: someone trying to choose their own address.
    UNTRUSTED_PROXY_HEADER = "untrusted proxy header"
    # Closed through the broker (or by TCP when it could not be): a drain's deadline passed, or the rebalancer moved it.
    DRAIN_DEADLINE = "drain deadline"
    REBALANCE = "rebalance"
    # Held by admission control (connect_rate) for connect_queue_timeout without getting a connect token.
    ADMISSION_TIMEOUT = "admission timeout"
    # An operator closed this one connection (DELETE /api/connections/{id}, `rabbitproxy connections close`).
    OPERATOR_CLOSE = "operator close"

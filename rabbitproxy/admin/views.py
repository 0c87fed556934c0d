"""What the admin API answers about services and backends, as JSON-ready data (also the overview page's)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rabbitproxy.addresses import format_host_port
from rabbitproxy.balancing.admission import default_burst
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.views import NodeView
from rabbitproxy.config.l4 import L4_NAT

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor
    from rabbitproxy.relay.service import Service


def backend_view(backend: Backend) -> dict[str, Any]:
    """Everything an operator wants to know about one backend, as JSON-ready data."""
    traffic_in, traffic_out = backend.traffic()
    return {
        "name": backend.name,
        "address": backend.address,
        "port": backend.port,
        "backup": backend.backup,
        "status": backend.status,
        "weight": backend.configured_weight,
        "configured_weight": backend.config.weight,
        "weight_overridden": backend.weight_overridden,
        "effective_weight": backend.effective_weight,
        "health": {
            "status": "up" if backend.healthy else "down",
            "detail": backend.health_detail,
            "time": backend.health_time,
            "duration": backend.check_duration,
        },
        "admin_state": backend.admin_state,
        "operator_state": backend.operator_state,
        "agent": {
            "state": backend.agent_state,
            "status": backend.agent_status,
            "detail": backend.agent_detail,
            "percent": backend.agent_percent,
            "reply": backend.agent_reply,
            "duration": backend.agent_duration,
        },
        "connections": {"active": backend.active, "total": backend.total, "connect_errors": backend.connect_errors},
        "rebalance_hold": backend.rebalance_hold,
        "bytes": {"in": traffic_in, "out": traffic_out},
        "slow_start": _slow_start_view(backend),
        "rabbitmq": rabbitmq_view(backend.rabbitmq),
    }


def _slow_start_view(backend: Backend) -> dict[str, Any] | None:
    """The running slow-start ramp, or None when none runs (or slow start is off)."""
    start = backend.ramp_start
    if start is None or not backend.slow_start:
        return None
    elapsed = time.monotonic() - start
    return {
        "seconds": backend.slow_start,
        "elapsed": round(elapsed, 3),
        "remaining": max(0.0, backend.slow_start - elapsed),
    }


def rabbitmq_view(node: NodeView | None) -> dict[str, Any] | None:
    """What the node monitor knows of the backend's RabbitMQ node; None without [services.rabbitmq]."""
    if node is None:
        return None
    stats = node.stats
    return {
        "node": node.node,
        "version": node.version,
        "alarms": list(node.alarms),
        "maintenance": node.maintenance,
        "maintenance_detail": node.maintenance_detail,
        "management": {"status": node.status, "detail": node.detail},
        "poll_time": node.poll_time,
        "stats_time": node.stats_time,
        "fd": {"used": stats.fd_used, "total": stats.fd_total} if stats else None,
        "sockets": {"used": stats.sockets_used, "total": stats.sockets_total} if stats else None,
        "memory": {"used": stats.mem_used, "limit": stats.mem_limit} if stats else None,
        "processes": {"used": stats.proc_used, "total": stats.proc_total} if stats else None,
    }


def service_view(service: Service) -> dict[str, Any]:
    cfg = service.config
    return {
        "name": service.name,
        "mode": cfg.mode,
        "listen": cfg.listen,
        "bound": [format_host_port(h, p) for h, p in service.bound],
        "balance": cfg.balance,
        "accepting": service.accepting,
        "health_check": cfg.health_check.type,
        "feedback": cfg.feedback.type,
        "rabbitmq": cfg.rabbitmq is not None,
        "slow_start": cfg.slow_start,
        "connections": {"active": service.active, "total": service.total},
        "admission": _admission_view(service),
        "ended": dict(sorted(service.ended.items())),
        "backends": [backend_view(b) for b in service.pool.backends],
    }


def _admission_view(service: Service) -> dict[str, Any] | None:
    """Admission control's settings and queue; None while no connect_rate is set (on the service or a backend)."""
    cfg = service.config
    figures = service.admission_figures()
    if figures is None:
        return None
    held = figures.held
    return {
        "connect_rate": cfg.connect_rate,
        "connect_burst": cfg.connect_burst or (default_burst(cfg.connect_rate) if cfg.connect_rate > 0 else 0),
        "connect_queue_timeout": cfg.connect_queue_timeout,
        "backend_rates": {b.name: b.connect_rate for b in cfg.backends if b.connect_rate > 0},
        "waiting": figures.waiting,
        "oldest_wait": round(figures.oldest_wait, 3),
        "held_total": held,
        "mean_wait": round(figures.wait_sum / held, 3) if held else None,
    }


def steered_backend(proxy: Supervisor, service: str, view: dict[str, Any]) -> dict[str, Any]:
    """A backend's view plus what the control plane steers: the seconds left of a drain's deadline, the hold."""
    view["drain_deadline"] = proxy.steering.deadline_left(service, view["name"])
    return view


L4_NOTE = (
    "l4-nat: the kernel forwards each flow; this process holds no connection, so there is no per-connection "
    "identity (no connection list, no close by id) and connections.active is not known; the kernel's counters "
    "are under l4"
)


def steered(proxy: Supervisor, service: str, view: dict[str, Any]) -> dict[str, Any]:
    for b in view["backends"]:
        steered_backend(proxy, service, b)
    if view.get("mode") == L4_NAT and proxy.l4 is not None:
        counts = proxy.l4.counters()
        view["l4"] = {
            "table": proxy.l4.table,
            "note": L4_NOTE,
            "transactions": proxy.l4.transactions,
            "failures": proxy.l4.failures,
        }
        for b in view["backends"]:
            c = counts.get((service, b["name"]))
            b["l4"] = None if c is None else {"flows": c.flows, "bytes_in": c.bytes_in, "bytes_out": c.bytes_out}
    return view

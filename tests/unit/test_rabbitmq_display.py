"""What the node monitor found, as the admin API, /metrics and `rabbitproxy status` show it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rabbitproxy import config as config_mod
from rabbitproxy.admin.client import print_status, rabbitmq_text
from rabbitproxy.admin.metrics import registry_for, render
from rabbitproxy.admin.views import backend_view, service_view
from rabbitproxy.balancing.views import ManagementStatus, NodeStats, NodeView
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.relay.service import Service


def _proxy(rabbitmq: bool = True) -> Supervisor:
    svc: dict[str, Any] = {
        "name": "amqp",
        "listen": "127.0.0.1:5673",
        "health_check": {"type": "none"},
        "backends": [{"name": f"rabbit{i}", "address": "10.0.0.1", "port": 5670 + i} for i in (1, 2)],
    }
    if rabbitmq:
        svc["rabbitmq"] = {"alarm_weight": 50}
    cfg = config_mod.validate({"services": [svc]})
    proxy = Supervisor(cfg)
    proxy.services["amqp"] = Service(cfg.services[0])
    return proxy


STATS = NodeStats(
    fd_used=40, fd_total=1024, sockets_used=3, sockets_total=900, mem_used=1 << 27, mem_limit=1 << 30, proc_used=400,
    proc_total=1 << 20,
)  # fmt: skip
VIEW = NodeView(
    node="rabbit@host-1",
    version="3.10.8",
    alarms=("memory",),
    status=ManagementStatus.OK,
    detail=None,
    stats=STATS,
    poll_time=1700000000.0,
    stats_time=1700000000.0,
)


def _samples(proxy: Supervisor) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(render(registry_for(proxy))[0].decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_backend_view_has_a_rabbitmq_section() -> None:
    proxy = _proxy()
    b = proxy.services["amqp"].pool.by_name["rabbit1"]
    b.rabbitmq = VIEW
    view = backend_view(b)
    r = view["rabbitmq"]
    assert r["node"] == "rabbit@host-1" and r["version"] == "3.10.8"
    assert r["alarms"] == ["memory"] and r["maintenance"] is False
    assert r["management"] == {"status": "ok", "detail": None}
    assert r["fd"] == {"used": 40, "total": 1024}
    assert r["memory"] == {"used": 1 << 27, "limit": 1 << 30}
    assert r["processes"]["total"] == 1 << 20 and r["sockets"]["used"] == 3
    assert r["poll_time"] == 1700000000.0
    assert view["effective_weight"] == 50
    assert view["slow_start"] is None
    assert service_view(proxy.services["amqp"])["rabbitmq"] is True


def test_without_rabbitmq_the_section_is_null_and_no_rabbitmq_metric_is_reported() -> None:
    proxy = _proxy(rabbitmq=False)
    assert backend_view(proxy.services["amqp"].pool.backends[0])["rabbitmq"] is None
    assert not [name for name, _ in _samples(proxy) if "rabbitmq" in name]


def test_metrics_for_alarm_maintenance_management_and_figures_with_fixed_labels_only() -> None:
    proxy = _proxy()
    r1, r2 = proxy.services["amqp"].pool.backends
    r1.rabbitmq = VIEW
    r2.rabbitmq = replace(
        VIEW,
        node='rabbit@host-2 {evil="label"}',
        alarms=(),
        maintenance=True,
        maintenance_detail="a node's own words",
        status=ManagementStatus.UNREACHABLE,
        detail="GET /api/overview: refused",
    )
    got = _samples(proxy)
    sb1 = (("backend", "rabbit1"), ("service", "amqp"))
    sb2 = (("backend", "rabbit2"), ("service", "amqp"))
    assert (
        got[("rabbitproxy_backend_rabbitmq_alarm", (("backend", "rabbit1"), ("kind", "memory"), ("service", "amqp")))]
        == 1
    )
    assert (
        got[("rabbitproxy_backend_rabbitmq_alarm", (("backend", "rabbit1"), ("kind", "disk"), ("service", "amqp")))]
        == 0
    )
    assert (
        got[("rabbitproxy_backend_rabbitmq_alarm", (("backend", "rabbit2"), ("kind", "memory"), ("service", "amqp")))]
        == 0
    )
    assert got[("rabbitproxy_backend_rabbitmq_maintenance", sb1)] == 0
    assert got[("rabbitproxy_backend_rabbitmq_maintenance", sb2)] == 1
    assert got[("rabbitproxy_backend_rabbitmq_management_up", sb1)] == 1
    assert got[("rabbitproxy_backend_rabbitmq_management_up", sb2)] == 0
    assert got[("rabbitproxy_backend_status", (*sb2, ("status", "maintenance")))] == 1
    assert got[("rabbitproxy_backend_rabbitmq_fds_used", sb1)] == 40
    assert got[("rabbitproxy_backend_rabbitmq_fds_limit", sb1)] == 1024
    assert got[("rabbitproxy_backend_rabbitmq_sockets_limit", sb1)] == 900
    assert got[("rabbitproxy_backend_rabbitmq_memory_used_bytes", sb1)] == 1 << 27
    assert got[("rabbitproxy_backend_rabbitmq_memory_limit_bytes", sb1)] == 1 << 30
    assert got[("rabbitproxy_backend_rabbitmq_processes_used", sb1)] == 400
    # The node's name and the broker's words are never label values.
    for name, labels in got:
        if name.startswith("rabbitproxy_backend_rabbitmq"):
            for label, value in labels:
                assert label in {"service", "backend", "kind"}
                assert value in {"amqp", "rabbit1", "rabbit2", "memory", "disk"}


def test_no_management_up_sample_before_the_first_poll() -> None:
    proxy = _proxy()
    got = _samples(proxy)
    assert not [k for k in got if k[0] == "rabbitproxy_backend_rabbitmq_management_up"]
    assert got[("rabbitproxy_backend_rabbitmq_maintenance", (("backend", "rabbit1"), ("service", "amqp")))] == 0


def test_status_command_shows_node_alarm_maintenance_and_api_trouble(capsys: pytest.CaptureFixture[str]) -> None:
    proxy = _proxy()
    r1, r2 = proxy.services["amqp"].pool.backends
    r1.rabbitmq = VIEW
    r2.rabbitmq = replace(
        VIEW, alarms=(), maintenance=True, status=ManagementStatus.UNREACHABLE, detail="refused [bold]x[/bold]"
    )
    data = {"state": "running", "services": [service_view(proxy.services["amqp"])]}
    print_status(data)
    out = capsys.readouterr().out
    assert "rabbitmq" in out
    assert "MEMORY ALARM" in out and "MAINTENANCE" in out and "maintenance" in out
    # The broker's text is printed as it is, never interpreted as markup.
    assert "[bold]x[/bold]" in out
    assert rabbitmq_text(None) == "-"
    assert rabbitmq_text(backend_view(r1)["rabbitmq"]).startswith("rabbit@host-1 3.10.8 MEMORY ALARM fd 40/1024")

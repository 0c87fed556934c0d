"""Pure parts of the admin API: token rules, PATCH validation, the JSON views and the metrics collector."""

from __future__ import annotations

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.admin.access import admin_token, is_loopback
from rabbitproxy.admin.metrics import registry_for, render
from rabbitproxy.admin.routes.services import validate_patch
from rabbitproxy.admin.views import backend_view, service_view
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import AdminConfig, ConfigError
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.relay.service import Service
from tests.support.fakes import FakeConn
from tests.support.metrics import metric
from tests.support.proxy import proxy_config, service_config


def _config() -> config_mod.Config:
    backends = [
        {"name": "rabbit1", "address": "10.0.0.1", "port": 5672, "weight": 100},
        {"name": "rabbit2", "address": "10.0.0.2", "port": 5672, "weight": 50},
    ]
    return config_mod.validate(proxy_config(service_config(backends, listen="127.0.0.1:5673")))


def _proxy() -> Supervisor:
    cfg = _config()
    proxy = Supervisor(cfg)
    proxy.services["amqp"] = Service(cfg.services[0])
    return proxy


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "admin.example.com", "192.168.0.1"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_token_is_optional_on_loopback() -> None:
    assert admin_token(AdminConfig(listen="127.0.0.1:9080"), env={}) is None


def test_token_is_required_off_loopback_and_the_error_names_the_key() -> None:
    with pytest.raises(ConfigError) as exc:
        admin_token(AdminConfig(listen="0.0.0.0:9080"), env={})
    assert exc.value.errors[0].startswith("admin.token: required")
    assert "RABBITPROXY_ADMIN_TOKEN" in exc.value.errors[0]


def test_token_from_config_wins_over_the_environment() -> None:
    cfg = AdminConfig(listen="0.0.0.0:9080", token="from-file")
    assert admin_token(cfg, env={"RABBITPROXY_ADMIN_TOKEN": "from-env"}) == "from-file"
    assert admin_token(AdminConfig(listen="0.0.0.0:9080"), env={"RABBITPROXY_ADMIN_TOKEN": "from-env"}) == "from-env"


def test_empty_environment_token_counts_as_none() -> None:
    with pytest.raises(ConfigError):
        admin_token(AdminConfig(listen="[::]:9080"), env={"RABBITPROXY_ADMIN_TOKEN": ""})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"state": "drain"}, ("drain", None)),
        ({"state": "maint", "weight": 0}, ("maint", 0)),
        ({"weight": 1000}, (None, 1000)),
    ],
)
def test_valid_patch_bodies(body: object, expected: tuple[str | None, int | None]) -> None:
    patch, errors = validate_patch(body)
    assert errors == []
    assert (patch.state, patch.weight) == expected


def test_a_drain_patch_carries_its_deadline_and_force() -> None:
    patch, errors = validate_patch({"state": "drain", "deadline": 300, "force": True})
    assert errors == []
    assert (patch.state, patch.deadline, patch.force) == ("drain", 300.0, True)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([], "JSON object"),
        ("drain", "JSON object"),
        ({}, "give state and/or weight"),
        ({"state": "down"}, "state must be one of ready, drain, maint, not 'down'"),
        ({"state": None}, "state must be one of"),
        ({"weight": -1}, "weight must be a whole number from 0 to 1000, not -1"),
        ({"weight": 1001}, "not 1001"),
        ({"weight": 2.5}, "not 2.5"),
        ({"weight": True}, "not True"),
        ({"weight": "10"}, "not '10'"),
        ({"state": "drain", "colour": "red"}, "unknown field(s): colour"),
        ({"state": "drain", "deadline": 0}, "deadline must be a number of seconds"),
        ({"state": "drain", "deadline": "5m"}, "deadline must be a number of seconds"),
        ({"state": "drain", "deadline": True}, "deadline must be a number of seconds"),
        ({"state": "maint", "deadline": 5}, "deadline goes with"),
        ({"state": "drain", "force": "yes"}, "force must be true or false"),
    ],
)
def test_invalid_patch_bodies_name_the_problem(body: object, fragment: str) -> None:
    _, errors = validate_patch(body)
    assert any(fragment in e for e in errors), errors


def test_maint_closes_connections_and_drain_keeps_them() -> None:
    backend = _proxy().services["amqp"].pool.by_name["rabbit1"]
    conns = [FakeConn(backend, 1, 1) for _ in range(3)]
    for c in conns:
        backend.opened(c)
    assert backend.set_operator_state("drain", CloseReason.BACKEND_MAINT) == 0
    assert backend.status == "drain"
    assert all(c.reasons == [] for c in conns)
    assert backend.set_operator_state("maint", CloseReason.BACKEND_MAINT) == 3
    assert [c.reasons for c in conns] == [[CloseReason.BACKEND_MAINT]] * 3
    backend.set_operator_state("ready", CloseReason.BACKEND_MAINT)
    assert backend.status == "up"


def test_set_weight_marks_the_override_and_rejects_bad_values() -> None:
    backend = _proxy().services["amqp"].pool.by_name["rabbit2"]
    backend.set_weight(7)
    assert (backend.configured_weight, backend.weight_overridden, backend.effective_weight) == (7, True, 7)
    for bad in (-1, 1001):
        with pytest.raises(ValueError, match="0 to 1000"):
            backend.set_weight(bad)
    assert backend.configured_weight == 7


def test_backend_view_adds_live_bytes_to_finished_traffic() -> None:
    backend = _proxy().services["amqp"].pool.by_name["rabbit1"]
    backend.traffic_in, backend.traffic_out = 1000, 2000
    backend.opened(FakeConn(backend, 10, 20))
    backend.opened(FakeConn(backend, 1, 2))
    view = backend_view(backend)
    assert view["bytes"] == {"in": 1011, "out": 2022}
    assert view["connections"] == {"active": 2, "total": 2, "connect_errors": 0}
    assert (view["name"], view["address"], view["port"], view["status"]) == ("rabbit1", "10.0.0.1", 5672, "up")


def test_service_view_lists_every_backend_in_config_order() -> None:
    view = service_view(_proxy().services["amqp"])
    assert [b["name"] for b in view["backends"]] == ["rabbit1", "rabbit2"]
    assert [b["weight"] for b in view["backends"]] == [100, 50]
    assert view["listen"] == "127.0.0.1:5673"


def test_reload_keeps_live_connections_counted_on_the_new_backend_object() -> None:
    # After a reload the surviving backend is a new object; connections opened before must close against it,
    # or their bytes would vanish from the API and the metrics.
    old = _proxy().services["amqp"].pool.by_name["rabbit1"]
    conn = FakeConn(old, 5, 6)
    old.opened(conn)
    new = Backend(old.config, old.port, healthy=True)
    new.adopt_runtime_state(old)
    assert conn.backend is new
    new.closed(conn, 5, 6)
    assert (new.active, new.traffic_in, new.traffic_out) == (0, 5, 6)


def test_metrics_read_live_state() -> None:
    proxy = _proxy()
    service = proxy.services["amqp"]
    r1 = service.pool.by_name["rabbit1"]
    r2 = service.pool.by_name["rabbit2"]
    r1.opened(FakeConn(r1, 100, 200))
    r1.traffic_in = 5
    r2.set_operator_state("drain", CloseReason.BACKEND_MAINT)
    r2.set_weight(20)
    r2.agent_percent = 50
    service.ended["connect failed"] = 4
    body, content_type = render(registry_for(proxy))
    assert content_type.startswith("text/plain")
    text = body.decode()

    def value(name: str, **labels: str) -> float:
        return metric(text, f"rabbitproxy_{name}", **labels)

    assert value("backend_up", service="amqp", backend="rabbit1") == 1
    assert value("backend_active_connections", service="amqp", backend="rabbit1") == 1
    assert value("backend_connections_total", service="amqp", backend="rabbit1") == 1
    assert value("backend_bytes_in_total", service="amqp", backend="rabbit1") == 105
    assert value("backend_bytes_out_total", service="amqp", backend="rabbit1") == 200
    assert value("backend_status", service="amqp", backend="rabbit2", status="drain") == 1
    assert value("backend_status", service="amqp", backend="rabbit2", status="up") == 0
    assert value("backend_weight", service="amqp", backend="rabbit2") == 20
    assert value("backend_effective_weight", service="amqp", backend="rabbit2") == 10
    assert value("backend_agent_percent", service="amqp", backend="rabbit2") == 50
    assert value("service_connections_ended_total", service="amqp", reason="connect failed") == 4
    assert value("service_connections_ended_total", service="amqp", reason="backend maint") == 0
    assert value("service_usable_backends", service="amqp") == 1
    assert value("service_max_connections", service="amqp") == service.config.max_connections


def test_metrics_forget_a_removed_service() -> None:
    proxy = _proxy()
    registry = registry_for(proxy)
    assert b'service="amqp"' in render(registry)[0]
    del proxy.services["amqp"]
    assert b'service="amqp"' not in render(registry)[0]

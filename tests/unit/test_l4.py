"""``mode = "l4-nat"`` without a kernel: what check-config refuses, the rendered nft JSON, and the programmer's
decisions (when it runs a transaction, when it deletes flows) against a recording stand-in for ``nft``."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.pool import Pool
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.views import NodeView
from rabbitproxy.config import ConfigError
from rabbitproxy.control.l4 import L4Nat, NftError
from rabbitproxy.control.l4_rules import L4Backend, L4Service, objects_of, render
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.relay.service import Service

BACKENDS = [
    {"name": "a", "address": "10.0.0.2", "port": 5672, "weight": 100},
    {"name": "b", "address": "10.0.0.3", "port": 5672, "weight": 300},
]


def l4_data(**service: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {"name": "l4", "mode": "l4-nat", "listen": "10.0.0.1:5672", "backends": BACKENDS}
    svc.update(service)
    return {"services": [svc]}


def refusal(**service: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config_mod.validate(l4_data(**service))
    return "\n".join(info.value.errors)


def test_a_plain_l4_service_is_accepted_and_l7_stays_the_default() -> None:
    cfg = config_mod.validate(l4_data())
    assert cfg.services[0].mode == "l4-nat"
    assert cfg.nft_table == "rabbitproxy"
    assert config_mod.validate({"services": [{"name": "x", "backends": BACKENDS}]}).services[0].mode == "l7"


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"backend_tls": True}, "backend_tls"),
        ({"send_proxy_protocol": "v1"}, "send_proxy_protocol"),
        ({"accept_proxy_protocol": True, "proxy_protocol_from": ["10.0.0.0/8"]}, "accept_proxy_protocol"),
        ({"protocol": "amqp"}, 'protocol = "amqp"'),
        ({"client_idle_timeout": 30}, "client_idle_timeout"),
        ({"client_hello_timeout": 5}, "client_hello_timeout"),
        ({"source_address": "client"}, "source_address"),
        ({"max_connections": 10}, "max_connections"),
        ({"balance": "least-connections"}, 'balance = "least-connections"'),
        ({"listen": "[::1]:5672"}, "listen"),
        ({"backends": [{"name": "h", "address": "rabbit1.example"}]}, "backends['h'].address"),
        ({"backends": [{"name": "m", "address": "10.0.0.2", "max_connections": 5}]}, "backends['m'].max_connections"),
        ({"connect_rate": 100}, "connect_rate"),
        ({"backends": [{"name": "r", "address": "10.0.0.2", "connect_rate": 5}]}, "backends['r'].connect_rate"),
    ],
)
def test_check_config_refuses_what_cannot_apply_naming_the_key(setting: dict[str, Any], key: str) -> None:
    message = refusal(**setting)
    assert f'{key} cannot apply with mode = "l4-nat"' in message, message
    assert message.startswith("services['l4']")


def service(**extra: Any) -> Service:
    cfg = config_mod.validate(l4_data(health_check={"type": "none", **extra.pop("health_check", {})}, **extra))
    return Service(cfg.services[0])


def two() -> tuple[L4Backend, L4Backend]:
    return L4Backend("s", "a", "10.0.0.2", 5672), L4Backend("s", "b", "10.0.0.3", 5673)


def commands(payload: dict[str, Any], verb: str, kind: str) -> list[dict[str, Any]]:
    return [c[verb][kind] for c in payload["nftables"] if verb in c and kind in c[verb]]


def test_weights_become_consecutive_ranges_of_one_numgen_draw() -> None:
    a, b = two()
    s = L4Service("s", "10.0.0.1", 5672, False, (a, b), ((a.key, 1), (b.key, 3)))
    rules = commands(render("t", [s], fresh=False), "add", "rule")
    vmap = next(r["expr"][0]["vmap"] for r in rules if r["expr"][0].get("vmap"))
    assert vmap["key"] == {"numgen": {"mode": "random", "mod": 4, "offset": 0}}
    assert vmap["data"]["set"] == [
        [0, {"goto": {"target": f"be_{a.key}"}}],
        [{"range": [1, 3]}, {"goto": {"target": f"be_{b.key}"}}],
    ]
    dnat = [e["dnat"] for r in rules for e in r["expr"] if "dnat" in e]
    assert dnat == [{"addr": "10.0.0.2", "port": 5672}, {"addr": "10.0.0.3", "port": 5673}]


def test_source_hash_uses_a_fixed_seed_and_one_target_is_a_plain_goto() -> None:
    a, b = two()
    hashed = L4Service("s", None, 5672, True, (a, b), ((a.key, 1), (b.key, 1)))
    rules = commands(render("t", [hashed], fresh=False), "add", "rule")
    key = next(r["expr"][0]["vmap"]["key"] for r in rules if r["expr"][0].get("vmap"))
    assert key["jhash"]["seed"] == 0 and key["jhash"]["expr"] == {"payload": {"protocol": "ip", "field": "saddr"}}
    # listen = "0.0.0.0:...": only flows to this host's own addresses, never flows it merely routes.
    entry = next(r["expr"] for r in rules if r["chain"] == "prerouting")
    local = {"fib": {"result": "type", "flags": ["daddr"]}}
    assert entry[0] == {"match": {"op": "==", "left": local, "right": "local"}}
    single = L4Service("s", None, 5672, False, (a, b), ((b.key, 7),))
    rules = commands(render("t", [single], fresh=False), "add", "rule")
    assert {"goto": {"target": f"be_{b.key}"}} in [r["expr"][0] for r in rules]


def test_no_usable_backend_leaves_no_entry_rule_and_counters_stay() -> None:
    a, b = two()
    payload = render("t", [L4Service("s", "10.0.0.1", 5672, False, (a, b))], fresh=False)
    chains = {r["chain"] for r in commands(payload, "add", "rule")}
    assert "prerouting" not in chains and "output" not in chains
    assert len(commands(payload, "add", "counter")) == 6


def test_fresh_replaces_the_table_and_a_later_render_flushes_it_and_deletes_what_went() -> None:
    a, b = two()
    both = [L4Service("s", None, 5672, False, (a, b), ((a.key, 1),))]
    fresh = render("t", both, fresh=True)
    assert [next(iter(c)) for c in fresh["nftables"][:3]] == ["add", "delete", "add"]
    only_a = [L4Service("s", None, 5672, False, (a,), ((a.key, 1),))]
    later = render("t", only_a, fresh=False, before=objects_of(both))
    assert later["nftables"][1] == {"flush": {"table": {"family": "ip", "name": "t"}}}
    assert [c["name"] for c in commands(later, "delete", "chain")] == [f"be_{b.key}"]
    assert sorted(c["name"] for c in commands(later, "delete", "counter")) == sorted(
        f"{p}_{b.key}" for p in ("i", "n", "o")
    )


class Recorder:
    """Stands in for ``nft`` and ``conntrack``: records each transaction and each flow deletion."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.flushed: list[tuple[str | None, int, str, int]] = []
        self.fail = False

    def nft(self, payload: dict[str, Any]) -> str:
        if self.fail:
            raise NftError("Error: Could not process rule: Operation not permitted")
        self.payloads.append(payload)
        return '{"nftables": []}'

    def flush(self, vip: str | None, port: int, address: str, backend_port: int) -> int:
        self.flushed.append((vip, port, address, backend_port))
        return 2


def programmer(*services: Service) -> tuple[L4Nat, Recorder]:
    rec = Recorder()
    return L4Nat("t", {s.name: s for s in services}, nft=rec.nft, flush=rec.flush), rec


def test_without_an_l4_service_nft_is_never_run() -> None:
    l7 = Service(config_mod.validate({"services": [{"name": "x", "backends": BACKENDS}]}).services[0])
    l4, rec = programmer(l7)
    assert not l4.wanted()
    assert l4.sync() is False
    l4.remove()
    assert rec.payloads == []


def test_one_transaction_per_change_and_none_without_one() -> None:
    svc = service()
    l4, rec = programmer(svc)
    assert l4.sync() is True
    assert l4.sync() is False
    svc.pool.by_name["a"].set_weight(50)
    svc.pool.by_name["b"].set_operator_state("drain", CloseReason.BACKEND_MAINT)
    assert l4.sync() is True
    assert l4.sync() is False
    assert len(rec.payloads) == 2 and l4.transactions == 2
    assert next(iter(rec.payloads[0]["nftables"][1])) == "delete"  # the first one replaces the table
    assert l4.applied is not None and l4.applied[0].targets == ((l4.applied[0].backends[0].key, 50),)


def test_a_refused_transaction_is_tried_again_and_keeps_nothing_half_applied() -> None:
    svc = service()
    l4, rec = programmer(svc)
    rec.fail = True
    with pytest.raises(NftError):
        l4.sync()
    assert not l4.engaged
    rec.fail = False
    assert l4.sync() is True


@pytest.mark.parametrize(("on_marked_down", "cut"), [("close", True), ("keep", False)])
def test_flows_of_a_backend_marked_down_are_deleted_only_with_close(on_marked_down: str, cut: bool) -> None:
    svc = service(health_check={"on_marked_down": on_marked_down})
    l4, rec = programmer(svc)
    l4.sync()
    b = svc.pool.by_name["b"]
    b.mark_health(False, "refused", 0.0)
    l4.sync()
    l4.sync()
    assert rec.flushed == ([("10.0.0.1", 5672, "10.0.0.3", 5672)] if cut else [])
    # The table without b was applied before its flows were cut.
    assert l4.applied is not None and [k for k, _ in l4.applied[0].targets] == [l4.applied[0].backends[0].key]


def test_maint_cuts_flows_and_drain_keeps_them() -> None:
    svc = service()
    l4, rec = programmer(svc)
    l4.sync()
    svc.pool.by_name["a"].set_operator_state("drain", CloseReason.BACKEND_MAINT)
    l4.sync()
    assert rec.flushed == []
    svc.pool.by_name["b"].set_operator_state("maint", CloseReason.BACKEND_MAINT)
    l4.sync()
    assert rec.flushed == [("10.0.0.1", 5672, "10.0.0.3", 5672)]


def test_pool_weighted_offers_backups_only_when_no_regular_backend_is_usable() -> None:
    cfg = config_mod.validate(
        {"services": [{"name": "x", "health_check": {"type": "none"}, "backends": [
            {"name": "r", "address": "10.0.0.2", "weight": 10},
            {"name": "k", "address": "10.0.0.3", "weight": 20, "backup": True},
        ]}]}
    ).services[0]  # fmt: skip
    pool = Pool([Backend.for_service(cfg, bc, healthy=True) for bc in cfg.backends], cfg.balance)
    assert [(b.name, w) for b, w in pool.weighted()] == [("r", 10)]
    pool.by_name["r"].set_operator_state("drain", CloseReason.BACKEND_MAINT)
    assert [(b.name, w) for b, w in pool.weighted()] == [("k", 20)]


def test_a_reload_cannot_change_a_services_mode_or_the_table() -> None:
    running = config_mod.validate(l4_data(health_check={"type": "none"}))
    sup = Supervisor(running)
    sup.services["l4"] = Service(running.services[0])
    as_l7 = config_mod.validate(
        {"nft_table": "other", "services": [{"name": "l4", "listen": "10.0.0.1:5672", "backends": BACKENDS}]}
    )
    with pytest.raises(ConfigError) as info:
        sup._refuse_l4_changes(as_l7)
    assert info.value.errors[0].startswith("services['l4'].mode: cannot change by reload (running 'l4-nat'")
    assert info.value.errors[1].startswith("nft_table: cannot change by reload")
    sup._refuse_l4_changes(running)


def test_the_node_monitor_steers_the_table_maintenance_removes_and_an_alarm_lowers() -> None:
    svc = service(rabbitmq={"alarm_weight": 10})
    l4, rec = programmer(svc)
    l4.sync()
    a, b = svc.pool.by_name["a"], svc.pool.by_name["b"]
    assert a.rabbitmq is not None and b.rabbitmq is not None
    a.rabbitmq = NodeView(alarms=("memory",))
    b.rabbitmq = NodeView(maintenance=True)
    assert l4.sync() is True
    assert l4.applied is not None
    assert l4.applied[0].targets == ((l4.applied[0].backends[0].key, 10),)
    # RabbitMQ's maintenance mode closes the node's own client connections; the table only stops new flows.
    assert rec.flushed == []


def test_a_drain_deadline_cuts_the_flows_of_a_backend_still_draining() -> None:
    svc = service()
    l4, rec = programmer(svc)
    l4.sync()
    l4.cut_now("l4", "a")
    assert rec.flushed == []  # still ready: the deadline was cancelled by a later state
    svc.pool.by_name["a"].set_operator_state("drain", CloseReason.BACKEND_MAINT)
    l4.cut_now("l4", "a")
    l4.cut_now("l4", "nonesuch")
    l4.cut_now("other", "a")
    assert rec.flushed == [("10.0.0.1", 5672, "10.0.0.2", 5672)]


def test_several_refusals_are_one_error_each() -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.validate(l4_data(protocol="amqp", client_idle_timeout=30))
    assert [e.split(" cannot apply")[0] for e in info.value.errors] == [
        "services['l4']: client_idle_timeout",
        "services['l4']: protocol = \"amqp\"",
    ]

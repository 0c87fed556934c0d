"""``rabbitproxy convert-haproxy``: each HAProxy setting the issue names, carried over or reported with file:line."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.migrate.convert import convert
from rabbitproxy.migrate.haproxy import HAProxySyntaxError, parse_time, split_address, split_words
from tests.support.haproxy_configs import HAND_WEIGHTS, LBO_LAYER7, LBO_TWO_VIPS, bench_configs, hand_configs


def converted(text: str, source: str = "haproxy.cfg") -> tuple[dict[str, Any], list[str]]:
    result = convert(text, source)
    data = tomllib.loads(result.toml)
    # Whatever it writes is a configuration serve accepts.
    config_mod.validate(data, "converted")
    return data, result.warnings


def lines_warned(warnings: list[str], source: str = "haproxy.cfg") -> set[int]:
    return {int(w.split(":")[1]) for w in warnings if w.startswith(f"{source}:")}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[str]]:
    return converted(hand_configs(tmp_path_factory.mktemp("pem"))["full"])


def test_words_quotes_escapes_and_comments() -> None:
    assert split_words("  server a 10.0.0.1:5672  # comment") == ["server", "a", "10.0.0.1:5672"]
    assert split_words("option httpchk \"GET /a b\" 'x # y' c\\ d") == ["option", "httpchk", "GET /a b", "x # y", "c d"]
    with pytest.raises(HAProxySyntaxError):
        split_words('bind "unterminated')


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1500", 1.5), ("500000us", 0.5), ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("3h", 10800.0), ("1d", 86400.0)],
)
def test_haproxy_time_units(text: str, seconds: float) -> None:
    assert parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5x", "s", "1.5s", "-1s"])
def test_a_bad_time_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="HAProxy time"):
        parse_time(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:5672", ("10.0.0.1", "5672")),
        ("rabbit1", ("rabbit1", "")),
        (":5672", ("", "5672")),
        ("*:5672", ("*", "5672")),
        (":::5672", ("::", "5672")),
        ("[fd00::4]:5672", ("fd00::4", "5672")),
        ("ipv6@fd00::4:5672", ("fd00::4", "5672")),
        ("ipv4@10.0.0.1:5672", ("10.0.0.1", "5672")),
        ("10.0.0.1:5672-5680", ("10.0.0.1", "5672-5680")),
    ],
)
def test_addresses_split_as_haproxy_splits_them(text: str, expected: tuple[str, str]) -> None:
    assert split_address(text) == expected


def test_listen_with_defaults_servers_checks_agent_and_proxy_protocol(full: tuple[dict[str, Any], list[str]]) -> None:
    data, _ = full
    assert data["workers"] == 2  # nbthread 2
    amqp = data["services"][0]
    assert (amqp["name"], amqp["listen"], amqp["balance"]) == ("amqp", "0.0.0.0:5672", "source-hash")
    # timeout connect 1500ms, retries 1 (defaults), maxconn 3000 (listen), hard-stop-after 2m (global)
    assert (amqp["connect_timeout"], amqp["retries"], amqp["max_connections"]) == (1.5, 1, 3000)
    assert amqp["shutdown_timeout"] == 120.0
    # default-server inter 3s fall 4 rise 1 (defaults) + check (listen); timeout check 500000us
    assert amqp["health_check"] == {
        "type": "tcp",
        "interval": 3.0,
        "fall": 4,
        "rise": 1,
        "timeout": 0.5,
        "on_marked_down": "keep",
    }
    assert amqp["feedback"] == {"type": "agent", "interval": 10.0, "port": 3333, "timeout": 0.5}
    backends = {b["name"]: b for b in amqp["backends"]}
    assert backends["r1"] == {"name": "r1", "address": "10.1.0.1", "port": 5672, "send_proxy_protocol": "v1"}
    # weight 3 of HAProxy's default 1 is 300 of our default 100; send-proxy-v2 overrides the default-server's v1.
    assert backends["r2"] == {
        "name": "r2",
        "address": "10.1.0.2",
        "port": 5672,
        "weight": 300,
        "max_connections": 100,
        "send_proxy_protocol": "v2",
    }
    assert backends["r3"] == {"name": "r3", "address": "10.1.0.3", "port": 5672, "backup": True}
    assert (backends["r4"]["address"], backends["r4"]["weight"]) == ("fd00::4", 0)


def test_frontend_with_its_default_backend(full: tuple[dict[str, Any], list[str]]) -> None:
    data, _ = full
    amqps = data["services"][1]
    assert (amqps["name"], amqps["listen"], amqps["balance"]) == ("amqps", "10.1.0.100:5671", "weighted-round-robin")
    assert amqps["tls"]["cert"] == amqps["tls"]["key"] and amqps["tls"]["cert"].endswith("amqps.pem")
    # The backend's own timeout connect 2s wins over the defaults' 1500ms.
    assert amqps["connect_timeout"] == 2.0
    assert amqps["health_check"]["type"] == "http"
    assert amqps["health_check"]["url"] == "http://{address}:{port}/api/health/checks/local-alarms"
    assert amqps["health_check"]["interval"] == 86400.0  # inter 1d
    assert [b["check_port"] for b in amqps["backends"]] == [15672, 15672]
    assert len(data["services"]) == 2  # listen web (mode http) and backend orphan are not services


def test_every_directive_that_does_not_carry_over_is_named_with_its_line(
    full: tuple[dict[str, Any], list[str]],
) -> None:
    _, warnings = full
    by_line = {int(w.split(":")[1]): w for w in warnings}
    expected = {
        4: "log stdout",  # global log
        11: "timeout client",
        12: "timeout server",
        19: "bind :::5672 v4v6: a service listens on one address",
        27: "stick-table",
        28: "stick on src",
        30: "listen web: mode http",
        36: "alpn amqp",
        40: "balance first",
        44: "fastinter 1s",
        46: "backend orphan",
    }
    for line, text in expected.items():
        assert text in by_line.get(line, ""), (line, warnings)
    assert all(w.startswith("haproxy.cfg:") for w in warnings)


def test_large_weights_are_kept_as_they_are(tmp_path: Path) -> None:
    data, warnings = converted(HAND_WEIGHTS)
    service = data["services"][0]
    # Past 10, HAProxy's weights are written as they are (its largest, 256, is within ours): the ratios stay.
    assert [b.get("weight", 100) for b in service["backends"]] == [256, 10, 1]
    assert service["connect_timeout"] == 60.0  # timeout connect 1m
    assert service["health_check"] == {"type": "none"}
    assert any("balance static-rr" in w for w in warnings)
    assert any(':7: listen big: no server has "check"' in w for w in warnings)


@pytest.mark.parametrize(
    ("algorithm", "expected", "warned"),
    [
        ("roundrobin", "weighted-round-robin", False),
        ("static-rr", "weighted-round-robin", True),
        ("leastconn", "least-connections", False),
        ("source", "source-hash", False),
        ("first", "weighted-round-robin", True),
        ("random", "weighted-round-robin", True),
    ],
)
def test_balance_algorithms(algorithm: str, expected: str, warned: bool) -> None:
    text = f"listen a\n    bind :5672\n    balance {algorithm}\n    server s 10.0.0.1:5672\n"
    data, warnings = converted(text)
    assert data["services"][0]["balance"] == expected
    assert (3 in lines_warned(warnings)) is warned


def test_the_loadbalancer_org_layer7_vip() -> None:
    data, warnings = converted(LBO_LAYER7)
    service = data["services"][0]
    assert (service["name"], service["listen"], service["balance"]) == (
        "RabbitMQ_HA",
        "192.168.2.5:5672",
        "least-connections",
    )
    # "transparent": the VIP may be bound before keepalived brings it up on this host.
    assert service["freebind"] is True
    # The Real Server Port is left blank in the guide: the backends use the service's port, as HAProxy does.
    assert [b["address"] for b in service["backends"]] == ["192.168.2.10", "192.168.2.11", "192.168.2.12"]
    assert all("port" not in b and "weight" not in b for b in service["backends"])
    assert service["feedback"] == {"type": "agent", "interval": 6.0, "port": 3333}
    assert service["health_check"]["interval"] == 4.0
    assert (service["health_check"]["fall"], service["health_check"]["rise"]) == (2, 2)
    assert any("option abortonclose" in w for w in warnings)


def test_the_stats_page_and_a_frontend_backend_pair() -> None:
    data, warnings = converted(LBO_TWO_VIPS)
    assert [s["name"] for s in data["services"]] == ["RabbitMQ_TLS"]
    service = data["services"][0]
    assert (service["listen"], service["max_connections"], service["retries"]) == ("192.168.2.6:5671", 20000, 3)
    assert service["health_check"]["on_marked_down"] == "close"  # on-marked-down shutdown-sessions
    assert [b.get("backup", False) for b in service["backends"]] == [False, False, True]
    assert any(":11: listen stats: a stats page" in w for w in warnings)
    assert any(":2: stats socket" in w for w in warnings)


def test_the_bench_configurations_convert_to_what_the_bench_runs_us_with(tmp_path: Path) -> None:
    configs = bench_configs(tmp_path)
    data, _ = converted(configs["bench"])
    assert [(s["name"], s["listen"]) for s in data["services"]] == [
        ("amqp", "127.0.0.1:15672"),
        ("echo", "127.0.0.1:15673"),
    ]
    assert [(b["address"], b["port"]) for b in data["services"][0]["backends"]] == [
        ("127.0.0.1", 5001),
        ("127.0.0.1", 5002),
    ]
    faults, _ = converted(configs["faults"])
    service = faults["services"][0]
    assert service["balance"] == "least-connections"
    assert (service["health_check"]["fall"], service["health_check"]["rise"]) == (2, 2)
    assert service["health_check"]["on_marked_down"] == "close"
    assert service["feedback"]["type"] == "agent"
    assert [b["agent_port"] for b in service["backends"]] == [7001, 7002]


def test_nothing_to_convert_gives_no_toml() -> None:
    result = convert("global\n    daemon\n\nlisten web\n    mode http\n    bind :80\n", "x.cfg")
    assert (result.toml, result.services) == ("", 0)
    assert "x.cfg:4: listen web: mode http" in "\n".join(result.warnings)


def _cli(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from rabbitproxy.cli import app

    result = CliRunner().invoke(app, ["convert-haproxy", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_prints_the_toml_and_the_warnings_apart(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(LBO_LAYER7)
    code, out, err = _cli(str(cfg))
    assert code == 0, err
    assert tomllib.loads(out)["services"][0]["name"] == "RabbitMQ_HA"
    assert f"{cfg}:15: option abortonclose" in err
    target = tmp_path / "rabbitproxy.toml"
    code, out, _ = _cli(str(cfg), "--output", str(target))
    assert (code, out) == (0, "")
    config_mod.load(target)


def test_cli_refuses_what_it_cannot_read_or_convert(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    data = b"listen a # caf\xe9\n"
    cfg.write_bytes(data)
    assert _cli(str(cfg))[0::2] == (2, f"{cfg}: not UTF-8 at byte {data.index(0xE9)}\n")
    cfg.write_text("listen web\n    mode http\n    bind :80\n")
    code, _, err = _cli(str(cfg))
    assert code == 2 and "no TCP-mode listen or frontend+backend section to convert" in err
    assert _cli(str(tmp_path / "missing.cfg"))[0] == 2


def test_cli_a_result_that_does_not_validate_is_written_and_named(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("listen a\n    bind :5672\n    timeout connect 0\n    server s 10.0.0.1:5672\n")
    code, out, err = _cli(str(cfg))
    assert code == 2
    assert "connect_timeout = 0.0" in out
    assert "services['a'].connect_timeout: must be more than 0 seconds" in err


def test_an_ipv6_wildcard_bind_and_its_v4v6_flag() -> None:
    data, warnings = converted("listen a\n    bind :::5672 v4v6\n    server s 10.0.0.1:5672\n")
    assert data["services"][0]["listen"] == "[::]:5672"
    assert any(":2: bind ... v4v6: an IPv6 listener takes IPv6 only" in w for w in warnings)


def test_servers_that_disagree_on_checks_are_named() -> None:
    text = (
        "listen a\n    bind :5672\n"
        "    server s1 10.0.0.1:5672 check inter 2s\n"
        "    server s2 10.0.0.2:5672 check inter 5s\n"
        "    server s3 10.0.0.3:5672\n"
    )
    data, warnings = converted(text)
    # The first checked server's timing is taken; the others are named with their lines.
    assert data["services"][0]["health_check"]["interval"] == 2.0
    assert any(":4: s2: its check timing (inter, fall, rise) differs" in w for w in warnings)
    assert any(":5: s3: no check while others have one" in w for w in warnings)

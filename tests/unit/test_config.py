"""Configuration validation: every error names the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.config import ConfigError

GOOD = """
[admin]
listen = "127.0.0.1:9080"

[log]
format = "json"
level = "info"

[[services]]
name = "amqp"
listen = "0.0.0.0:5672"
balance = "least-connections"

  [[services.backends]]
  name = "rabbit1"
  address = "10.0.0.10"
  weight = 200

  [[services.backends]]
  name = "rabbit2"
  address = "10.0.0.11"
  port = 5673

[[services]]
name = "amqps"
listen = "[::]:5671"

  [[services.backends]]
  name = "rabbit1"
  address = "10.0.0.10"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rabbitproxy.toml"
    p.write_text(text)
    return p


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.load(write(tmp_path, text))
    return info.value.errors


def test_good_file_loads_with_defaults_and_port_inheritance(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, GOOD))
    amqp = cfg.service("amqp")
    assert amqp.balance == "least-connections"
    assert amqp.connect_timeout == 5.0 and amqp.retries == 2 and amqp.max_connections == 10000
    assert [amqp.backend_port(b) for b in amqp.backends] == [5672, 5673]  # port translation for rabbit2
    amqps = cfg.service("amqps")
    assert (amqps.listen_host, amqps.listen_port) == ("::", 5671)
    assert amqps.backend_port(amqps.backends[0]) == 5671
    assert cfg.log.format == "json"


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ('balance = "random"', "services['amqp'].balance: must be one of 'weighted-round-robin', "),
        ("retries = -1", "services['amqp'].retries: must be at least 0, not -1"),
        ("connect_timeout = 0", "services['amqp'].connect_timeout: must be more than 0 seconds"),
        ("backlog = 0", "services['amqp'].backlog: must be at least 1, not 0"),
        ('source_address = "not-an-ip"', "services['amqp'].source_address: 'not-an-ip' is not an IP address"),
        ("colour = 3", "services['amqp'].colour: unknown key"),
        ("close_timeout = 0", "services['amqp'].close_timeout: must be more than 0 seconds"),
        ("tcp_keepalive = { idle = 0 }", "services['amqp'].tcp_keepalive.idle: must be at least 1, not 0"),
        ("tcp_keepalive = { count = 200 }", "services['amqp'].tcp_keepalive.count: must be at most 127, not 200"),
        ("tcp_keepalive = { idel = 5 }", "services['amqp'].tcp_keepalive.idel: unknown key"),
        ("tcp_keepalive = 3", "services['amqp'].tcp_keepalive: must be a table, not 3"),
    ],
)
def test_service_errors_name_the_key(tmp_path: Path, fragment: str, expected: str) -> None:
    text = GOOD.replace('balance = "least-connections"', fragment, 1)
    errors = errors_of(tmp_path, text)
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize("value", ["", "10.0.0.5", "::1", "client"])
def test_source_address_is_empty_an_ip_or_client(tmp_path: Path, value: str) -> None:
    text = GOOD.replace('balance = "least-connections"', f'source_address = "{value}"', 1)
    assert config_mod.load(write(tmp_path, text)).service("amqp").source_address == value


def test_a_misspelt_transparent_mode_says_what_is_allowed(tmp_path: Path) -> None:
    text = GOOD.replace('balance = "least-connections"', 'source_address = "clients"', 1)
    assert errors_of(tmp_path, text) == [
        "services['amqp'].source_address: 'clients' is not an IP address (or 'client' for transparent mode, or empty)"
    ]


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("", (60, 10, 6)),
        ("tcp_keepalive = true", (60, 10, 6)),
        ("tcp_keepalive = { idle = 30, count = 3 }", (30, 10, 3)),
        ("tcp_keepalive = false", None),
    ],
)
def test_close_timeout_and_tcp_keepalive(tmp_path: Path, fragment: str, expected: tuple[int, int, int] | None) -> None:
    amqp = config_mod.load(write(tmp_path, GOOD.replace('balance = "least-connections"', fragment, 1))).service("amqp")
    assert amqp.close_timeout == 10.0
    ka = amqp.tcp_keepalive
    assert (ka and (ka.idle, ka.interval, ka.count)) == expected


def test_backend_errors_name_service_and_backend(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, GOOD.replace("weight = 200", "weight = 5000"))
    assert errors == ["services['amqp'].backends['rabbit1'].weight: must be at most 1000, not 5000"]


def test_duplicate_names_and_listeners(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, GOOD.replace('name = "rabbit2"', 'name = "rabbit1"'))
    # Two entries of one name are told apart by their index.
    assert errors == ["services['amqp'].backends[1].name: 'rabbit1' is used twice"]
    errors = errors_of(tmp_path, GOOD.replace('name = "amqps"', 'name = "amqp"'))
    assert errors == ["services[1].name: service name 'amqp' is used twice"]


def test_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "[[services]\n")
    assert errors[0].startswith("TOML syntax:")
    with pytest.raises(ConfigError, match="cannot read the file"):
        config_mod.load(tmp_path / "nope.toml")


def test_unknown_top_level_key_and_no_services(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "servics = []\n")
    assert "servics: unknown key" in errors
    assert "services: required, but missing" in errors


def test_bad_listen_port_names_the_key(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, GOOD.replace('listen = "0.0.0.0:5672"', 'listen = "0.0.0.0:99999"'))
    assert errors == ["services['amqp'].listen: '0.0.0.0:99999': port must be a number from 1 to 65535"]


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        ("10.0.0.1:5672", None, ("10.0.0.1", 5672)),
        ("rabbit1", 5672, ("rabbit1", 5672)),
        ("[::1]:5671", None, ("::1", 5671)),
        ("[::1]", 5672, ("::1", 5672)),
    ],
)
def test_split_host_port(value: str, default: int | None, expected: tuple[str, int]) -> None:
    assert config_mod.split_host_port(value, default) == expected


@pytest.mark.parametrize("value", ["", ":5672", "host:", "host:x", "[::1", "[::1]5672", "host:0", "::1", ":::5672"])
def test_split_host_port_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        config_mod.split_host_port(value)


def test_backend_specs_from_the_command_line() -> None:
    assert config_mod.parse_backend_spec("10.0.0.11:5672=200", 1) == {
        "name": "backend2",
        "address": "10.0.0.11",
        "port": 5672,
        "weight": 200,
    }
    assert config_mod.parse_backend_spec("10.0.0.10", 0) == {"name": "backend1", "address": "10.0.0.10"}
    with pytest.raises(ValueError, match="weight"):
        config_mod.parse_backend_spec("h=heavy", 0)


def test_environment_builds_a_one_service_config() -> None:
    data = config_mod.from_env(
        {"RABBITPROXY_BACKENDS": "rabbit1:5672, rabbit2:5672,rabbit3", "RABBITPROXY_LISTEN": ":5673"}
    )
    assert data is not None
    with pytest.raises(ConfigError):
        config_mod.validate(data)  # ":5673" has no host
    data = config_mod.from_env({"RABBITPROXY_BACKENDS": "rabbit1:5672,rabbit2:5672,rabbit3"})
    assert data is not None
    cfg = config_mod.validate(data)
    assert [b.address for b in cfg.services[0].backends] == ["rabbit1", "rabbit2", "rabbit3"]
    assert config_mod.from_env({}) is None


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("rabbit1..example.com", "empty label"),
        (".rabbit1", "empty label"),
        ("a" * 64 + ".example.com", "longer than 63 characters"),
        (".".join(["a" * 60] * 5), "at most 253 characters"),
        ("rabbit 1", "' '"),
        ("rabbit1:5672:x", "not a valid IPv6 address"),
        ("rabbit1:5672", "a port goes in its own key"),
        ("räbbit1", "xn--"),
        ("-rabbit1", "starts or ends with '-'"),
    ],
)
def test_backend_addresses_that_cannot_be_host_names_are_refused(tmp_path: Path, address: str, why: str) -> None:
    errors = errors_of(tmp_path, GOOD.replace('address = "10.0.0.11"', f'address = "{address}"'))
    assert len(errors) == 1, errors
    assert errors[0].startswith("services['amqp'].backends['rabbit2'].address: "), errors
    assert why in errors[0]


@pytest.mark.parametrize(
    "address",
    ["rabbit1", "rabbit1.example.com", "rabbit1.example.com.", "rabbit_1", "10.0.0.1", "2001:db8::1", "xn--rbbit1-cua"],
)
def test_host_names_and_ip_literals_are_accepted(tmp_path: Path, address: str) -> None:
    cfg = config_mod.load(write(tmp_path, GOOD.replace('address = "10.0.0.11"', f'address = "{address}"')))
    assert cfg.service("amqp").backends[1].address == address


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('listen = "0.0.0.0:5672"', 'listen = "proxy..local:5672"', "services['amqp'].listen"),
        ('listen = "127.0.0.1:9080"', 'listen = "admin..local:9080"', "admin.listen"),
        (
            'balance = "least-connections"',
            'backend_tls = true\nbackend_tls_server_name = "rabbit..example.com"',
            "services['amqp'].backend_tls_server_name",
        ),
    ],
)
def test_other_host_fields_are_checked_too(tmp_path: Path, old: str, new: str, key: str) -> None:
    errors = errors_of(tmp_path, GOOD.replace(old, new, 1))
    assert len(errors) == 1 and errors[0].startswith(f"{key}: "), errors
    assert "empty label" in errors[0]


def test_accept_proxy_protocol_needs_proxy_protocol_from(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, GOOD.replace('balance = "least-connections"', "accept_proxy_protocol = true", 1))
    assert len(errors) == 1, errors
    assert errors[0].startswith("services['amqp'].proxy_protocol_from: required with accept_proxy_protocol = true")
    cfg = config_mod.load(
        write(
            tmp_path,
            GOOD.replace(
                'balance = "least-connections"',
                'accept_proxy_protocol = true\nproxy_protocol_from = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]',
                1,
            ),
        )
    )
    assert [str(n) for n in cfg.service("amqp").proxy_networks] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]


@pytest.mark.parametrize("entry", ["10.0.0.5/8", "10.0.0.0/33", "lb.example.com", ""])
def test_proxy_protocol_from_entries_must_be_networks(tmp_path: Path, entry: str) -> None:
    fragment = f'accept_proxy_protocol = true\nproxy_protocol_from = ["10.0.0.0/8", "{entry}"]'
    errors = errors_of(tmp_path, GOOD.replace('balance = "least-connections"', fragment, 1))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"services['amqp'].proxy_protocol_from: {entry!r} is not a network (CIDR)"), errors

"""The probe's address rules and the image's config fallback: pure functions, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbitproxy.admin.probe import admin_url
from rabbitproxy.cli import DEFAULT_CONFIG_PATH, build_config, config_or_env
from rabbitproxy.config import ConfigError


def test_default_is_the_admin_default() -> None:
    assert admin_url(None, {}) == "http://127.0.0.1:9080/healthz"


def test_precedence_flag_env_config_listen_env() -> None:
    env = {"RABBITPROXY_ADMIN": "10.1.1.1:1", "RABBITPROXY_ADMIN_LISTEN": "10.3.3.3:3"}
    assert admin_url("10.0.0.9:9", env, "10.2.2.2:2") == "http://10.0.0.9:9/healthz"
    assert admin_url(None, env, "10.2.2.2:2") == "http://10.1.1.1:1/healthz"
    del env["RABBITPROXY_ADMIN"]
    # With a config file, serve ignores RABBITPROXY_ADMIN_LISTEN, so the probe must too.
    assert admin_url(None, env, "10.2.2.2:2") == "http://10.2.2.2:2/healthz"
    assert admin_url(None, env, None) == "http://10.3.3.3:3/healthz"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("0.0.0.0:9080", "http://127.0.0.1:9080/healthz"),
        ("[::]:9080", "http://[::1]:9080/healthz"),
        ("[2001:db8::5]:9080", "http://[2001:db8::5]:9080/healthz"),
        ("http://0.0.0.0:9080", "http://127.0.0.1:9080/healthz"),
        ("http://proxy.internal:9080/", "http://proxy.internal:9080/healthz"),
        ("https://proxy.internal/prefix", "https://proxy.internal/prefix/healthz"),
        ("http://127.0.0.1:9080/healthz", "http://127.0.0.1:9080/healthz"),
    ],
)
def test_address_forms(given: str, expected: str) -> None:
    assert admin_url(given, {}) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("ftp://127.0.0.1:9080", "must start with http:// or https://"),
        ("http://:9080", "has no host"),
        ("http://127.0.0.1:99999", "bad port"),
        ("127.0.0.1", "missing ':port'"),
    ],
)
def test_bad_addresses_name_the_problem(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        admin_url(given, {})


def test_missing_default_config_falls_back_to_env() -> None:
    assert not DEFAULT_CONFIG_PATH.exists(), "this test assumes no config is installed on the test machine"
    assert config_or_env(DEFAULT_CONFIG_PATH, {"RABBITPROXY_BACKENDS": "rabbit1:5672"}) is None
    cfg = build_config(None, None, None, {}, env={"RABBITPROXY_BACKENDS": "rabbit1:5672,rabbit2"})
    assert [(b.address, cfg.services[0].backend_port(b)) for b in cfg.services[0].backends] == [
        ("rabbit1", 5672),
        ("rabbit2", 5672),
    ]
    assert cfg.admin.listen == "127.0.0.1:9080"


def test_missing_default_config_without_env_stays_an_error() -> None:
    assert config_or_env(DEFAULT_CONFIG_PATH, {}) == DEFAULT_CONFIG_PATH
    assert config_or_env(DEFAULT_CONFIG_PATH, {"RABBITPROXY_BACKENDS": "  "}) == DEFAULT_CONFIG_PATH


def test_any_other_missing_path_is_never_replaced_by_env(tmp_path: Path) -> None:
    typo = tmp_path / "rabbitproxy.tmol"
    assert config_or_env(typo, {"RABBITPROXY_BACKENDS": "rabbit1:5672"}) == typo
    with pytest.raises(ConfigError, match="cannot read the file"):
        build_config(typo, None, None, {}, env={"RABBITPROXY_BACKENDS": "rabbit1:5672"})


def test_bad_backend_env_is_a_config_error_not_a_crash() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(None, None, None, {}, env={"RABBITPROXY_BACKENDS": "rabbit1:notaport"})
    assert info.value.errors == ["RABBITPROXY_BACKENDS: 'rabbit1:notaport': port must be a number from 1 to 65535"]


def test_a_chunked_body_is_read_whole() -> None:
    # The probe speaks HTTP itself; a proxy in front of the admin API may answer chunked.
    from rabbitproxy.admin.probe import _dechunk

    assert _dechunk(b'7\r\n{"statu\r\n9\r\ns": "ok"}\r\n0\r\n\r\n') == b'{"status": "ok"}'
    assert _dechunk(b"zz\r\nnot chunked") == b""

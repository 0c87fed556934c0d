"""The ``[admin]`` keys of issue 26 (read_token, socket*, state_file) and the tokens in force."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.admin.access import admin_tokens
from rabbitproxy.config import AdminConfig, ConfigError
from tests.support.proxy import proxy_config, service_config


def errors(admin: dict[str, Any]) -> list[str]:
    data = proxy_config(service_config([{"name": "b", "address": "127.0.0.1"}], listen="127.0.0.1:5673"), admin=admin)
    with pytest.raises(ConfigError) as exc:
        config_mod.validate(data)
    return exc.value.errors


def test_the_defaults_change_nothing() -> None:
    cfg = AdminConfig()
    assert (cfg.read_token, cfg.socket, cfg.socket_mode, cfg.state_file) == (None, "", "0660", "")


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ({"token": "same", "read_token": "same"}, "admin.read_token: must differ from token"),
        ({"socket_mode": 660}, 'admin.socket_mode: 660 is not a file mode: write it in octal, as "0660" or 0o660'),
        ({"socket_mode": "0999"}, "admin.socket_mode: '0999' is not an octal file mode"),
        ({"socket_mode": "01777"}, "admin.socket_mode: '01777' is not a file mode from 0000 to 0777"),
        ({"socket": "run/admin.sock"}, "admin.socket: 'run/admin.sock' must be an absolute path"),
        ({"state_file": "state.json"}, "admin.state_file: 'state.json' must be an absolute path"),
    ],
)
def test_bad_admin_keys_are_named(admin: dict[str, Any], message: str) -> None:
    assert any(e.startswith(message) for e in errors(admin)), errors(admin)


def test_an_octal_integer_mode_is_taken() -> None:
    assert AdminConfig(socket_mode=0o640).socket_mode == "0640"


def test_tokens_from_the_file_then_the_environment() -> None:
    env = {"RABBITPROXY_ADMIN_TOKEN": "op-env", "RABBITPROXY_ADMIN_READ_TOKEN": "read-env"}
    tokens = admin_tokens(AdminConfig(), env=env)
    assert (tokens.operator, tokens.read) == ("op-env", "read-env")
    tokens = admin_tokens(AdminConfig(token="op", read_token="read"), env=env)
    assert (tokens.operator, tokens.read) == ("op", "read")
    assert admin_tokens(AdminConfig(), env={}) == admin_tokens(AdminConfig(), env={"RABBITPROXY_ADMIN_TOKEN": ""})


def test_off_loopback_a_read_token_alone_is_enough_and_nothing_is_not() -> None:
    tokens = admin_tokens(AdminConfig(listen="0.0.0.0:9080", read_token="read"), env={})
    assert (tokens.operator, tokens.read) == (None, "read")
    with pytest.raises(ConfigError, match=r"admin\.token: required"):
        admin_tokens(AdminConfig(listen="0.0.0.0:9080"), env={})


def test_the_same_token_twice_through_the_environment_is_refused() -> None:
    env = {"RABBITPROXY_ADMIN_READ_TOKEN": "same"}
    with pytest.raises(ConfigError, match=r"admin\.read_token: must differ"):
        admin_tokens(AdminConfig(token="same"), env=env)

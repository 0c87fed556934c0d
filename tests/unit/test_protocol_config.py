"""``protocol = "amqp"|"tcp"`` and ``client_idle_timeout = "auto"|seconds``; the EXTERNAL user's certificate subject."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.config import ConfigError
from rabbitproxy.relay.tls import cert_subject


def service(**extra: Any) -> config_mod.ServiceConfig:
    data = {"services": [{"name": "amqp", "backends": [{"name": "r1", "address": "127.0.0.1"}], **extra}]}
    return config_mod.validate(data).service("amqp")


def test_defaults_are_amqp_and_auto() -> None:
    svc = service()
    assert (svc.protocol, svc.client_idle_timeout) == ("amqp", "auto")
    assert svc.heartbeat_idle and svc.idle_seconds == 0.0


@pytest.mark.parametrize(
    ("extra", "heartbeat_idle", "seconds"),
    [
        ({"client_idle_timeout": 30}, False, 30.0),
        ({"client_idle_timeout": 0}, False, 0.0),
        ({"client_idle_timeout": 2.5}, False, 2.5),
        # "auto" follows the AMQP heartbeat; a tcp service has none, so it means off there.
        ({"protocol": "tcp"}, False, 0.0),
        ({"protocol": "tcp", "client_idle_timeout": 60}, False, 60.0),
    ],
)
def test_idle_timeout_forms(extra: dict[str, Any], heartbeat_idle: bool, seconds: float) -> None:
    svc = service(**extra)
    assert (svc.heartbeat_idle, svc.idle_seconds) == (heartbeat_idle, seconds)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"client_idle_timeout": -1}, "services['amqp'].client_idle_timeout: must be \"auto\" or a duration"),
        ({"client_idle_timeout": "soon"}, "services['amqp'].client_idle_timeout: must be \"auto\""),
        ({"client_idle_timeout": True}, "services['amqp'].client_idle_timeout: must be \"auto\""),
        ({"protocol": "stomp"}, "services['amqp'].protocol: must be one of 'amqp', 'tcp' or 'stream', not 'stomp'"),
    ],
)
def test_bad_values_name_the_key(extra: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        service(**extra)
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors


def test_certificate_subject() -> None:
    peercert = {
        "subject": ((("organizationName", "acme"),), (("commonName", "orders-writer"),)),
        "issuer": ((("commonName", "ca"),),),
    }
    assert cert_subject(peercert) == "O=acme,CN=orders-writer"
    assert cert_subject(None) is None
    assert cert_subject({}) is None

"""``protocol = "stream"``: node_port, advertised_host, the stream check as the default, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.snapshot import apply_backend_state, backend_state
from rabbitproxy.config import ConfigError


def _backends(*node_ports: int | None) -> list[dict[str, Any]]:
    return [
        {"name": f"r{i}", "address": "127.0.0.1", "port": 5552, **({"node_port": p} if p else {})}
        for i, p in enumerate(node_ports, 1)
    ]


def load(*services: dict[str, Any]) -> config_mod.Config:
    return config_mod.validate({"services": list(services)})


def stream(**extra: Any) -> dict[str, Any]:
    return {"name": "streams", "listen": "0.0.0.0:5552", "protocol": "stream", **extra}


def test_a_stream_service_checks_with_the_stream_handshake_by_default() -> None:
    svc = load(stream(backends=_backends(5553, 5554))).service("streams")
    assert svc.health_check.type == "stream"
    assert svc.node_listens == [("r1", "0.0.0.0", 5553), ("r2", "0.0.0.0", 5554)]
    assert not svc.heartbeat_idle and svc.idle_seconds == 0.0
    tcp_checked = load(stream(backends=_backends(5553), health_check={"type": "tcp"})).service("streams")
    assert tcp_checked.health_check.type == "tcp"


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        (
            [stream(backends=_backends(5553, 5553))],
            "services['streams'].backends['r2'].node_port: 5553 is already the port of 'streams/r1'",
        ),
        (
            [stream(backends=_backends(5552))],
            "services['streams'].backends['r1'].node_port: 5552 is the service's own listen port",
        ),
        (
            [{"name": "amqp", "backends": _backends(5553)}],
            "services['amqp'].backends['r1'].node_port: needs protocol = \"stream\"",
        ),
        ([stream(backends=_backends(None), health_check={"type": "amqp"})], 'an "amqp" check speaks AMQP 0-9-1'),
        ([{"name": "amqp", "backends": _backends(None), "health_check": {"type": "stream"}}], "needs protocol"),
        ([stream(backends=_backends(None), advertised_host="bad..name")], "advertised_host"),
        (
            [stream(backends=_backends(5672)), {"name": "amqp", "listen": "0.0.0.0:5672", "backends": _backends(None)}],
            "services['streams'].backends['r1'].node_port: 5672 is already the port of 'amqp'",
        ),
    ],
)
def test_what_is_refused_names_the_key(services: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(*services)
    assert any(expected in e for e in info.value.errors), info.value.errors


def test_the_learnt_advertised_address_crosses_to_the_workers_and_none_never_erases_one() -> None:
    svc = load(stream(backends=_backends(5553))).service("streams")
    parent = Backend.for_service(svc, svc.backends[0], healthy=True)
    worker = Backend.for_service(svc, svc.backends[0], healthy=True)
    worker.stream_advertised = ("learnt.by.worker", 1)
    apply_backend_state(worker, backend_state(parent))
    assert worker.stream_advertised == ("learnt.by.worker", 1)
    parent.stream_advertised = ("10.0.0.11", 5552)
    # As JSON carries it: a list.
    apply_backend_state(worker, [list(v) if isinstance(v, tuple) else v for v in backend_state(parent)])
    assert worker.stream_advertised == ("10.0.0.11", 5552)

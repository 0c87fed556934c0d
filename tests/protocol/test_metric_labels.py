"""Metric label values stay in fixed sets, on a running loop, whatever a feedback agent says."""

from __future__ import annotations

import platform

import pytest

from rabbitproxy import __version__
from rabbitproxy import config as config_mod
from rabbitproxy.admin.metrics import registry_for, render
from rabbitproxy.admin.views import backend_view
from rabbitproxy.balancing.backend import ADMIN_STATES
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.feedback import AgentUnavailableError
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.relay.service import Service
from tests.support.agents import ScriptedPoller
from tests.support.metrics import samples
from tests.support.proxy import proxy_config, service_config


def _proxy() -> Supervisor:
    backends = [
        {"name": "rabbit1", "address": "10.0.0.1", "port": 5672, "weight": 100},
        {"name": "rabbit2", "address": "10.0.0.2", "port": 5672, "weight": 50},
    ]
    cfg = config_mod.validate(proxy_config(service_config(backends, listen="127.0.0.1:5673")))
    proxy = Supervisor(cfg)
    proxy.services["amqp"] = Service(cfg.services[0])
    return proxy


@pytest.mark.asyncio
async def test_metric_label_values_stay_in_fixed_sets_whatever_the_agent_says() -> None:
    # An agent's words (or why it could not be asked) must never become a label value: each new wording would be
    # a new time series. The agent's text goes to the API's agent.detail instead.
    proxy = _proxy()
    service = proxy.services["amqp"]
    r1 = service.pool.by_name["rabbit1"]
    answers: list[bytes | Exception] = [
        b"50%\n",
        b"87.5%\n",
        b"hello\n",
        b"\xff\xfe",
        b"up ready 12%\n",
        AgentUnavailableError("timeout"),
        AgentUnavailableError("HTTP 500"),
        RuntimeError("a bug of ours"),
        b"weight:abc\n",
        b"60%\n",
    ]
    poller = ScriptedPoller(service, answers, r1)
    registry = registry_for(proxy)
    series: list[set[tuple[str, tuple[tuple[str, str], ...]]]] = []
    statuses: set[str] = set()
    details: list[str] = []
    for _ in range(len(poller.answers)):
        await poller.poll_once()
        got = samples(render(registry)[0].decode())
        series.append({key for key in got if key[0].startswith("rabbitproxy_")})
        for name, labels in series[-1]:
            for label, value in labels:
                known = {"service", "backend", "status", "state", "reason", "cause", "via", "kind", "version", "python"}
                assert label in known, (name, label)
                allowed = {
                    "service": {"amqp"},
                    "backend": {"rabbit1", "rabbit2"},
                    "status": {"up", "down", "drain", "maint", "maintenance"}
                    | {"ok", "unreachable", "bad reply", "error"},
                    "state": set(ADMIN_STATES),
                    "reason": set(CloseReason),
                    "cause": {"drain", "maint", "rebalance", "operator"},
                    "via": {"broker", "tcp"},
                    "kind": {"memory", "disk"},
                    # rabbitproxy_build_info: fixed for the life of the process.
                    "version": {__version__},
                    "python": {platform.python_version()},
                }[label]
                assert value in allowed, (name, label, value)
        statuses.add(backend_view(r1)["agent"]["status"])
        details.append(backend_view(r1)["agent"].get("detail"))
    # The same time series after every poll: none appears or vanishes with the agent's wording.
    assert all(s == series[0] for s in series)
    assert statuses == {"ok", "unreachable", "bad reply", "error"}
    # The words themselves are in the API.
    assert "'87.5%'" in details[1]
    assert details[5:8] == ["timeout", "HTTP 500", "RuntimeError: a bug of ours"]
    assert backend_view(r1)["agent"] | {"duration": None} == {
        "state": "ready",
        "status": "ok",
        "detail": None,
        "percent": 60,
        "reply": "60%",
        "duration": None,
    }

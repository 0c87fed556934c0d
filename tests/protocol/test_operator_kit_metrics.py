"""The Grafana dashboard and the Prometheus alerts ask only for series a live proxy exports.

A proxy runs in this loop with everything that makes a series appear: a TCP health check that has finished, a
feedback agent that has answered, the admin API. Its /metrics is scraped like Prometheus does, and every metric
name in examples/grafana/rabbitproxy.json and examples/prometheus/alerts.yml must be in it; so must every exact
label value those queries select (``status="down"``, ``reason="limit"``), since a misspelt one matches nothing and
an alert on it never fires. Whether the queries parse is checked by promtool in
tests/integration/test_prometheus_rules.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.metrics import samples
from tests.support.net import free_port, tcp_server
from tests.support.proxy import run_proxy, service_config
from tests.support.waiting import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DASHBOARD = EXAMPLES / "grafana" / "rabbitproxy.json"
ALERTS = EXAMPLES / "prometheus" / "alerts.yml"
# Series Prometheus makes itself for every target, not the proxy.
PROMETHEUS_OWN = {"up"}

# A metric name followed by an optional selector; names are ours (rabbitproxy_, process_) or a selector follows.
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    exprs = [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def selected(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The series an expression reads: (metric name, exact label matchers without template variables)."""
    out = []
    for m in SELECTOR.finditer(expr):
        name, selector = m.group(1), m.group(2)
        if not (name.startswith(("rabbitproxy_", "process_")) or (selector and name not in {"by", "on", "without"})):
            continue
        exact = {}
        for label, op, value in MATCHER.findall(selector or ""):
            if op == "=" and "$" not in value:
                exact[label] = value
        out.append((name, exact))
    return out


async def report_75_percent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"75%\n")
    await writer.drain()


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


@pytest.fixture(params=["dashboard", "alerts"])
def queries(request: pytest.FixtureRequest) -> list[str]:
    return dashboard_queries() if request.param == "dashboard" else alert_queries()


@pytest.mark.asyncio
async def test_every_series_the_queries_use_is_in_a_live_scrape(queries: list[str]) -> None:
    wanted = [s for q in queries for s in selected(q)]
    names = {name for name, _ in wanted}
    # The extraction found the queries' metrics (a regex that matched nothing would pass everything).
    assert len(names - PROMETHEUS_OWN) >= 5, names
    admin = f"127.0.0.1:{free_port()}"
    async with tcp_server(hold) as port, tcp_server(report_75_percent) as agent_port:
        svc = service_config(
            [{"name": "rabbit1", "address": "127.0.0.1", "port": port, "agent_port": agent_port}],
            health_check={"type": "tcp", "interval": 0.2, "timeout": 2.0, "rise": 1, "fall": 1},
            feedback={"type": "agent", "interval": 0.2, "timeout": 2.0},
        )
        async with run_proxy(svc, admin={"listen": admin}), aiohttp.ClientSession() as http:

            async def scrape() -> str:
                async with http.get(f"http://{admin}/metrics") as r:
                    assert r.status == 200
                    return await r.text()

            async def complete() -> str | None:
                # The health check and the agent have each answered once: their series exist from then on.
                text = await scrape()
                done = all(
                    f"{name}{{" in text
                    for name in (
                        "rabbitproxy_backend_last_check_timestamp_seconds",
                        "rabbitproxy_backend_agent_percent",
                        "rabbitproxy_backend_agent_duration_seconds",
                    )
                )
                return text if done else None

            text = await wait_for(complete, what="the first check and agent poll in /metrics")
    live = samples(text)
    exported = {name for name, _ in live}
    missing = sorted(names - exported - PROMETHEUS_OWN)
    assert not missing, f"queried but not exported: {missing}"
    for name, exact in wanted:
        if name in PROMETHEUS_OWN or not exact:
            continue
        assert any(n == name and exact.items() <= dict(labels).items() for n, labels in live), (
            f"no series {name}{exact} in /metrics"
        )

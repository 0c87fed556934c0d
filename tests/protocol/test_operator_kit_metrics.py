"""The Grafana dashboard and the Prometheus alerts ask only for series a live proxy exports, and the dashboard has a
name and a colour for every number its state panels can show.

A proxy runs in this loop with everything that makes a series appear: a TCP health check that has finished, a
feedback agent that has answered, a node monitor reading a management API (the answers recorded from a real
RabbitMQ node with a memory alarm), backends up, down, drained and in maint, the admin API. Its /metrics is scraped
like Prometheus does, and every metric
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

from tests.support.management_replay import replayed_management_api
from tests.support.metrics import Samples, samples
from tests.support.net import dead_port, free_port, tcp_server
from tests.support.proxy import run_proxy, service_config
from tests.support.waiting import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DASHBOARD = EXAMPLES / "grafana" / "rabbitproxy.json"
ALERTS = EXAMPLES / "prometheus" / "alerts.yml"
# Series Prometheus makes itself for every target, not the proxy.
PROMETHEUS_OWN = {"up"}
# Labels Prometheus adds to every series of a target (the scrape job, the address), not the proxy.
TARGET_LABELS = {"job", "instance"}

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
            if op == "=" and "$" not in value and label not in TARGET_LABELS:
                exact[label] = value
        out.append((name, exact))
    return out


async def report_75_percent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"75%\n")
    await writer.drain()


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


# The series that exist only once something has answered: a health check, an agent, a management API poll.
FIRST_ANSWERS = (
    "rabbitproxy_backend_last_check_timestamp_seconds",
    "rabbitproxy_backend_agent_percent",
    "rabbitproxy_backend_agent_duration_seconds",
    "rabbitproxy_backend_rabbitmq_fds_used",
)


async def live_scrape() -> str:
    """/metrics of a proxy whose backends are up, drained, in maint and down, with agents and a node monitor.

    rabbit1's and rabbit3's management API answers as a real node with a memory alarm did, rabbit5's as a node
    without one; rabbit2's and rabbit4's agent and management ports have nothing listening; rabbit4 itself is down.
    """
    admin = f"127.0.0.1:{free_port()}"
    async with (
        tcp_server(hold) as port,
        tcp_server(report_75_percent) as agent_port,
        replayed_management_api() as mgmt_port,
        replayed_management_api(node="node", alarms="local_alarms_ok") as well_port,
    ):
        with dead_port() as dead:
            backends = [
                {"name": "rabbit1", "port": port, "agent_port": agent_port, "management_port": mgmt_port},
                {"name": "rabbit2", "port": port, "agent_port": dead, "management_port": dead},
                {"name": "rabbit3", "port": port, "agent_port": agent_port, "management_port": mgmt_port},
                {"name": "rabbit4", "port": dead, "agent_port": dead, "management_port": dead},
                {"name": "rabbit5", "port": port, "agent_port": agent_port, "management_port": well_port},
            ]
            svc = service_config(
                [{"address": "127.0.0.1", **b} for b in backends],
                health_check={"type": "tcp", "interval": 0.2, "timeout": 2.0, "rise": 1, "fall": 1},
                feedback={"type": "agent", "interval": 0.2, "timeout": 2.0},
                # With alarm_weight above 0 a node with an alarm stays "up" (at 0 its status is "drain").
                rabbitmq={"interval": 0.2, "timeout": 2.0, "alarm_weight": 50},
            )
            async with run_proxy(svc, admin={"listen": admin}), aiohttp.ClientSession() as http:
                for backend, state in (("rabbit2", "drain"), ("rabbit3", "maint")):
                    url = f"http://{admin}/api/services/amqp/backends/{backend}"
                    async with http.patch(url, json={"state": state, "force": True}) as r:
                        assert r.status == 200, await r.text()

                async def complete() -> str | None:
                    async with http.get(f"http://{admin}/metrics") as r:
                        assert r.status == 200
                        text = await r.text()
                    live = samples(text)
                    settled = {
                        _key("rabbitproxy_backend_status", "rabbit4", status="down"): 1.0,
                        _key("rabbitproxy_backend_rabbitmq_management_up", "rabbit2"): 0.0,
                        _key("rabbitproxy_backend_rabbitmq_alarm", "rabbit1", kind="memory"): 1.0,
                        _key("rabbitproxy_backend_agent_status", "rabbit2", status="unreachable"): 1.0,
                        _key("rabbitproxy_backend_rabbitmq_management_up", "rabbit5"): 1.0,
                    }
                    ready = all(f"{name}{{" in text for name in FIRST_ANSWERS)
                    return text if ready and all(live.get(k) == v for k, v in settled.items()) else None

                return await wait_for(complete, what="every backend's state and first answers in /metrics")


def _key(name: str, backend: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"service": "amqp", "backend": backend, **labels}.items()))


@pytest.fixture(params=["dashboard", "alerts"])
def queries(request: pytest.FixtureRequest) -> list[str]:
    return dashboard_queries() if request.param == "dashboard" else alert_queries()


@pytest.mark.asyncio
async def test_every_series_the_queries_use_is_in_a_live_scrape(queries: list[str]) -> None:
    wanted = [s for q in queries for s in selected(q)]
    names = {name for name, _ in wanted}
    # The extraction found the queries' metrics (a regex that matched nothing would pass everything).
    assert len(names - PROMETHEUS_OWN) >= 5, names
    live = samples(await live_scrape())
    exported = {name for name, _ in live}
    missing = sorted(names - exported - PROMETHEUS_OWN)
    assert not missing, f"queried but not exported: {missing}"
    for name, exact in wanted:
        if name in PROMETHEUS_OWN or not exact:
            continue
        assert any(n == name and exact.items() <= dict(labels).items() for n, labels in live), (
            f"no series {name}{exact} in /metrics"
        )


# One term of a state panel's query: ``(metric{selectors, label="value"} == 1) * N`` (or ``== 0) + N``).
TERM = re.compile(
    r'\((?P<metric>[a-z_]+)\{[^}]*?(?:,\s*(?P<label>[a-z]+)="(?P<value>[^"]+)")?\}\s*==\s*(?P<eq>[01])\)\s*'
    r"(?P<op>[*+])\s*(?P<n>\d+)"
)
# The state panels, and what each backend of live_scrape() shows on them.
EXPECTED = {
    "Backend status": {"rabbit1": "up", "rabbit2": "drain", "rabbit3": "maint", "rabbit4": "down", "rabbit5": "up"},
    "Admin state": {"rabbit1": "ready", "rabbit2": "drain", "rabbit3": "maint", "rabbit4": "ready", "rabbit5": "ready"},
    "Feedback agent": {
        "rabbit1": "ok",
        "rabbit2": "unreachable",
        "rabbit3": "ok",
        "rabbit4": "unreachable",
        "rabbit5": "ok",
    },
    "RabbitMQ node state": {
        "rabbit1": "memory alarm",
        "rabbit2": "management API unreachable",
        "rabbit3": "memory alarm",
        "rabbit4": "management API unreachable",
        "rabbit5": "ok",
    },
}


def mapped_panels() -> dict[str, dict[str, Any]]:
    dash = json.loads(DASHBOARD.read_text())
    return {p["title"]: p for p in dash["panels"] if p.get("fieldConfig", {}).get("defaults", {}).get("mappings")}


def value_names(panel: dict[str, Any]) -> dict[float, str]:
    """The panel's value mappings: number -> the text Grafana shows, each with a colour."""
    names: dict[float, str] = {}
    for mapping in panel["fieldConfig"]["defaults"]["mappings"]:
        assert mapping["type"] == "value", panel["title"]
        for key, shown in mapping["options"].items():
            assert shown["text"] and shown["color"], (panel["title"], key)
            names[float(key)] = shown["text"]
    return names


def render(expr: str, live: Samples, backend: str) -> float | None:
    """What a state panel's query gives for one backend of service amqp (the max over its terms that match)."""
    got: list[float] = []
    for t in TERM.finditer(expr):
        labels = {"service": "amqp", "backend": backend}
        if t["label"]:
            labels[t["label"]] = t["value"]
        value = live.get((t["metric"], tuple(sorted(labels.items()))))
        if value is not None and value == float(t["eq"]):
            got.append(value * float(t["n"]) if t["op"] == "*" else value + float(t["n"]))
    return max(got) if got else None


def test_every_number_a_state_query_can_return_has_a_name_and_a_colour() -> None:
    panels = mapped_panels()
    assert set(EXPECTED) <= set(panels)
    for title, panel in panels.items():
        names = value_names(panel)
        terms = list(TERM.finditer(panel["targets"][0]["expr"]))
        if not terms:
            # A 0/1 gauge shown as it is (accepting, the last reload): both values are named.
            assert set(names) == {0.0, 1.0}, title
            continue
        numbers = {float(t["n"]) * float(t["eq"]) if t["op"] == "*" else float(t["n"]) + float(t["eq"]) for t in terms}
        assert numbers == set(names), f"{title}: the query returns {sorted(numbers)}, mapped are {sorted(names)}"
        for t in terms:
            if t["label"]:
                # A term for a label value is named after it, so the timeline says what /metrics says.
                n = float(t["n"]) * float(t["eq"]) if t["op"] == "*" else float(t["n"]) + float(t["eq"])
                assert t["value"] in names[n], (title, t["value"], names[n])


@pytest.mark.asyncio
async def test_the_state_panels_name_every_state_a_live_proxy_exports() -> None:
    live = samples(await live_scrape())
    panels = mapped_panels()
    for title, shows in EXPECTED.items():
        expr = panels[title]["targets"][0]["expr"]
        names = value_names(panels[title])
        terms = list(TERM.finditer(expr))
        # Every value the live proxy exports for the labels the panel reads has a term of its own (a status the
        # query left out, like maintenance before, would show as nothing at all).
        for metric_name, label in {(t["metric"], t["label"]) for t in terms if t["label"]}:
            exported = {dict(lbls)[label] for n, lbls in live if n == metric_name}
            covered = {t["value"] for t in terms if t["metric"] == metric_name}
            assert exported, (title, metric_name)
            assert exported <= covered, f"{title}: {sorted(exported - covered)} exported but not shown"
        for backend, state in shows.items():
            value = render(expr, live, backend)
            assert value is not None and names.get(value) == state, (title, backend, value, names)

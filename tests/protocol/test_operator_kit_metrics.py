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

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.metrics import Samples, samples
from tests.support.operator_kit import live_scrape

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

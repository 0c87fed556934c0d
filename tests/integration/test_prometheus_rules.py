"""examples/prometheus/alerts.yml passes ``promtool check rules`` and its own ``promtool test rules`` cases, every
query of examples/grafana/rabbitproxy.json is valid PromQL, and a live /metrics passes ``promtool check metrics``
(Prometheus's naming rules: units as suffixes, ``_total`` only on counters).

promtool comes from Debian's ``prometheus`` package (scripts/install). Which metric names and label values the
queries use is checked against a live /metrics in tests/protocol/test_operator_kit_metrics.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.operator_kit import live_scrape

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALERTS = EXAMPLES / "prometheus" / "alerts.yml"
DASHBOARD = EXAMPLES / "grafana" / "rabbitproxy.json"


def promtool(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd, input=stdin,
    )  # fmt: skip


def test_promtool_checks_the_alerting_rules() -> None:
    done = promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_every_alert_fires_in_its_promtool_case_and_only_then() -> None:
    """alerts_test.yml feeds series to each alert and names what must fire when (and what must not yet)."""
    cases = yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert tested == alerts
    done = promtool("test", "rules", "alerts_test.yml", cwd=ALERTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    return [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", [])]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in as Grafana would, as a recording rule promtool parses."""
    exprs = dashboard_queries()
    assert len(exprs) >= 20
    filled = [e.replace("$__rate_interval", "1m").replace('"$instance"', '".*"').replace('"$service"', '".*"')
              .replace('"$backend"', '".*"') for e in exprs]  # fmt: skip
    assert not [e for e in filled if "$" in e], "a variable the test does not fill in"
    recorded = [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(filled)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(filled)} rules found" in done.stdout


@pytest.mark.asyncio
async def test_a_live_scrape_follows_prometheus_naming_rules(tmp_path: Path) -> None:
    """Every series a proxy exports with backends, agents and node monitors running, linted by promtool."""
    text = await live_scrape()
    assert "rabbitproxy_backend_rabbitmq_memory_used_bytes{" in text and "rabbitproxy_build_info{" in text
    done = promtool("check", "metrics", cwd=tmp_path, stdin=text)
    assert done.returncode == 0, done.stdout + done.stderr

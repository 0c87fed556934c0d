"""examples/grafana/rabbitproxy.json is a dashboard Grafana can import as it is.

Its queries are checked elsewhere: valid PromQL (tests/integration/test_prometheus_rules.py) and asking only for
exported series (tests/protocol/test_operator_kit_metrics.py). Here: the structure Grafana relies on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "rabbitproxy.json"


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = load()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(g["y"] + dy, g["x"] + dx) for dy in range(g["h"]) for dx in range(g["w"])}
        assert not cells & taken, f"{p['title']!r} overlaps another panel"
        taken |= cells


def test_every_query_uses_the_data_source_variable_and_has_its_own_ref_id() -> None:
    dash = load()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["description"], f"{p['title']!r} has no description"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            # Every variable a query uses is defined (Grafana would leave "$name" in the query otherwise).
            for name in ("instance", "service", "backend"):
                if f"${name}" in t["expr"]:
                    assert name in variables


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(t["expr"] for p in load()["panels"] for t in p.get("targets", []))
    for metric in (
        "rabbitproxy_service_active_connections",
        "rabbitproxy_service_connections_total",
        "rabbitproxy_backend_bytes_in_total",
        "rabbitproxy_backend_bytes_out_total",
        "rabbitproxy_backend_status",
        "rabbitproxy_backend_admin_state",
        "rabbitproxy_backend_weight",
        "rabbitproxy_backend_effective_weight",
        "rabbitproxy_backend_connect_errors_total",
        "rabbitproxy_service_connections_ended_total",
        "rabbitproxy_backend_health_check_duration_seconds",
        "rabbitproxy_backend_last_check_timestamp_seconds",
        "rabbitproxy_backend_agent_status",
        # Issue 27: the node monitor, failed logins, closes through the broker and rebalancing, reloads.
        "rabbitproxy_backend_rabbitmq_alarm",
        "rabbitproxy_backend_rabbitmq_maintenance",
        "rabbitproxy_backend_rabbitmq_management_up",
        "rabbitproxy_service_failed_logins_total",
        "rabbitproxy_service_closed_by_proxy_total",
        "rabbitproxy_backend_connection_share",
        "rabbitproxy_config_last_reload_successful",
        "rabbitproxy_build_info",
    ):
        assert metric in exprs, metric

"""Reading management API answers: real recorded answers, and hostile shapes that must fail with a named field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.protocols.management import (
    ManagementError,
    connection_name,
    parse_alarms_check,
    parse_node,
    parse_nodes,
    parse_overview,
    parse_quorum_check,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "management"


def fixture(name: str) -> tuple[int, Any]:
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc["status"], doc["body"]


def test_overview_names_the_node_that_answered_and_its_listeners() -> None:
    _, body = fixture("overview")
    overview = parse_overview(body)
    assert overview.node.startswith("rp1-")
    assert overview.version == "3.10.8"
    nodes = {item.node for item in overview.listeners if item.protocol == "amqp"}
    assert len(nodes) == 3
    assert overview.listening(overview.node)
    assert not overview.listening("nobody@nowhere")


def test_a_healthy_node() -> None:
    _, body = fixture("node")
    node = parse_node(body)
    assert node.running and node.alarms == ()
    assert node.being_drained is None  # 3.10 reports the key as null
    assert node.fd_total and node.fd_used is not None and node.fd_used <= node.fd_total
    assert node.mem_limit and node.proc_total and node.sockets_total


def test_a_node_with_a_memory_alarm() -> None:
    _, body = fixture("node_mem_alarm")
    assert parse_node(body).alarms == ("memory",)


def test_local_alarms_check() -> None:
    assert parse_alarms_check(*fixture("local_alarms_ok")) == ()
    alarms = parse_alarms_check(*fixture("local_alarms_failed"))
    assert [a.resource for a in alarms] == ["memory"]


def test_quorum_check_names_the_queues_at_risk() -> None:
    assert not parse_quorum_check(*fixture("quorum_critical_ok")).critical
    check = parse_quorum_check(*fixture("quorum_critical_failed"))
    assert check.critical
    assert check.queues == ("queue 'qq-fixture' in vhost '/'",)
    assert "quorum" in check.reason


def test_a_drained_node_as_its_peers_see_it_on_3_10() -> None:
    _, body = fixture("node2_while_draining_from_node1")
    node = parse_node(body)
    # What makes maintenance hard to see on 3.10: the peer says the node runs and is not being drained.
    assert node.running and node.being_drained is None
    _, nodes = fixture("nodes_one_draining_from_node1")
    assert len(parse_nodes(nodes)) == 2


def test_other_statuses_are_not_answers() -> None:
    with pytest.raises(ManagementError, match="HTTP 404"):
        parse_quorum_check(*fixture("ready_to_serve"))
    with pytest.raises(ManagementError, match="HTTP 401"):
        parse_alarms_check(401, {"error": "not_authorised"})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "expected a JSON object"),
        ({}, "no 'node'"),
        ({"node": 7}, "'node' is int"),
        ({"node": "a", "listeners": [{"node": "a", "protocol": "amqp", "port": "5672"}]}, "'port' is str"),
    ],
)
def test_bad_overviews_name_the_field(body: object, match: str) -> None:
    with pytest.raises(ManagementError, match=match):
        parse_overview(body)


def test_a_boolean_is_not_a_count() -> None:
    with pytest.raises(ManagementError, match="'fd_used' is a boolean"):
        parse_node({"name": "n", "fd_used": True})


def test_connection_name_matches_the_brokers_format() -> None:
    assert connection_name(("127.0.0.1", 50000), ("127.0.0.1", 5672)) == "127.0.0.1:50000 -> 127.0.0.1:5672"
    assert connection_name(("::1", 50000), ("::1", 5672)) == "[::1]:50000 -> [::1]:5672"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
KEYS = st.sampled_from(["node", "name", "listeners", "running", "mem_alarm", "fd_used", "queues", "alarms"])


@given(JSON, st.dictionaries(KEYS, JSON, max_size=6), st.sampled_from([200, 503, 500]))
def test_any_json_gives_a_value_or_a_management_error(doc: object, keyed: dict[str, object], status: int) -> None:
    for body in (doc, keyed):
        for parse in (parse_overview, parse_node, parse_nodes):
            try:
                parse(body)
            except ManagementError:
                pass
        for check in (parse_alarms_check, parse_quorum_check):
            try:
                check(status, body)
            except ManagementError:
                pass

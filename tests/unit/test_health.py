"""Unit tests for the pure parts of rabbitproxy.control.health: rise/fall counting, HTTP verdicts, applying results."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.health import ProbeResult, RiseFall, apply_result, classify_http, http_url
from rabbitproxy.relay.service import Service
from tests.support.fakes import FakeConn
from tests.support.proxy import make_service


def test_first_verdict_decides_at_once() -> None:
    up = RiseFall(rise=3, fall=3, healthy=False, checked=False)
    assert up.record(True) is True
    assert up.healthy is True
    down = RiseFall(rise=3, fall=3, healthy=False, checked=False)
    # Already down, but the first verdict is still reported so the log says why the backend never came up.
    assert down.record(False) is True
    assert down.healthy is False


def test_rise_and_fall_need_consecutive_results() -> None:
    rf = RiseFall(rise=2, fall=3, healthy=True, checked=True)
    assert [rf.record(False), rf.record(False)] == [False, False]
    assert rf.healthy is True
    # A success in between resets the failure streak.
    assert rf.record(True) is False
    assert [rf.record(False), rf.record(False), rf.record(False)] == [False, False, True]
    assert rf.healthy is False
    assert rf.record(True) is False
    assert rf.record(True) is True
    assert rf.healthy is True


@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.booleans(), max_size=60))
def test_rise_fall_matches_a_direct_definition(rise: int, fall: int, verdicts: list[bool]) -> None:
    rf = RiseFall(rise, fall, healthy=True, checked=True)
    for i, ok in enumerate(verdicts):
        before = rf.healthy
        flipped = rf.record(ok)
        assert flipped == (rf.healthy != before)
        if flipped:
            # The state only flips after the required number of agreeing verdicts in a row.
            need = rise if ok else fall
            assert i + 1 >= need
            assert all(v == ok for v in verdicts[i + 1 - need : i + 1])


@pytest.mark.parametrize(
    ("status", "url", "expected"),
    [
        (200, "http://h/api/health/checks/protocol-listener/amqp", ProbeResult(True, "HTTP 200")),
        (204, "http://h/x", ProbeResult(True, "HTTP 204")),
        (404, "http://h/api/health/checks/ready-to-serve-clients", ProbeResult(False, "HTTP 404")),
        (503, "http://h/api/health/checks/protocol-listener/amqp", ProbeResult(False, "HTTP 503")),
        (
            503,
            "http://h/api/health/checks/ready-to-serve-clients",
            ProbeResult(True, "HTTP 503: being taken out of service", drain=True),
        ),
        (301, "http://h/x", ProbeResult(False, "HTTP 301")),
        (500, "http://h/x", ProbeResult(False, "HTTP 500")),
    ],
)
def test_http_status_verdicts(status: int, url: str, expected: ProbeResult) -> None:
    assert classify_http(status, url) == expected


def _service(**check: object) -> Service:
    backends = [
        {"name": "a", "address": "10.0.0.1", "port": 5672, "check_port": 15672},
        {"name": "b", "address": "fd00::1", "port": 5672},
    ]
    return make_service(backends, health_check={"type": "http", **check})


def test_http_url_fills_address_and_check_port() -> None:
    service = _service()
    a, b = service.pool.backends
    assert http_url("http://{address}:{port}/x", a) == "http://10.0.0.1:15672/x"
    assert http_url("http://{address}:{port}/x", b) == "http://[fd00::1]:5672/x"


@pytest.mark.parametrize(("policy", "closed"), [("close", [CloseReason.BACKEND_DOWN]), ("keep", [])])
def test_marked_down_closes_connections_only_when_asked(policy: str, closed: list[str]) -> None:
    service = _service(on_marked_down=policy, fall=2)
    backend = service.pool.backends[0]
    state = RiseFall(2, 2, backend.healthy, checked=False)
    apply_result(service, backend, state, ProbeResult(True, "HTTP 200"), 0.01)
    assert backend.healthy and backend.health_detail == "HTTP 200"
    conn = FakeConn()
    backend.opened(conn)
    apply_result(service, backend, state, ProbeResult(False, "timeout"), 1.0)
    # One failure of two: still up, and the detail still describes the up state.
    assert backend.healthy and backend.health_detail == "HTTP 200"
    assert conn.reasons == []
    apply_result(service, backend, state, ProbeResult(False, "refused"), 0.0)
    assert not backend.healthy
    assert backend.health_detail == "refused"
    assert backend.status == "down"
    assert conn.reasons == closed


def test_readiness_503_drains_without_marking_down() -> None:
    service = _service()
    backend = service.pool.backends[0]
    state = RiseFall(2, 2, backend.healthy, checked=False)
    apply_result(service, backend, state, ProbeResult(True, "HTTP 200"), 0.01)
    conn = FakeConn()
    backend.opened(conn)
    apply_result(service, backend, state, ProbeResult(True, "HTTP 503: being taken out of service", drain=True), 0.01)
    assert backend.healthy
    assert backend.admin_state == "drain"
    assert backend.weight == 0
    assert conn.reasons == []
    apply_result(service, backend, state, ProbeResult(True, "HTTP 200"), 0.01)
    assert backend.admin_state == "ready"
    assert backend.weight == backend.configured_weight

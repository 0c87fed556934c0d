"""Admission control's arithmetic (rabbitproxy.balancing.admission), driven with plain numbers for the clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.admission import WAIT_BUCKETS, Admission, RateGate, default_burst
from rabbitproxy.control.worker import share_limits
from rabbitproxy.control.worker_views import counters_of, write_figures
from tests.support.proxy import make_service


def test_the_default_burst_is_a_tenth_of_the_rate_and_at_least_one() -> None:
    assert [default_burst(r) for r in (0.5, 1, 10, 11, 150)] == [1, 1, 1, 2, 15]


def test_a_gate_gives_its_burst_at_once_then_one_token_per_period() -> None:
    gate = RateGate(rate=2.0, burst=3, now=100.0)
    assert [gate.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert gate.wait(100.0) == pytest.approx(0.5)
    assert not gate.take(100.4)
    assert gate.take(100.5)
    # Tokens never pile up beyond the burst, however long nothing was asked.
    assert sum(gate.take(1000.0) for _ in range(10)) == 3


def test_a_gate_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        RateGate(0.0, 1, 0.0)
    with pytest.raises(ValueError, match="burst at least 1"):
        RateGate(1.0, 0, 0.0)


def test_retune_keeps_saved_tokens_up_to_the_new_burst() -> None:
    gate = RateGate(rate=1.0, burst=10, now=0.0)
    gate.retune(rate=5.0, burst=2, now=0.0)
    assert sum(gate.take(0.0) for _ in range(10)) == 2
    assert gate.wait(0.0) == pytest.approx(0.2)


def test_held_clients_go_in_arrival_order_as_tokens_come() -> None:
    adm: Admission[str] = Admission(RateGate(rate=1.0, burst=1, now=0.0))
    assert adm.admit("a", 0.0)
    assert not adm.admit("b", 0.1)
    assert not adm.admit("c", 0.2)
    assert len(adm) == 2 and "b" in adm
    assert adm.due(0.2) == pytest.approx(0.8)
    assert adm.release(0.9) == []
    assert adm.release(1.0) == [("b", 0.1)]
    # A newcomer does not overtake a held client even when a token is there.
    assert not adm.admit("d", 2.5)
    assert adm.release(2.5) == [("c", 0.2)]
    assert adm.oldest(2.5) == pytest.approx(0.0)
    assert adm.release(3.5) == [("d", 2.5)]
    assert adm.due(3.5) is None and adm.oldest(3.5) == 0.0


def test_a_client_that_leaves_is_forgotten_and_frees_its_turn() -> None:
    adm: Admission[str] = Admission(RateGate(rate=1.0, burst=1, now=0.0))
    adm.admit("a", 0.0)
    adm.admit("b", 0.0)
    adm.admit("c", 0.0)
    assert adm.discard("b") == 0.0
    assert adm.discard("b") is None
    assert adm.release(1.0) == [("c", 0.0)]


def test_a_client_held_for_its_backends_goes_first_once_they_have_a_token() -> None:
    adm: Admission[str] = Admission(RateGate(rate=10.0, burst=5, now=0.0))
    assert adm.admit("a", 0.0)
    adm.hold("a", since=0.0, not_before=0.7)
    # Its wait is the backends', not the service's (which has tokens), and nobody behind it overtakes.
    assert not adm.admit("b", 0.1)
    assert adm.due(0.1) == pytest.approx(0.6)
    assert adm.release(0.5) == []
    assert adm.release(0.7) == [("a", 0.0), ("b", 0.1)]


def test_without_a_service_rate_only_backend_holds_queue_clients() -> None:
    adm: Admission[str] = Admission(None)
    assert adm.admit("a", 0.0)
    adm.hold("a", since=0.0, not_before=1.0)
    assert not adm.admit("b", 0.5)
    assert adm.due(0.5) == pytest.approx(0.5)
    assert adm.release(1.0) == [("a", 0.0), ("b", 0.5)]


@given(
    rate=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=10),
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=80),
)
def test_no_interval_ever_sees_more_than_burst_plus_rate_times_its_length(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """The bound an operator sizes a broker by, whatever the arrivals: every client also gets through, in order."""
    adm: Admission[int] = Admission(RateGate(rate, burst, now=0.0))
    granted: list[tuple[float, int]] = []
    now = 0.0
    for i, gap in enumerate(gaps):
        now += gap
        granted += [(now, k) for k, _ in adm.release(now)]
        if adm.admit(i, now):
            granted.append((now, i))
    while (due := adm.due(now)) is not None:
        now += due
        granted += [(now, k) for k, _ in adm.release(now)]
    assert [k for _, k in granted] == list(range(len(gaps)))
    times = [t for t, _ in granted]
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - times[i]) + 1e-6


def _worker_stats(name: str, waiting: int, oldest: float, held: int, wait_sum: float) -> dict[str, Any]:
    n = len(WAIT_BUCKETS) + 1
    counters = {
        "total": held, "ended": {}, "close_timeouts": 0, "failed_logins": 0, "handshakes_given_up": 0,
        "closed": {}, "backends": {}, "admission": [held, wait_sum, [1] * n],
    }  # fmt: skip
    gauges = {"active": waiting, "vhost_open": {}, "backends": {}, "admission": waiting}
    return {"services": {name: {"counters": counters, "gauges": gauges, "oldest_wait": oldest}}}


def test_the_parent_adds_up_its_workers_and_a_dead_workers_held_clients_leave_the_sum() -> None:
    service = make_service([{"name": "a", "address": "127.0.0.1", "port": 1}], connect_rate=10.0)
    n = len(WAIT_BUCKETS) + 1
    one, two = _worker_stats("amqp", 3, 2.0, 10, 5.0), _worker_stats("amqp", 4, 1.0, 1, 0.5)
    write_figures({"amqp": service}, {}, [({}, one), ({}, two)])
    both = service.admission_figures()
    assert both is not None
    assert (both.waiting, both.oldest_wait, both.held, both.wait_sum) == (7, 2.0, 11, 5.5)
    assert both.wait_buckets == (2,) * n
    # Worker one died: what it counted stays (its successor's base), the clients it held do not.
    write_figures({"amqp": service}, {}, [(counters_of(one), {}), ({}, two)])
    after = service.admission_figures()
    assert after is not None
    assert (after.waiting, after.oldest_wait, after.held, after.wait_sum) == (4, 1.0, 11, 5.5)


def test_workers_each_take_their_share_of_the_rates_and_the_burst() -> None:
    backends = [
        {"name": "a", "address": "127.0.0.1", "port": 1, "connect_rate": 10.0},
        {"name": "b", "address": "127.0.0.1", "port": 2},
    ]
    service = {
        "name": "s",
        "listen": "127.0.0.1:5672",
        "connect_rate": 150.0,
        "connect_burst": 15,
        "backends": backends,
    }
    shared = share_limits(config_mod.validate({"workers": 4, "services": [service]}), 4).services[0]
    assert (shared.connect_rate, shared.connect_burst) == (37.5, 4)
    assert [b.connect_rate for b in shared.backends] == [2.5, 0.0]
    # Left at 0, the burst follows each worker's share of the rate by itself.
    auto = share_limits(config_mod.validate({"services": [{**service, "connect_burst": 0}]}), 4).services[0]
    assert auto.connect_burst == 0 and default_burst(auto.connect_rate) == 4

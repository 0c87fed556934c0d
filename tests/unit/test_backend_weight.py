"""A backend's effective weight: configured x agent x local alarm x slow start, and what status people see."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import SLOW_START_FLOOR, Backend
from rabbitproxy.balancing.pool import Pool


def _service(
    *, slow_start: float = 0.0, alarm_weight: int | None = None, balance: str = "weighted-round-robin"
) -> config_mod.ServiceConfig:
    service: dict[str, object] = {
        "name": "amqp",
        "listen": "127.0.0.1:5673",
        "balance": balance,
        "slow_start": slow_start,
        "backends": [{"name": f"rabbit{i}", "address": "127.0.0.1", "port": 5670 + i} for i in (1, 2, 3)],
    }
    if alarm_weight is not None:
        service["rabbitmq"] = {"alarm_weight": alarm_weight}
    return config_mod.validate({"services": [service]}).services[0]


def _backend(**kw: object) -> Backend:
    sc = _service(**kw)  # type: ignore[arg-type]
    return Backend.for_service(sc, sc.backends[0], healthy=True)


def _alarm(b: Backend, *kinds: str) -> None:
    assert b.rabbitmq is not None
    b.rabbitmq = replace(b.rabbitmq, alarms=kinds)


def test_without_rabbitmq_or_slow_start_the_weight_is_the_agents() -> None:
    b = _backend()
    assert b.rabbitmq is None
    assert b.effective_weight == 100
    b.agent_percent = 50
    assert b.effective_weight == 50
    assert b.ramp_start is None


@pytest.mark.parametrize(
    ("alarm_weight", "agent", "expected"),
    [(0, None, 0), (25, None, 25), (25, 50, 12), (100, 50, 50), (1, 10, 1), (50, 0, 0)],
)
def test_a_local_alarm_keeps_alarm_weight_percent(alarm_weight: int, agent: int | None, expected: int) -> None:
    b = _backend(alarm_weight=alarm_weight)
    b.agent_percent = agent
    no_alarm = b.effective_weight
    _alarm(b, "memory")
    assert b.effective_weight == expected
    # Never DOWN for an alarm: still usable, just lighter (or, at 0 %, taking nothing new).
    assert b.usable
    assert b.status == ("drain" if expected == 0 else "up")
    _alarm(b)
    assert b.effective_weight == no_alarm


def test_slow_start_ramps_from_the_floor_to_full_weight() -> None:
    b = _backend(slow_start=30.0)
    b.ramp_start = 1000.0
    assert b.effective_weight_at(1000.0) == int(100 * SLOW_START_FLOOR)
    assert b.effective_weight_at(1015.0) == 55
    assert b.effective_weight_at(1029.9) == 99
    assert b.effective_weight_at(1030.0) == 100
    # Multiplies with the agent and the alarm.
    b.agent_percent = 50
    assert b.effective_weight_at(1015.0) == 27
    weights = [b.effective_weight_at(1000.0 + t) for t in range(31)]
    assert weights == sorted(weights)


def test_a_ramping_weight_never_rounds_down_to_zero() -> None:
    b = _backend(slow_start=60.0)
    b.configured_weight = 1
    b.ramp_start = 0.0
    assert b.effective_weight_at(0.0) == 1


def test_the_ramp_ends_and_is_forgotten() -> None:
    b = _backend(slow_start=5.0)
    b.ramp_start = time.monotonic() - 10.0
    assert b.effective_weight == 100
    assert b.ramp_start is None


def test_first_up_after_start_gets_full_weight_a_return_ramps() -> None:
    sc = _service(slow_start=30.0)
    b = Backend.for_service(sc, sc.backends[0], healthy=False)
    # Not checked yet: nothing observed; the first verdict up is the start, not a return.
    assert b.weight == 0
    b.mark_health(True, "ok", time.time())
    assert b.ramp_start is None
    assert b.weight == 100
    b.mark_health(False, "refused", time.time())
    assert b.weight == 0
    b.mark_health(True, "ok", time.time())
    assert b.ramp_start is not None
    assert 0 < b.weight < 100


@pytest.mark.parametrize("state", ["drain", "maint"])
def test_back_to_ready_from_drain_or_maint_ramps(state: str) -> None:
    b = _backend(slow_start=30.0)
    b.mark_health(True, "ok", time.time())
    b.set_operator_state(state, "backend maint")  # type: ignore[arg-type]
    assert b.weight == 0
    b.set_operator_state("ready", "backend maint")
    assert 0 < b.weight < 100


def test_slow_start_off_never_ramps() -> None:
    b = _backend()
    b.mark_health(True, "ok", time.time())
    b.mark_health(False, "refused", time.time())
    b.mark_health(True, "ok", time.time())
    assert b.ramp_start is None
    assert b.weight == 100


def test_maintenance_takes_no_new_connections_and_is_shown_before_down() -> None:
    b = _backend(slow_start=30.0, alarm_weight=0)
    b.mark_health(True, "ok", time.time())
    assert b.rabbitmq is not None
    b.rabbitmq = replace(b.rabbitmq, maintenance=True, maintenance_detail="drained")
    assert not b.usable
    assert b.weight == 0
    assert b.status == "maintenance"
    # Its AMQP listener is closed, so the health check fails too: the monitor knows why, so maintenance it stays.
    b.mark_health(False, "refused", time.time())
    assert b.status == "maintenance"
    # The operator's own states still go first.
    b.set_operator_state("maint", "backend maint")
    assert b.status == "maint"
    b.set_operator_state("ready", "backend maint")
    b.rabbitmq = replace(b.rabbitmq, maintenance=False)
    assert b.status == "down"
    b.mark_health(True, "ok", time.time())
    assert b.status == "up"
    assert b.ramp_start is not None


def test_a_reload_keeps_the_node_view_and_the_ramp() -> None:
    sc = _service(slow_start=30.0, alarm_weight=10)
    old = Backend.for_service(sc, sc.backends[0], healthy=True)
    _alarm(old, "disk")
    old.ramp_start = 123.0
    new = Backend.for_service(sc, sc.backends[0], healthy=True)
    new.adopt_runtime_state(old)
    assert new.alarms == ("disk",)
    assert new.ramp_start == 123.0


def _pool(balance: str, *, slow_start: float) -> Pool:
    sc = _service(slow_start=slow_start, balance=balance)
    return Pool([Backend.for_service(sc, bc, healthy=True) for bc in sc.backends], sc.balance)


class _Conn:
    backend = None
    bytes_in = bytes_out = 0

    def close(self, reason: object) -> None:
        pass


@pytest.mark.parametrize(("slow_start", "most"), [(0.0, 40), (300.0, 10)])
def test_least_connections_does_not_flood_a_returning_node_under_slow_start(slow_start: float, most: int) -> None:
    # Two nodes hold 50 connections each; the third comes back with none. Least-connections compares
    # active/weight, so at full weight the empty node takes every new connection; on its ramp (10 % at first)
    # it takes only its share.
    pool = _pool("least-connections", slow_start=slow_start)
    r1, r2, r3 = pool.backends
    for b in (r1, r2):
        for _ in range(50):
            b.opened(_Conn())
    r3.usable_before = False
    r3.observe(time.monotonic())
    counts: Counter[str] = Counter()
    for _ in range(40):
        chosen = pool.choose()
        assert chosen is not None
        chosen.opened(_Conn())
        counts[chosen.name] += 1
    assert counts["rabbit3"] <= most
    assert counts["rabbit3"] >= (40 if slow_start == 0 else 4)


def test_source_hash_sends_a_share_of_clients_to_a_ramping_node() -> None:
    pool = _pool("source-hash", slow_start=300.0)
    r3 = pool.backends[2]
    r3.usable_before = False
    r3.observe(time.monotonic())
    keys = [f"10.0.{i // 256}.{i % 256}".encode() for i in range(3000)]
    counts = Counter(b.name for b in (pool.choose(k) for k in keys) if b is not None)
    # Weight 10 against 100 + 100: about 10/210 of the clients, and never none of them.
    assert 0 < counts["rabbit3"] < 3000 * 0.1
    r3.ramp_start = None
    counts = Counter(b.name for b in (pool.choose(k) for k in keys) if b is not None)
    assert counts["rabbit3"] > 3000 * 0.25

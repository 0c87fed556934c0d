"""Drain deadlines and their cancellation, in a loop but without a broker: without [services.rabbitmq] the closes
are TCP closes, through the same path (rate, counters, reasons) as the broker's."""

from __future__ import annotations

import asyncio
import time

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.steering import Steering
from rabbitproxy.relay.service import Service
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio


class FakeConn:
    def __init__(self, backend: Backend, *, explode: bool = False) -> None:
        self.backend: Backend | None = backend
        self.bytes_in = self.bytes_out = 0
        self.client_src = ("10.0.0.1", 40000)
        self.client_dst = ("10.0.0.2", 5672)
        self.started = time.monotonic()
        self.reason: CloseReason | None = None
        self.explode = explode
        backend.opened(self)

    def close(self, reason: CloseReason) -> None:
        if self.explode:
            raise RuntimeError("a bug in a close")
        self.reason = self.reason or reason
        assert self.backend is not None
        self.backend.closed(self, 0, 0)

    def backend_endpoints(self) -> tuple[tuple[str, int], tuple[str, int]]:
        return ("127.0.0.1", 40001), ("127.0.0.1", 5672)


def _setup() -> tuple[Steering, Service]:
    cfg = config_mod.validate(
        {
            "services": [
                {
                    "name": "amqp",
                    "health_check": {"type": "none"},
                    "backends": [
                        {"name": "rabbit1", "address": "127.0.0.1", "port": 1},
                        {"name": "rabbit2", "address": "127.0.0.1", "port": 2},
                    ],
                }
            ]
        }
    )
    service = Service(cfg.services[0])
    services = {"amqp": service}
    steering = Steering(services)
    steering.service_added(service)
    return steering, service


async def test_at_the_deadline_the_rest_is_closed_with_its_reason() -> None:
    steering, service = _setup()
    r1 = service.pool.by_name["rabbit1"]
    conns = [FakeConn(r1) for _ in range(3)]
    try:
        out = steering.set_state(service, r1, "drain", deadline=0.2)
        assert out == {"closed_connections": 0, "deadline": 0.2}
        assert r1.active == 3 and not r1.usable
        await wait_for(lambda: r1.active == 0, timeout=10, what="closed at the deadline")
        assert {c.reason for c in conns} == {CloseReason.DRAIN_DEADLINE}
        assert steering.stats["amqp"].counts["drain", "tcp"] == 3
        assert steering.deadline_left("amqp", "rabbit1") is None
    finally:
        await steering.stop()


async def test_a_later_state_cancels_the_pending_deadline() -> None:
    steering, service = _setup()
    r1 = service.pool.by_name["rabbit1"]
    conns = [FakeConn(r1) for _ in range(2)]
    try:
        steering.set_state(service, r1, "drain", deadline=0.2)
        left = steering.deadline_left("amqp", "rabbit1")
        assert left is not None and 0 < left <= 0.21
        out = steering.set_state(service, r1, "ready")
        assert out["cancelled"] == "drain deadline"
        await asyncio.sleep(0.5)  # well past the cancelled deadline: nothing may happen, so a wait_for cannot show it
        assert r1.active == 2 and all(c.reason is None for c in conns)
        # A new drain's deadline replaces the old one.
        steering.set_state(service, r1, "drain", deadline=30)
        steering.set_state(service, r1, "drain", deadline=0.1)
        await wait_for(lambda: r1.active == 0, timeout=10, what="closed at the second deadline")
    finally:
        await steering.stop()


async def test_a_deadline_that_fails_is_logged_and_the_next_one_still_works() -> None:
    steering, service = _setup()
    r1 = service.pool.by_name["rabbit1"]
    FakeConn(r1, explode=True)
    try:
        steering.set_state(service, r1, "drain", deadline=0.05)
        await wait_for(lambda: not steering.pending, timeout=10, what="the failed deadline gone")
        r2 = service.pool.by_name["rabbit2"]
        FakeConn(r2)
        steering.set_state(service, r2, "drain", deadline=0.05)
        await wait_for(lambda: r2.active == 0, timeout=10, what="the next deadline closed its connection")
    finally:
        await steering.stop()


async def test_a_removed_service_takes_its_deadlines_with_it() -> None:
    steering, service = _setup()
    r1 = service.pool.by_name["rabbit1"]
    FakeConn(r1)
    steering.set_state(service, r1, "drain", deadline=0.2)
    await steering.service_removed("amqp")
    assert not steering.pending
    await asyncio.sleep(0.4)  # past the deadline: the connection must still be open
    assert r1.active == 1
    await steering.stop()


async def test_maint_without_the_management_api_closes_by_tcp_at_once() -> None:
    steering, service = _setup()
    r1 = service.pool.by_name["rabbit1"]
    conns = [FakeConn(r1) for _ in range(2)]
    try:
        out = steering.set_state(service, r1, "maint")
        assert out == {"closed_connections": 2}
        assert {c.reason for c in conns} == {CloseReason.BACKEND_MAINT}
    finally:
        await steering.stop()

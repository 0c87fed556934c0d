"""The node monitor against fakes of the management API: alarms, maintenance, an API that goes away, our own bugs."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.views import ManagementStatus
from rabbitproxy.control.management import ManagementUnavailable
from rabbitproxy.control.node_monitor import NodeMonitor, alarm_kinds, maintenance_reason
from rabbitproxy.control.supervisor import monitors_for
from rabbitproxy.protocols.management import Alarm, NodeState, Overview, parse_node, parse_overview
from rabbitproxy.relay.service import Service

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "management"


def _fixture(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())["body"]


OVERVIEW = parse_overview(_fixture("overview"))
NODE = parse_node(_fixture("node"))
NODE_ALARM = parse_node(_fixture("node_mem_alarm"))
NAME = OVERVIEW.node


class FakeAPI:
    """Answers like ManagementAPI, from attributes a test sets; an exception there is raised instead."""

    def __init__(self) -> None:
        self.overview_answer: Overview | Exception = OVERVIEW
        self.node_answer: NodeState | Exception = NODE
        self.alarms_answer: tuple[Alarm, ...] | Exception = ()
        self.ready_answer: bool | Exception | None = None
        self.calls: list[str] = []

    def _give(self, what: str, answer: Any) -> Any:
        self.calls.append(what)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def overview(self) -> Overview:
        return self._give("overview", self.overview_answer)  # type: ignore[no-any-return]

    async def node(self, name: str) -> NodeState:
        return self._give(f"node {name}", self.node_answer)  # type: ignore[no-any-return]

    async def local_alarms(self) -> tuple[Alarm, ...]:
        return self._give("local_alarms", self.alarms_answer)  # type: ignore[no-any-return]

    async def ready_to_serve(self) -> bool | None:
        return self._give("ready", self.ready_answer)  # type: ignore[no-any-return]

    def refuse(self) -> None:
        exc = ManagementUnavailable("GET /api/overview: refused", refused=True)
        self.overview_answer = self.node_answer = self.alarms_answer = self.ready_answer = exc

    def time_out(self) -> None:
        exc = ManagementUnavailable("GET /api/overview: no answer within 2 s")
        self.overview_answer = self.node_answer = self.alarms_answer = self.ready_answer = exc


def _service(alarm_weight: int = 0, slow_start: float = 0.0, rabbitmq: bool = True) -> Service:
    sc: dict[str, Any] = {
        "name": "amqp",
        "listen": "127.0.0.1:5673",
        "health_check": {"type": "none"},
        "slow_start": slow_start,
        "backends": [{"name": f"rabbit{i}", "address": "127.0.0.1", "port": 5670 + i} for i in (1, 2, 3)],
    }
    if rabbitmq:
        sc["rabbitmq"] = {"alarm_weight": alarm_weight, "interval": 1.0}
    return Service(config_mod.validate({"services": [sc]}).services[0])


def _monitor(service: Service, own: FakeAPI, peers: list[FakeAPI]) -> NodeMonitor:
    return NodeMonitor("amqp", service.pool.backends[0], own, peers)


# -- the decision, pure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("being_drained", "ready", "own_refused", "peer_running", "checks_down", "maintenance"),
    [
        (None, None, False, None, False, False),  # all well (3.10: no being_drained, no readiness endpoint)
        (True, None, False, None, False, True),  # 4.x says so itself
        (False, False, False, None, False, True),  # the readiness check says no
        (None, True, False, None, False, False),
        # 3.10.8 drain: own listeners closed (management and AMQP, so the health check fails), peers say running.
        (None, None, True, True, True, True),
        # A firewall or a disabled plugin on the management port while AMQP passes its check: no evidence.
        (None, None, True, True, False, False),
        (None, None, False, True, True, False),  # own API timed out (frozen node): not maintenance
        (None, None, True, False, True, False),  # refused and not running: stopped, the health check's business
        (None, None, True, None, True, False),  # refused and no peer could say: unknown, not maintenance
    ],
)
def test_maintenance_decision(
    being_drained: bool | None,
    ready: bool | None,
    own_refused: bool,
    peer_running: bool | None,
    checks_down: bool,
    maintenance: bool,
) -> None:
    reason = maintenance_reason(
        being_drained=being_drained,
        ready=ready,
        own_refused=own_refused,
        peer_running=peer_running,
        checks_down=checks_down,
    )
    assert (reason is not None) == maintenance


def test_alarm_kinds_prefer_the_immediate_check_and_keep_to_the_fixed_set() -> None:
    # The statistics lag: a cleared alarm still shows in /api/nodes for ~10 s, local-alarms is right at once.
    assert alarm_kinds(NAME, NODE_ALARM, ()) == ()
    assert alarm_kinds(NAME, NODE, (Alarm(NAME, "memory"),)) == ("memory",)
    # Without the check (an older release, or it failed) the statistics are what there is.
    assert alarm_kinds(NAME, NODE_ALARM, None) == ("memory",)
    # Another node's alarm, or a resource we do not know, is not this node's local memory/disk alarm.
    assert alarm_kinds(NAME, NODE, (Alarm("other@host", "disk"), Alarm(NAME, "{weird}"))) == ()
    assert alarm_kinds(NAME, NODE, (Alarm(NAME, "disk"), Alarm(NAME, "memory"))) == ("memory", "disk")


# -- the monitor against fakes ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_healthy_node_is_named_once_and_its_figures_shown() -> None:
    service = _service()
    own = FakeAPI()
    monitor = _monitor(service, own, [FakeAPI()])
    b = service.pool.backends[0]
    for _ in range(3):
        await monitor.poll_once()
    view = b.rabbitmq
    assert view is not None
    assert view.node == NAME and view.version == "3.10.8"
    assert view.status is ManagementStatus.OK and view.detail is None
    assert view.alarms == () and not view.maintenance
    assert view.stats is not None and view.stats.fd_total == NODE.fd_total
    assert view.poll_time is not None
    # The overview is read once; the readiness endpoint, missing on 3.10 (None), is not asked again.
    assert own.calls.count("overview") == 1
    assert own.calls.count("ready") == 1
    assert b.status == "up" and b.effective_weight == 100


@pytest.mark.asyncio
async def test_an_alarm_reduces_the_weight_at_once_and_its_end_restores_it() -> None:
    service = _service(alarm_weight=20, slow_start=30.0)
    own = FakeAPI()
    monitor = _monitor(service, own, [])
    b = service.pool.backends[0]
    await monitor.poll_once()
    with capture_logs() as logs:
        own.alarms_answer = (Alarm(NAME, "memory"),)
        await monitor.poll_once()
        await monitor.poll_once()
        assert b.alarms == ("memory",)
        assert b.effective_weight == 20 and b.usable and b.status == "up"
        # Cleared in the check, while the lagging statistics still say memory alarm: the check wins.
        own.alarms_answer = ()
        own.node_answer = NODE_ALARM
        await monitor.poll_once()
    assert b.alarms == ()
    # Back through slow start.
    assert b.ramp_start is not None and b.effective_weight < 100
    events = [e["event"] for e in logs]
    assert events == ["rabbitmq alarm raised", "rabbitmq alarm cleared"]


@pytest.mark.asyncio
async def test_refused_own_api_a_peer_reporting_it_running_and_a_failing_check_is_maintenance() -> None:
    service = _service(slow_start=30.0)
    own, peer_down, peer = FakeAPI(), FakeAPI(), FakeAPI()
    peer_down.time_out()
    # What 3.10.8's peers say of a drained node: running, being_drained null.
    peer.node_answer = replace(NODE, being_drained=None)
    monitor = _monitor(service, own, [peer_down, peer])
    b = service.pool.backends[0]
    b.mark_health(True, "ok", time.time())
    await monitor.poll_once()
    own.refuse()
    with capture_logs() as logs:
        # Only the management port refuses so far (a drain's first moment, or a firewall): no evidence yet.
        await monitor.poll_once()
        view = b.rabbitmq
        assert view is not None and not view.maintenance and view.status is ManagementStatus.UNREACHABLE
        assert b.usable and b.status == "up"
        # The health check fails too (the drain closed the AMQP listener): now the three agree.
        b.mark_health(False, "refused", time.time())
        await monitor.poll_once()
        await monitor.poll_once()
    view = b.rabbitmq
    assert view is not None and view.maintenance and view.status is ManagementStatus.UNREACHABLE
    assert "refused" in (view.detail or "")
    assert not b.usable and b.status == "maintenance"
    # The first peer timed out; the second was asked for this node by name.
    assert f"node {NAME}" in peer.calls
    # Logged once, not per poll.
    assert [e["event"] for e in logs].count("rabbitmq node in maintenance, no new connections") == 1
    assert [e["event"] for e in logs].count("management API unreachable") == 1
    # revive: the node answers again; once the health check is up, the weight ramps.
    own.__init__()  # type: ignore[misc]
    await monitor.poll_once()
    assert not b.in_maintenance and b.status == "down"
    b.mark_health(True, "ok", time.time())
    assert b.status == "up" and b.ramp_start is not None and b.effective_weight < 100


@pytest.mark.asyncio
async def test_a_timeout_or_a_stopped_node_is_not_maintenance_and_never_down_by_itself() -> None:
    service = _service(alarm_weight=0)
    own, peer = FakeAPI(), FakeAPI()
    own.alarms_answer = (Alarm(NAME, "disk"),)
    monitor = _monitor(service, own, [peer])
    b = service.pool.backends[0]
    await monitor.poll_once()
    assert b.alarms == ("disk",) and b.effective_weight == 0
    # Frozen: times out, the peer says running. Not maintenance; the peer's (lagging) figures say no alarm.
    own.time_out()
    await monitor.poll_once()
    assert b.rabbitmq is not None and not b.rabbitmq.maintenance
    assert b.rabbitmq.status is ManagementStatus.UNREACHABLE
    assert b.alarms == ()
    assert b.healthy and b.usable and b.status == "up"
    # Stopped: refused, and the peer says not running.
    own.refuse()
    peer.node_answer = replace(NODE, running=False)
    await monitor.poll_once()
    assert not b.rabbitmq.maintenance and b.status == "up"
    # Nobody answers at all: nothing is known, nothing is kept that would reduce the backend.
    peer.time_out()
    await monitor.poll_once()
    assert b.rabbitmq.status is ManagementStatus.UNREACHABLE and b.rabbitmq.node == NAME
    assert b.usable and b.effective_weight == 100


@pytest.mark.asyncio
async def test_the_overview_is_read_again_after_a_failure() -> None:
    # A node that comes back may have been upgraded: its version must not stay the old one.
    service = _service()
    own = FakeAPI()
    monitor = _monitor(service, own, [])
    await monitor.poll_once()
    own.time_out()
    await monitor.poll_once()
    own.__init__()  # type: ignore[misc]
    own.overview_answer = replace(OVERVIEW, version="3.11.0")
    await monitor.poll_once()
    assert service.pool.backends[0].rabbitmq is not None
    assert service.pool.backends[0].rabbitmq.version == "3.11.0"


@pytest.mark.asyncio
async def test_the_readiness_check_and_being_drained_mean_maintenance() -> None:
    service = _service()
    own = FakeAPI()
    monitor = _monitor(service, own, [])
    b = service.pool.backends[0]
    own.ready_answer = False
    await monitor.poll_once()
    assert b.status == "maintenance"
    own.ready_answer = True
    own.node_answer = replace(NODE, being_drained=True)
    await monitor.poll_once()
    assert b.status == "maintenance"
    own.node_answer = NODE
    await monitor.poll_once()
    assert b.status == "up"


class _Bug(FakeAPI):
    async def node(self, name: str) -> NodeState:
        raise RuntimeError("a bug of ours")


@pytest.mark.asyncio
async def test_a_poll_that_raises_is_an_error_logged_once_and_the_monitor_carries_on() -> None:
    service = _service(alarm_weight=0)
    own = FakeAPI()
    own.alarms_answer = (Alarm(NAME, "memory"),)
    monitor = _monitor(service, own, [])
    b = service.pool.backends[0]
    await monitor.poll_once()
    assert b.effective_weight == 0
    monitor.own = _Bug()
    with capture_logs() as logs:
        await monitor.poll_once()
        await monitor.poll_once()
    assert b.rabbitmq is not None and b.rabbitmq.status is ManagementStatus.ERROR
    assert "a bug of ours" in (b.rabbitmq.detail or "")
    # No stale alarm keeps the weight down while nothing fresh is known.
    assert b.effective_weight == 100
    errors = [e for e in logs if e["event"] == "node monitor poll failed unexpectedly"]
    assert len(errors) == 1 and isinstance(errors[0]["exc_info"], RuntimeError)
    monitor.own = own
    await monitor.poll_once()
    assert b.rabbitmq.status is ManagementStatus.OK


def test_without_rabbitmq_no_monitor_and_no_node_view() -> None:
    service = _service(rabbitmq=False)
    b = service.pool.backends[0]
    assert b.rabbitmq is None
    kinds = [kind for kind, _ in monitors_for(service, b, None)]
    assert "node monitor" not in kinds


@pytest.mark.asyncio
async def test_with_rabbitmq_one_node_monitor_per_backend() -> None:
    from rabbitproxy.config import RabbitMQConfig
    from rabbitproxy.control.management import session_for

    service = _service()
    async with session_for(RabbitMQConfig()) as session:
        for b in service.pool.backends:
            assert [k for k, _ in monitors_for(service, b, session)] == ["node monitor"]

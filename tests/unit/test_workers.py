"""``workers = N`` without processes: the channel's codec, the backend state snapshot, limits and counters."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.balancing.snapshot import FIELDS, apply_backend_state, backend_state, pool_state, state_changes
from rabbitproxy.balancing.views import NodeView
from rabbitproxy.config import BackendConfig, ConfigError
from rabbitproxy.control.channel import MAX_FRAME, ChannelError, Decoder, encode
from rabbitproxy.control.closer import CloseStats
from rabbitproxy.control.worker import share_limits, worker_ids
from rabbitproxy.control.worker_views import Tally, counters_of, write_figures
from rabbitproxy.control.worker_views import add_counts as _add
from rabbitproxy.control.worker_watch import HUNG_AFTER, START_TIMEOUT, WATCH_EVERY, stalled, verdict
from rabbitproxy.control.workers import ID_BLOCK
from tests.support.proxy import make_service

SERVICE = {"name": "amqp", "listen": "127.0.0.1:5672", "backends": [{"name": "b1", "address": "127.0.0.1"}]}


# -- the codec -----------------------------------------------------------------------------------------------------


def test_messages_survive_any_cut() -> None:
    messages = [{"t": "state", "services": {"amqp": {"b1": [True, None]}}}, {"t": "stats", "n": 1}, {"re": 7}]
    wire = b"".join(encode(m) for m in messages)
    for step in (1, 3, 7, len(wire)):
        decoder = Decoder()
        got: list[dict[str, Any]] = []
        for i in range(0, len(wire), step):
            got.extend(decoder.feed(wire[i : i + step]))
        assert got == messages


def test_a_frame_over_the_limit_ends_the_channel_before_it_is_buffered() -> None:
    decoder = Decoder()
    with pytest.raises(ChannelError, match="over the"):
        list(decoder.feed(struct.pack(">I", MAX_FRAME + 1)))


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json"])
def test_a_frame_that_is_not_a_json_object_is_an_error(body: bytes) -> None:
    with pytest.raises(ChannelError):
        list(Decoder().feed(struct.pack(">I", len(body)) + body))


# -- the backend state snapshot ------------------------------------------------------------------------------------


def backend(**kw: Any) -> Backend:
    return Backend(BackendConfig(name="b1", address="127.0.0.1"), 5672, healthy=True, **kw)


def test_a_snapshot_copies_every_steering_field() -> None:
    parent = backend(slow_start=30.0, rabbitmq=NodeView())
    parent.healthy = False
    parent.health_time = 12.0
    parent.operator_state = "drain"
    parent.agent_state = "maint"
    parent.agent_percent = 50
    parent.agent_down = "stopped"
    parent.set_weight(7)
    parent.ramp_start = 99.0
    parent.rabbitmq = NodeView(alarms=("memory",), maintenance=True)
    worker = backend(slow_start=30.0, rabbitmq=NodeView())
    apply_backend_state(worker, backend_state(parent))
    for name in FIELDS:
        assert getattr(worker, name) == getattr(parent, name), name
    assert worker.rabbitmq is not None
    assert (worker.rabbitmq.alarms, worker.rabbitmq.maintenance) == (("memory",), True)
    assert worker.effective_weight_at(100.0) == parent.effective_weight_at(100.0)


def test_apply_says_what_the_worker_must_close() -> None:
    worker = backend()
    up = backend_state(worker)
    maint = backend()
    maint.operator_state = "maint"
    change = apply_backend_state(worker, backend_state(maint))
    assert (change.entered_maint, change.marked_down, change.unusable) == (True, False, True)
    apply_backend_state(worker, up)
    down = backend()
    down.healthy = False
    change = apply_backend_state(worker, backend_state(down))
    assert (change.entered_maint, change.marked_down, change.unusable) == (False, True, True)
    # The same state again changes nothing, so nothing is closed twice.
    change = apply_backend_state(worker, backend_state(down))
    assert (change.entered_maint, change.marked_down, change.unusable) == (False, False, False)


@pytest.mark.parametrize("bad", [[True], [*backend_state(backend())[:3], "nonsense", *backend_state(backend())[4:]]])
def test_a_bad_snapshot_changes_nothing(bad: list[Any]) -> None:
    worker = backend()
    before = backend_state(worker)
    with pytest.raises(ValueError):
        apply_backend_state(worker, bad)
    assert backend_state(worker) == before


# -- configuration -------------------------------------------------------------------------------------------------


def test_workers_is_a_number_or_auto() -> None:
    assert config_mod.validate({"services": [SERVICE]}).worker_count == 1
    assert config_mod.validate({"workers": 3, "services": [SERVICE]}).worker_count == 3
    auto = config_mod.validate({"workers": "auto", "services": [SERVICE]})
    assert auto.worker_count == len(os.sched_getaffinity(0))
    for bad in (0, "many", 1.5):
        with pytest.raises(ConfigError, match="workers"):
            config_mod.validate({"workers": bad, "services": [SERVICE]})


def test_max_connections_is_shared_out_rounding_up() -> None:
    service = dict(SERVICE, max_connections=10, backends=[{"name": "b1", "address": "h", "max_connections": 5}])
    shared = share_limits(config_mod.validate({"workers": 4, "services": [service]}), 4)
    assert shared.services[0].max_connections == 3
    assert shared.services[0].backends[0].max_connections == 2
    rmq = dict(service, rabbitmq={"close_rate": 10.0})
    assert share_limits(config_mod.validate({"services": [rmq]}), 4).services[0].rabbitmq.close_rate == 2.5  # type: ignore[union-attr]
    # 0 is "no limit" and stays so.
    unlimited = config_mod.validate({"workers": 4, "services": [SERVICE]})
    assert share_limits(unlimited, 4).services[0].backends[0].max_connections == 0


# -- counters ------------------------------------------------------------------------------------------------------


def test_the_parent_connection_tally_counts_but_holds_nothing() -> None:
    tally = Tally(3)
    assert len(tally) == 3 and tally and list(tally) == []
    assert not Tally(0)


def stats(active: int, total: int, ended: dict[str, int], hold: int = 0, closed: int = 0) -> dict[str, Any]:
    """A worker's ``stats`` message (control.worker.Worker.stats) for service amqp and its backend b1."""
    counters = {
        "total": total,
        "ended": ended,
        "close_timeouts": 0,
        "failed_logins": 1,
        "handshakes_given_up": 0,
        "closed": {"drain/tcp": closed},
        "backends": {"b1": [total, 0, 10, 20]},
    }
    gauges = {"active": active, "vhost_open": {"/": active}, "backends": {"b1": [active, hold]}}
    return {"t": "stats", "services": {"amqp": {"counters": counters, "gauges": gauges}}}


def test_counters_add_up_over_workers() -> None:
    total = _add(counters_of(stats(1, 5, {"client closed": 4})), counters_of(stats(2, 3, {"client closed": 1})))
    s = total["amqp"]
    assert (s["total"], s["failed_logins"]) == (8, 2)
    assert s["ended"] == {"client closed": 5}
    assert s["backends"]["b1"] == [8, 0, 20, 40]
    assert _add({}, counters_of(stats(1, 1, {})))["amqp"]["total"] == 1


def test_a_dead_workers_gauges_leave_the_sum_and_its_counters_stay() -> None:
    # Issue 25, item 8: the open-vhost gauge of a dead worker stayed in the parent's sum for ever.
    service = make_service([{"name": "b1", "address": "127.0.0.1"}])
    closed: dict[str, CloseStats] = {}
    running: tuple[dict[str, Any], dict[str, Any]] = ({}, stats(2, 5, {"client closed": 3}, hold=1, closed=4))
    dead_base = counters_of(stats(7, 9, {"client closed": 2}, closed=1))
    holds = write_figures({"amqp": service}, closed, [running, (dead_base, {})])
    # Gauges: the running worker's only.
    assert service.active == 2 and service.vhost_open == {"/": 2}
    assert service.pool.by_name["b1"].active == 2
    # Counters: the running worker's and what the dead one had counted.
    assert (service.total, service.ended) == (14, {"client closed": 5})
    # What the workers closed and hold is the parent's to report (issue 25, item 6).
    assert closed["amqp"].counts == {("drain", "tcp"): 5}
    assert holds == {("amqp", "b1"): 1} and service.pool.by_name["b1"].rebalance_hold


def test_a_health_check_that_changes_no_verdict_changes_no_state_to_push() -> None:
    # Issue 25, item 10: the check's wall-clock time was in the snapshot, so every check pushed every state.
    b = backend()
    b.mark_health(True, "ok", 100.0)
    before = pool_state([b])
    b.mark_health(True, "ok", 101.0)
    assert pool_state([b]) == before
    other = Backend(BackendConfig(name="b2", address="127.0.0.1"), 5672, healthy=True)
    old = {"amqp": pool_state([b]) | {"b2": backend_state(other)}}
    b.operator_state = "drain"
    new = {"amqp": pool_state([b]) | {"b2": backend_state(other)}}
    assert state_changes(old, new) == {"amqp": {"b1": backend_state(b)}}
    assert state_changes(new, new) == {}
    assert state_changes(None, new) == new


def test_a_worker_reserves_each_block_of_ids_before_it_uses_one() -> None:
    # Issue 25, item 9: the parent starts a replacement past every id its predecessor reserved.
    reserved: list[int] = []
    ids = worker_ids(2, 3, reserved.append)
    first = [next(ids) for _ in range(ID_BLOCK + 1)]
    assert first[:3] == [2, 5, 8] and len(set(first)) == len(first)
    assert all((i - 2) % 3 == 0 for i in first)
    assert reserved == [2 + ID_BLOCK * 3, 2 + 2 * ID_BLOCK * 3]
    assert max(first[:ID_BLOCK]) < reserved[0] <= first[ID_BLOCK]


def test_a_verdict_in_the_parent_counts_the_workers_connections_it_ends() -> None:
    # The parent's Backend holds a Tally (the workers' count, no connections); marking it down or in maint must
    # report how many connections that ends in the workers, not 0 (the "backend down" log line says so).
    backend = Backend(BackendConfig(name="a", address="127.0.0.1"), 5672, healthy=True)
    backend.connections = Tally(3)
    assert backend.close_connections(CloseReason.BACKEND_DOWN) == 3


def test_a_worker_silent_past_the_limit_is_hung_and_a_stalled_parent_judges_nobody() -> None:
    # Issue 25, item 3 (the real SIGSTOP is in tests/integration/test_workers.py).
    assert verdict(ready=True, now=100.0, last_seen=100.0 - HUNG_AFTER / 2, launched=0.0) is None
    assert verdict(ready=True, now=100.0, last_seen=100.0 - HUNG_AFTER - 0.1, launched=0.0) == "hung"
    assert verdict(ready=False, now=100.0, last_seen=0.0, launched=100.0 - START_TIMEOUT / 2) is None
    assert verdict(ready=False, now=100.0, last_seen=0.0, launched=100.0 - START_TIMEOUT - 1) == "start-timeout"
    assert not stalled(10.0, 10.0 + WATCH_EVERY * 1.5)
    assert stalled(10.0, 10.0 + WATCH_EVERY + HUNG_AFTER)

"""The fault-injection harness's pure parts: the proxies' configs, the recovery time, the counting, the report.

The harness itself runs against real brokers: tests/integration/test_faults_quick.py.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from rabbitproxy import config as config_mod
from tests.support.bench import BENCH

assert BENCH.is_dir()

import fault_alarm  # noqa: E402
import fault_clients  # noqa: E402
import fault_report  # noqa: E402
import fault_targets  # noqa: E402
import faults  # noqa: E402

BACKENDS = [(5001, 3331), (5002, 3332), (5003, 3333)]


def test_rabbitproxy_config_checks_closes_and_asks_the_agents() -> None:
    checks = fault_targets.Checks(interval=1.5, fall=3, rise=2)
    cfg = config_mod.validate(tomllib.loads(fault_targets.rabbitproxy_config(15672, 19080, BACKENDS, checks)))
    (service,) = cfg.services
    assert (service.listen_host, service.listen_port) == ("127.0.0.1", 15672)
    assert service.health_check.type == "amqp"
    assert (service.health_check.interval, service.health_check.fall, service.health_check.rise) == (1.5, 3, 2)
    assert service.health_check.on_marked_down == "close"
    assert service.feedback.type == "agent"
    assert [(b.name, b.port, b.agent_port) for b in service.backends] == [
        ("rabbit1", 5001, 3331),
        ("rabbit2", 5002, 3332),
        ("rabbit3", 5003, 3333),
    ]
    assert cfg.admin.enabled and cfg.admin.listen == "127.0.0.1:19080"
    assert cfg.worker_count == 1
    two = config_mod.validate(tomllib.loads(fault_targets.rabbitproxy_config(15672, 19080, BACKENDS, checks, 2)))
    assert two.worker_count == 2


def test_haproxy_config_has_the_same_checks_and_outlasts_heartbeats() -> None:
    checks = fault_targets.Checks(interval=1.5, fall=3, rise=2, heartbeat=10)
    text = fault_targets.haproxy_config(15672, Path("/tmp/x.sock"), BACKENDS, checks)
    assert "check inter 1500 fall 3 rise 2 on-marked-down shutdown-sessions agent-check" in text
    assert "    server rabbit2 127.0.0.1:5002 agent-port 3332" in text
    assert "stats socket /tmp/x.sock mode 600 level admin" in text
    # Idle AMQP connections send a heartbeat every 10 s; shorter timeouts would cut healthy connections.
    assert "timeout client 30s" in text and "timeout server 30s" in text
    # As an operator writes it for AMQP: a short hard-stop-after cut every connection a few seconds after a reload.
    assert "hard-stop-after" not in text


def test_split_deals_every_role_once() -> None:
    load = fault_clients.ClientLoad(publishers=4, consumers=2, processes=2)
    parts = fault_clients.split(load)
    assert sorted(p for pubs, _ in parts for p in pubs) == [0, 1, 2, 3]
    assert sorted(c for _, cons in parts for c in cons) == [0, 1]
    assert len(parts) == 2


def drain_over(now: float, **kw: Any) -> bool:
    args: dict[str, Any] = {
        "stopped_at": 100.0,
        "last_delivery": 101.0,
        "publishers_left": 0,
        "ready_messages": 0,
        "consumers_on_queue": 2,
        "load": fault_clients.ClientLoad(consumers=2, idle=2.0, drain_limit=90.0),
    }
    return fault_clients.drain_over(now, **(args | kw))


def test_the_drain_ends_once_the_queue_is_settled_and_quiet() -> None:
    assert not drain_over(102.5)
    assert drain_over(103.5)


def test_the_drain_waits_for_anything_that_may_still_arrive() -> None:
    # A publisher still waiting for confirms may yet add a confirmed message.
    assert not drain_over(150.0, publishers_left=1)
    # Ready messages, or a queue that could not be asked.
    assert not drain_over(150.0, ready_messages=3)
    assert not drain_over(150.0, ready_messages=None)
    # A consumer that is not ours: a stale one on a dead connection, whose unacked deliveries come back.
    assert not drain_over(150.0, consumers_on_queue=3)
    assert not drain_over(150.0, consumers_on_queue=None)
    # But not for ever: what is left is reported as left in the queue.
    assert drain_over(190.5, ready_messages=3)


def steady(start: int, end: int, rate: int = 10) -> dict[int, int]:
    return dict.fromkeys(range(start, end), rate)


def test_recovery_is_zero_without_a_dip() -> None:
    assert faults.recovery_seconds(steady(100, 140), warm=100.0, fault=110.0, until=140.0) == 0.0


def test_recovery_ends_when_the_rate_is_back() -> None:
    timeline = steady(100, 140)
    for s in range(110, 116):
        timeline[s] = 0
    # Windows of three seconds: the one starting at 116 is the first without a gap.
    assert faults.recovery_seconds(timeline, warm=100.0, fault=110.0, until=140.0) == 6.0


def test_recovery_that_never_comes_counts_until_the_end() -> None:
    timeline = steady(100, 110)
    assert faults.recovery_seconds(timeline, warm=100.0, fault=110.0, until=140.0) == 30.0


def test_recovery_without_a_baseline_is_unknown() -> None:
    assert math.isnan(faults.recovery_seconds({}, warm=100.0, fault=110.0, until=140.0))


def result(confirmed: list[int], delivered: list[list[int]], deliveries: int) -> dict[str, Any]:
    return {
        "confirmed": confirmed,
        "timelines": [steady(100, 130)],
        "delivered": delivered,
        "deliveries": deliveries,
        "reconnects": 1,
        "errors": {"ChannelInvalidStateError": 2},
    }


def summarize(results: list[dict[str, Any]], workers: int = 2) -> dict[str, Any]:
    return faults.summarize_run(
        results,
        scenario="kill",
        target="rabbitproxy",
        queue_type="quorum",
        marks={"warm": 100.0, "fault": 110.0, "stop": 130.0},
        workers=workers,
        during=None,
        after=0,
        in_queue=0,
        proxy_errors=[],
        restarts=0,
    )


def test_summary_counts_lost_duplicates_and_unconfirmed() -> None:
    row = summarize(
        [
            result([1, 2, 3], [[1, 2], [2, 7]], deliveries=5),
            result([4, 5], [[4]], deliveries=1),
        ]
    )
    assert row["complete"]
    assert row["confirmed"] == 5
    # 3 and 5 were confirmed and never delivered; 7 was delivered without a confirm (a publish whose ack was lost).
    assert (row["lost"], row["lost_sample"]) == (2, [3, 5])
    assert row["duplicates"] == 6 - 4
    assert row["unconfirmed_delivered"] == 1
    assert row["reconnects"] == 2
    assert row["client_errors"] == {"ChannelInvalidStateError": 4}
    assert row["recovery_median_s"] == 0.0
    assert row["rate"]["0"] == 20


def test_a_missing_or_failed_worker_makes_the_run_incomplete() -> None:
    assert not summarize([result([1], [[1]], 1)], workers=2)["complete"]
    row = summarize([result([1], [[1]], 1), {"failed": "OSError: boom"}])
    assert not row["complete"]
    assert row["worker_failures"] == ["OSError: boom"]


def test_summary_lines_name_losses_and_slower_recoveries() -> None:
    base = {"complete": True, "queue_type": "quorum", "confirmed": 100, "lost": 0}
    rows = [
        {**base, "scenario": "kill", "target": "rabbitproxy", "recovery_worst_s": 9.0},
        {**base, "scenario": "kill", "target": "haproxy", "recovery_worst_s": 4.0, "lost": 3},
    ]
    lines = fault_report.summary_lines(rows)
    assert lines[0].startswith("- **rabbitproxy**: 0 of 100 confirmed")
    assert "kill (quorum): 3" in lines[1]
    assert "kill (quorum: 9 s vs 4 s)" in lines[2]


def test_render_names_every_scenario_and_what_was_not_done() -> None:
    row = summarize([result([1, 2], [[1, 2]], 2), result([3], [[3]], 1)])
    data = {
        "started_at": "2026-11-30 21:00:00 UTC",
        "minutes": 1.0,
        "mode": "quick",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "kernel": "6",
            "python": "3.11",
            "rabbitmq": "3.10.8",
            "haproxy": "2.6.12",
            "load_average_at_start": [1.0, 1.0, 1.0],
        },
        "load_average_at_end": [2.0, 2.0, 2.0],
        "settings": {
            "load": vars(fault_clients.ClientLoad()) | {},
            "timing": vars(faults.Timing()) | {},
            "checks": vars(fault_targets.Checks()) | {},
            "faulted_node": 1,
            "scenarios": {"kill": "node SIGKILLed, restarted"},
            "hold": {"kill": 3.0},
            "not_done": faults.NOT_DONE,
        },
        "rows": [row],
    }
    text = fault_report.render(data, "reliability.png")
    assert "| node SIGKILLed, restarted | rabbitproxy | 3 | 0 |" in text
    assert "network namespace" in text
    assert "![confirmed messages per second around each fault](reliability.png)" in text


def test_chart_seconds_include_gaps_and_drop_partial_ends() -> None:
    assert fault_report.rate_seconds({"-3": 5, "-2": 25, "0": 25, "4": 25, "5": 3}) == [-2, -1, 0, 1, 2, 3, 4]
    assert fault_report.rate_seconds({}) == []


def test_a_dip_long_after_the_fault_is_not_the_fault() -> None:
    timeline = steady(100, 160)
    for s in range(140, 144):
        timeline[s] = 0
    assert faults.recovery_seconds(timeline, warm=100.0, fault=110.0, until=160.0, released=120.0) == 0.0
    # Without the release time it counts, as before.
    assert faults.recovery_seconds(timeline, warm=100.0, fault=110.0, until=160.0) == 34.0


def test_rescore_recomputes_recovery_from_stored_rates() -> None:
    rates = {str(s): 10 for s in range(-10, 20)} | {"0": 0, "1": 0, "2": 0}
    row = {"marks": {"warm": -10.0, "fault": 0.0, "released": 1.0, "stop": 20.0}, "publisher_rates": [rates]}
    out = faults.rescore(row)
    assert out["recovery_per_publisher_s"] == [3.0]
    assert out["recovery_median_s"] == out["recovery_worst_s"] == 3.0


def test_a_scheduling_hiccup_is_not_a_dip() -> None:
    timeline = steady(100, 140)
    timeline[115] = 6
    assert faults.recovery_seconds(timeline, warm=100.0, fault=110.0, until=140.0, released=130.0) == 0.0


class FakeNode:
    def __init__(self, name: str, amqp_port: int) -> None:
        self.name = name
        self.amqp_port = amqp_port


class FakeCluster:
    nodes = [FakeNode("rp1@localhost", 5001), FakeNode("rp2@localhost", 5002)]

    def list_connections(self, *fields: str) -> list[dict[str, str]]:
        assert fields == ("client_properties", "port")
        return [
            {"client_properties": '[["connection_name","longstr","faults-pub-12"]]', "port": "5002"},
            {"client_properties": '[["connection_name","longstr","faults-con-0"]]', "port": "5001"},
            {"client_properties": '[["product","longstr","other"]]', "port": "5001"},
        ]


def test_client_placement_names_each_harness_connection_and_its_node() -> None:
    placement = faults.client_placement(FakeCluster())  # type: ignore[arg-type]
    assert placement == {"faults-con-0": "rp1@localhost", "faults-pub-12": "rp2@localhost"}


def test_rows_of_each_worker_count_are_named_and_summed_apart() -> None:
    base = {"complete": True, "lost": 0, "confirmed": 10, "recovery_worst_s": 3.0, "queue_type": "quorum"}
    rows = [
        {**base, "scenario": "alarm", "target": "rabbitproxy", "proxy_workers": 1, "reconnects": 0},
        {**base, "scenario": "alarm", "target": "rabbitproxy", "proxy_workers": 2, "reconnects": 0, "lost": 2},
        {**base, "scenario": "alarm", "target": "haproxy", "reconnects": 1},
    ]
    assert [fault_report.label(r) for r in rows] == ["rabbitproxy", "rabbitproxy, workers = 2", "haproxy"]
    lines = fault_report.summary_lines(rows)
    assert lines[0].startswith("- **rabbitproxy**: 0 of 10")
    assert lines[1].startswith("- **rabbitproxy, workers = 2**: 2 of 10") and "alarm (quorum): 2" in lines[1]
    assert lines[2].startswith("- **haproxy**: 0 of 10")
    assert lines[-1] == (
        "- Connections cut during the memory alarm (client reconnects): rabbitproxy (quorum): 0,"
        " rabbitproxy, workers = 2 (quorum): 0, haproxy (quorum): 1."
    )


def test_the_bulk_publishers_heartbeat_would_time_out_within_the_hold_but_the_client_would_not() -> None:
    for hold in (10.0, 30.0):
        beat = fault_alarm.heartbeat_for(hold)
        assert 2.5 * beat < hold, "a proxy counting the blocked client's silence must cut it within the hold"
        assert 3 * (beat + 1) > hold, "aiormq must not give up on its unwritable connection within the hold"


def test_a_scenario_run_again_replaces_its_rows_and_says_so() -> None:
    def row(scenario: str, target: str = "haproxy", **extra: Any) -> dict[str, Any]:
        return {"scenario": scenario, "queue_type": "quorum", "target": target, **extra}

    first = {
        "rows": [row("kill"), row("alarm", old=True), row("alarm", "rabbitproxy", proxy_workers=2)],
        "started_at": "a",
        "minutes": 1,
    }
    again = {"rows": [row("alarm")], "started_at": "b", "minutes": 2}
    out = fault_report.merge(first, again, "the harness was fixed")
    assert out["rows"] == [row("kill"), row("alarm", "rabbitproxy", proxy_workers=2), row("alarm")]
    assert out["merged"][0]["scenarios"] == ["alarm (haproxy, quorum)"]
    assert "rows alarm (haproxy, quorum) come from a later run of just those, started b (2 min)" in "".join(
        fault_report._merged(out)
    )

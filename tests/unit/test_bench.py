"""The bench's pure parts: statistics, generated proxy configs, output parsers, target checks.

That HAProxy and nginx accept the configs the bench writes runs their binaries: tests/integration/test_bench_configs.py.
"""

from __future__ import annotations

import math
import tomllib
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from tests.support.bench import ROUTES, amqp_bench, common, idle_bench, placement, report, tcp_bench


def test_median_and_percentile() -> None:
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert common.median([math.nan, 5.0]) == 5.0
    assert math.isnan(common.median([]))
    values = [float(i) for i in range(1, 101)]
    assert common.percentile(values, 50) == 50.0
    assert common.percentile(values, 99) == 99.0
    assert common.percentile(values, 100) == 100.0
    assert common.percentile([7.0], 99.9) == 7.0
    with pytest.raises(ValueError, match=r"0\.\.100"):
        common.percentile(values, 101)


def test_ratio_and_interleave() -> None:
    assert common.ratio(3.0, 2.0) == 1.5
    assert math.isnan(common.ratio(1.0, 0.0))
    assert math.isnan(common.ratio(math.nan, 1.0))
    assert common.interleave(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]


def test_rabbitproxy_config_is_valid_and_equivalent() -> None:
    cfg = config_mod.validate(tomllib.loads(common.rabbitproxy_config(ROUTES, log_level="info")))
    assert [s.name for s in cfg.services] == ["amqp", "echo"]
    assert [(s.listen_host, s.listen_port) for s in cfg.services] == [("127.0.0.1", 15672), ("127.0.0.1", 15673)]
    assert [(b.address, b.port) for b in cfg.services[0].backends] == [("127.0.0.1", 5001), ("127.0.0.1", 5002)]
    assert cfg.services[0].health_check.type == "none"
    # The echo route is plain TCP, relayed as HAProxy's mode tcp does; the AMQP route has its handshake read.
    assert [s.protocol for s in cfg.services] == ["amqp", "tcp"]
    assert cfg.log.level == "info"
    assert cfg.admin.enabled is False


def test_the_scaling_targets_configure_workers_and_threads() -> None:
    two = config_mod.validate(tomllib.loads(common.rabbitproxy_config(ROUTES, workers=2)))
    assert two.worker_count == 2
    assert "workers" not in common.rabbitproxy_config(ROUTES)
    assert "    nbthread 2\n" in common.haproxy_config(ROUTES, nbthread=2)
    assert "nbthread" not in common.haproxy_config(ROUTES)


def test_the_scaling_section_compares_two_with_one_and_projects() -> None:
    def row(rate: float) -> dict[str, float]:
        return {"conn_client_close_s": rate, "conn_server_close_s": rate}

    runs = {t: [{"cpu_s": 1.0, "ok": 10000.0}] for t in tcp_bench.SCALING}
    doc = {
        "summary": {"rabbitproxy-w1": row(4000.0), "rabbitproxy-w2": row(6000.0), "haproxy-nbthread1": row(10000.0),
                    "haproxy-nbthread2": row(12000.0)},
        "settings": {"duration_s": 2.0, "scaling": {"note": "shared cores"}},
        "raw": {"conn_client_close": runs},
    }  # fmt: skip
    text = "\n".join(report.scaling_section(doc))
    assert "rabbitproxy 1.50 x, HAProxy 1.20 x" in text
    assert "| rabbitproxy-w2 | 6,000 | 6,000 | 100 | 50% |" in text
    assert "What N cores should give" in text and "Shared cores." in text
    assert report.scaling_section({"summary": {"rabbitproxy": row(1.0)}, "settings": {"duration_s": 2.0}}) == []


SOCKPERF = """sockperf: Summary: Round trip is 8.137 usec
sockperf: ---> <MAX> observation = 64016.664
sockperf: ---> percentile 99.999 = 26461.261
sockperf: ---> percentile 99.900 =  623.457
sockperf: ---> percentile 99.000 =    6.224
sockperf: ---> percentile 50.000 =    4.538
sockperf: ---> <MIN> observation =    4.179
"""


def test_parse_sockperf() -> None:
    out = tcp_bench.parse_sockperf(SOCKPERF)
    assert out == {
        "p99.999": 26461.261,
        "p99.9": 623.457,
        "p99": 6.224,
        "p50": 4.538,
        "max": 64016.664,
        "min": 4.179,
    }
    with pytest.raises(ValueError, match="no percentiles"):
        tcp_bench.parse_sockperf("sockperf: connection refused")


def test_parse_iperf3() -> None:
    doc = '{"end": {"sum_received": {"bytes": 2000000000, "bits_per_second": 8000000000.0}}}'
    assert tcp_bench.parse_iperf3(doc) == {"bytes": 2e9, "gbit_s": 8.0}
    with pytest.raises(ValueError, match="iperf3: busy"):
        tcp_bench.parse_iperf3('{"error": "busy"}')


def test_tcp_summary_added_latency_is_against_direct() -> None:
    raw = {
        "lat64": {
            "direct": [{"p50": 5.0, "p99": 9.0}, {"p50": 7.0, "p99": 11.0}],
            "haproxy": [{"p50": 20.0, "p99": 40.0}],
        },
        "bulk1": {"haproxy": [{"gbit_s": 2.0, "cpu_s_per_gb": 0.5}]},
    }
    s = tcp_bench.summarize(raw, ["direct", "haproxy"])
    assert s["direct"]["lat64_p50_us"] == 6.0
    assert s["haproxy"]["lat64_p50_added_us"] == 14.0
    assert s["haproxy"]["lat64_p99_added_us"] == 30.0
    assert s["haproxy"]["bulk1_gbit_s"] == 2.0
    assert math.isnan(s["direct"]["bulk1_gbit_s"])


def test_plan_alternates_roles_and_places_the_kth_connection_on_node_k_mod_n() -> None:
    clients = placement.plan(publishers=3, consumers=2, nodes=3, tag="t")
    assert [(c.seq, c.role, c.index, c.node) for c in clients] == [
        (0, "pub", 0, 0),
        (1, "con", 0, 1),
        (2, "pub", 1, 2),
        (3, "con", 1, 0),
        (4, "pub", 2, 1),
    ]
    assert clients[3].name == "rabbitproxy-bench-t-3-con1"
    assert {c.node for c in placement.plan(4, 4, nodes=1)} == {0}


def test_align_count_moves_a_round_robin_pointer_to_node_0() -> None:
    # The probe landed on `landed`; after align_count more picks, the next pick is node 0.
    for nodes in (1, 2, 3, 5):
        for landed in range(nodes):
            assert (landed + placement.align_count(landed, nodes) + 1) % nodes == 0
    assert placement.align_count(2, 3) == 0
    assert placement.align_count(0, 3) == 2


def test_split_clients_deals_the_plan_out_round_robin() -> None:
    clients = placement.plan(4, 4, nodes=3)
    shares = amqp_bench.split_clients(clients, 3)
    assert [[c.seq for c in share] for share in shares] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert len(amqp_bench.split_clients(placement.plan(1, 0, nodes=3), 4)) == 1


def test_placement_summary_says_where_each_role_landed_and_whether_as_planned() -> None:
    brokers = [("127.0.0.1", 5001), ("127.0.0.1", 5002)]
    clients = placement.plan(2, 1, nodes=2, tag="x")
    listed = [
        {"name": clients[0].name, "port": 5001},
        {"name": clients[1].name, "port": 5002},
        {"name": clients[2].name, "port": 5002},  # planned for broker 0
        {"name": "rabbitproxy-bench-y-0-pub0", "port": 5001},  # another run's
        {"name": "", "port": 5001},  # an unnamed client
    ]
    where = placement.landed(listed, brokers, "rabbitproxy-bench-x-")
    assert where == {clients[0].name: 0, clients[1].name: 1, clients[2].name: 1}
    summary = placement.summarize(clients, where, nodes=2)
    assert summary["per_node"] == [{"pub": 1}, {"con": 1, "pub": 1}]
    assert summary["off_plan"] == 1
    assert summary["as_planned"] is False
    assert placement.placement_text(summary) == "n1: 1 pub; n2: 1 con 1 pub (1 off plan, 0 not seen)"
    exact = placement.summarize(clients[:2], where, nodes=2)
    assert exact["as_planned"] is True
    assert placement.placement_text(exact).endswith("(as planned)")
    missing = placement.summarize(clients, {}, nodes=2)
    assert missing["missing"] == 3
    assert missing["as_planned"] is False


def test_report_shows_placement_per_amqp_target() -> None:
    as_planned = {"per_node": [{"pub": 1}, {"con": 1}], "as_planned": True, "off_plan": 0, "missing": 0}
    doc = {
        "raw": {
            "direct": [{"placement": as_planned}, {"placement": as_planned}],
            "haproxy": [{"placement": as_planned}, {"placement": {**as_planned, "as_planned": False, "off_plan": 1}}],
            "rabbitproxy": [{"placement": {}}],
        }
    }
    assert report.placement_rows(doc) == [
        ["direct", "n1: 1 pub; n2: 1 con (as planned)", "2 of 2"],
        ["haproxy", "n1: 1 pub; n2: 1 con (as planned)", "1 of 2"],
        ["rabbitproxy", "not read", "n/a"],
    ]


def test_amqp_summary_counts_runs_placed_as_planned() -> None:
    runs = [
        {"consumed_per_s": 10.0, "placement": {"as_planned": True}},
        {"consumed_per_s": 20.0, "placement": {"as_planned": False}},
        {"consumed_per_s": 30.0},
    ]
    row = amqp_bench.summarize({"direct": runs})["direct"]
    assert row["consumed_per_s"] == 20.0
    assert row["placement_runs_as_planned"] == 1.0
    assert row["runs"] == 3.0


def test_message_stamp_round_trip() -> None:
    body = amqp_bench.stamp(100)
    assert len(body) == 100
    sent = amqp_bench._STAMP.unpack_from(body)[0]
    assert amqp_bench.latency_us(body, sent + 2500) == 2.5


def test_checks_ratios_and_shortfall() -> None:
    tcp = {
        "rabbitproxy": {
            "bulk1_gbit_s": 9.0,
            "lat64_p50_added_us": 12.0,
            "idle_kib_per_conn": 25.0,
            "conn_cpu_us": 130.0,
        },
        "haproxy": {"bulk1_gbit_s": 10.0, "lat64_p50_added_us": 10.0, "conn_cpu_us": 100.0},
    }
    amqp = {
        "direct": {"consumed_per_s": 1000.0, "published_per_s": 1000.0},
        "rabbitproxy": {"consumed_per_s": 970.0, "published_per_s": 960.0},
    }
    by_name = {c.name: c for c in report.checks(tcp, amqp)}
    bulk = by_name["bulk 1 stream Gbit/s vs HAProxy"]
    assert bulk.value == pytest.approx(0.9)
    assert bulk.met is False
    assert bulk.shortfall == "missed by 10%"
    lat = by_name["added latency p50 64 B vs HAProxy"]
    assert lat.value == pytest.approx(1.2)
    assert lat.met is False
    assert by_name["AMQP consumed msg/s vs direct"].met is True
    # The bar for AMQP through the proxy is 0.97x direct.
    assert by_name["AMQP published msg/s vs direct"].met is False
    assert by_name["RSS per idle connection"].shortfall == "missed by 25%"
    assert by_name["bulk 8 streams Gbit/s vs HAProxy"].met is None
    conn_cpu = by_name["proxy CPU per short connection vs HAProxy"]
    assert conn_cpu.value == pytest.approx(1.3) and conn_cpu.met is False and conn_cpu.shortfall == "missed by 8%"


def test_conn_cpu_is_per_connection_and_skips_unmeasured_runs() -> None:
    raw = {
        "conn_client_close": {
            "rabbitproxy": [{"ok": 10_000.0, "cpu_s": 0.7}, {"ok": 20_000.0, "cpu_s": 1.6}],
            "direct": [{"ok": 10_000.0, "cpu_s": 0.0}],
        },
        "conn_server_close": {"rabbitproxy": [{"ok": 0.0, "cpu_s": 0.5}, {"ok": 10_000.0, "cpu_s": 0.9}]},
    }
    cc = common.conn_cpu(raw, "rabbitproxy", duration=1.0)
    # 70, 80 and 90 µs per connection (the run with no connection counts for nothing); core 0.7, 1.6, 0.9 busy.
    assert cc.us_per_conn == pytest.approx(80.0)
    assert cc.core_share == pytest.approx(0.9)
    assert math.isnan(common.conn_cpu(raw, "direct", duration=1.0).us_per_conn)


def test_idle_bench_connection_count_is_capped_by_the_descriptor_limit() -> None:
    # A proxy holds two descriptors per connection, and a few are kept for everything else.
    assert idle_bench.usable_connections(5000, 20000) == 5000
    assert idle_bench.usable_connections(12000, 20000) == (20000 - idle_bench.SPARE_FDS) // 2
    assert idle_bench.usable_connections(5000, 1024) == (1024 - idle_bench.SPARE_FDS) // 2
    assert idle_bench.shares(10, 4) == [3, 3, 2, 2]
    assert idle_bench.shares(2, 4) == [1, 1]
    assert sum(idle_bench.shares(4999, 4)) == 4999


def test_idle_bench_summary_takes_medians_and_sums_failures() -> None:
    runs = [
        {"connections": 4990.0, "failed": 10.0, "lost_during_hold": 0.0, "proxy_cpu_share": 0.10},
        {"connections": 5000.0, "failed": 0.0, "lost_during_hold": 2.0, "proxy_cpu_share": 0.30},
    ]
    row = idle_bench.summarize({"rabbitproxy": runs})["rabbitproxy"]
    assert row["connections"] == 4995.0
    assert row["proxy_cpu_share"] == pytest.approx(0.2)
    assert row["failed"] == 10.0
    assert row["lost_during_hold"] == 2.0
    assert math.isnan(row["proxy_kib_per_conn"])


IDLE_ROW = {
    "connections": 5000.0,
    "failed": 0.0,
    "lost_during_hold": 0.0,
    "open_s": 12.0,
    "latency_p50_us": 1500.0,
    "latency_p99_us": 9000.0,
}


def idle_doc(rp_cpu: float, rp_kib: float) -> dict[str, Any]:
    return {
        "settings": {
            "connections": 5000,
            "requested_connections": 5000,
            "nofile_hard_limit": 20000,
            "heartbeat": 5,
            "hold": 60.0,
            "rate": 50.0,
            "processes": 4,
            "repeats": 2,
            "brokers": 3,
            "pinning": "none",
        },
        "raw": {"direct": [{"per_broker": [1668, 1667, 1667]}], "haproxy": [{}]},
        "summary": {
            "direct": {
                **IDLE_ROW,
                "proxy_cpu_share": math.nan,
                "proxy_rss_mib": math.nan,
                "proxy_kib_per_conn": math.nan,
            },
            "rabbitproxy": {**IDLE_ROW, "proxy_cpu_share": rp_cpu, "proxy_rss_mib": 90.0, "proxy_kib_per_conn": rp_kib},
            "haproxy": {**IDLE_ROW, "proxy_cpu_share": 0.10, "proxy_rss_mib": 40.0, "proxy_kib_per_conn": 4.0},
        },
    }


def test_idle_checks_compare_cpu_and_rss_per_connection_with_haproxy() -> None:
    doc = idle_doc(rp_cpu=0.12, rp_kib=5.0)
    by_name = {c.name: c for c in report.checks({}, {}, doc["summary"])}
    cpu = by_name["idle AMQP connections: proxy CPU vs HAProxy"]
    assert cpu.value == pytest.approx(1.2)
    assert cpu.met is False
    rss = by_name["idle AMQP connections: RSS per connection vs HAProxy"]
    assert rss.value == pytest.approx(1.25)
    assert rss.met is True
    assert by_name["idle AMQP connections: RSS per connection vs HAProxy"].limit == 1.5
    # Without the idle bench the targets are listed as not measured, not dropped.
    assert {c.name: c.met for c in report.checks({}, {})}["idle AMQP connections: proxy CPU vs HAProxy"] is None


def test_idle_section_states_the_connection_count_and_the_limit() -> None:
    text = "\n".join(report.idle_section(idle_doc(rp_cpu=0.08, rp_kib=5.0)))
    assert "5,000 idle AMQP connections (descriptor hard limit 20000" in text
    assert "| direct | 5,000 | 0 | 0 | 12.0 | 1.50 | 9.00 | n/a | n/a | n/a | 1668 / 1667 / 1667 |" in text
    assert "| rabbitproxy | 5,000 | 0 | 0 | 12.0 | 1.50 | 9.00 | 0.080 | 90.0 | 5.0 | not read |" in text
    assert "| haproxy |" in text
    capped = idle_doc(rp_cpu=0.08, rp_kib=5.0)
    capped["settings"] = {**capped["settings"], "requested_connections": 12000, "connections": 9900}
    assert "9,900 idle AMQP connections (of 12,000 asked for: the descriptor hard limit of 20000" in "\n".join(
        report.idle_section(capped)
    )
    assert "Not measured in this run" in "\n".join(report.idle_section(None))

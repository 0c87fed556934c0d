"""Turn the JSON of ``tcp_bench.py``, ``amqp_bench.py`` and ``idle_bench.py`` into docs/benchmarks.md.

Called by ``bench/run_all``.

Nothing in the generated file is typed by hand except ``bench/perf-notes.md``, which is included verbatim: it is
the log of data-path changes tried (kept or not) and what the profiles showed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from amqp_reading import amqp_reading, where_measured  # noqa: E402
from common import ConnCpu, conn_cpu, fmt, markdown_table, ratio  # noqa: E402
from placement import placement_text  # noqa: E402


@dataclass(frozen=True)
class Check:
    """One target of the issue: ``value`` compared with ``limit``; ``higher`` says which side passes."""

    name: str
    value: float
    limit: float
    higher: bool
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if math.isnan(self.value):
            return None
        return self.value >= self.limit if self.higher else self.value <= self.limit

    @property
    def shortfall(self) -> str:
        """By how much a missed target is missed, relative to the limit."""
        if self.met is None:
            return "not measured"
        if self.met:
            return ""
        miss = (self.limit - self.value) / self.limit if self.higher else (self.value - self.limit) / self.limit
        return f"missed by {miss:.0%}"


def checks(
    tcp: dict[str, dict[str, float]],
    amqp: dict[str, dict[str, float]],
    idle: dict[str, dict[str, float]] | None = None,
) -> list[Check]:
    """The issue's targets as ratios from one run's medians (pure; unit-tested); no ``idle``: not measured."""
    nan = math.nan
    rp = tcp.get("rabbitproxy", {})
    hp = tcp.get("haproxy", {})
    out = [
        Check(
            "bulk 1 stream Gbit/s vs HAProxy",
            ratio(rp.get("bulk1_gbit_s", nan), hp.get("bulk1_gbit_s", nan)),
            1.0,
            True,
        ),
        Check(
            "bulk 8 streams Gbit/s vs HAProxy",
            ratio(rp.get("bulk8_gbit_s", nan), hp.get("bulk8_gbit_s", nan)),
            1.0,
            True,
        ),
        Check(
            "proxy CPU per GB (1 stream) vs HAProxy",
            ratio(rp.get("bulk1_cpu_s_per_gb", nan), hp.get("bulk1_cpu_s_per_gb", nan)),
            1.0,
            False,
        ),
        Check(
            "proxy CPU per GB (8 streams) vs HAProxy",
            ratio(rp.get("bulk8_cpu_s_per_gb", nan), hp.get("bulk8_cpu_s_per_gb", nan)),
            1.0,
            False,
        ),
    ]
    for size, label in (("64", "64 B"), ("1k", "1 KiB")):
        for pct, limit in (("p50", 1.1), ("p99", 1.25)):
            key = f"lat{size}_{pct}_added_us"
            out.append(
                Check(
                    f"added latency {pct} {label} vs HAProxy", ratio(rp.get(key, nan), hp.get(key, nan)), limit, False
                )
            )
    for key, label in (("conn_client_close_s", "client closes"), ("conn_server_close_s", "backend closes")):
        out.append(Check(f"connections/s ({label}) vs HAProxy", ratio(rp.get(key, nan), hp.get(key, nan)), 0.8, True))
    # Issue 17: CPU per short connection, the comparison that does not depend on the load driver keeping up.
    out.append(
        Check(
            "proxy CPU per short connection vs HAProxy",
            ratio(rp.get("conn_cpu_us", nan), hp.get("conn_cpu_us", nan)),
            1.2,
            False,
        )
    )
    arp = amqp.get("rabbitproxy", {})
    for key, label in (("published_per_s", "published"), ("consumed_per_s", "consumed")):
        out.append(
            Check(
                f"AMQP {label} msg/s vs direct",
                ratio(arp.get(key, nan), amqp.get("direct", {}).get(key, nan)),
                0.97,
                True,
            )
        )
        out.append(
            Check(
                f"AMQP {label} msg/s vs HAProxy",
                ratio(arp.get(key, nan), amqp.get("haproxy", {}).get(key, nan)),
                1.0,
                True,
            )
        )
    out.append(Check("RSS per idle connection", rp.get("idle_kib_per_conn", nan), 20.0, False, " KiB"))
    irp = (idle or {}).get("rabbitproxy", {})
    ihp = (idle or {}).get("haproxy", {})
    out.append(
        Check(
            "idle AMQP connections: proxy CPU vs HAProxy",
            ratio(irp.get("proxy_cpu_share", nan), ihp.get("proxy_cpu_share", nan)),
            1.0,
            False,
        )
    )
    out.append(
        Check(
            "idle AMQP connections: RSS per connection vs HAProxy",
            ratio(irp.get("proxy_kib_per_conn", nan), ihp.get("proxy_kib_per_conn", nan)),
            1.5,
            False,
        )
    )
    return out


def idle_section(idle_doc: dict[str, Any] | None) -> list[str]:
    """The "Many idle AMQP connections" section (pure; unit-tested); a note when the bench did not run."""
    lines = ["## Many idle AMQP connections", ""]
    if not idle_doc:
        return [*lines, "Not measured in this run (bench/idle_bench.py).", ""]
    st = idle_doc["settings"]
    limit = st.get("nofile_hard_limit")
    capped = (
        f" (of {st['requested_connections']:,} asked for: the descriptor hard limit of {limit} allows that many "
        "proxied connections, two descriptors each)"
        if st.get("requested_connections", st["connections"]) > st["connections"]
        else f" (descriptor hard limit {limit}, raised to it for the bench's own processes)"
    )
    lines += [
        f"{st['connections']:,} idle AMQP connections{capped}, each a minimal client that opens a connection with "
        f"a {st['heartbeat']} s heartbeat and then only heartbeats, spread over {st['processes']} worker processes, "
        f"held {st['hold']:g} s through each target with a steady {st['rate']:g} msg/s publish load on top (one "
        f"aio-pika publisher and one consumer through the same target, no confirms); {st['repeats']} interleaved "
        f"repeats, a fresh proxy for each run, {st['brokers']} brokers. Pinning: {st['pinning']}. CPU share is the "
        "proxy's CPU seconds per second of the hold (1.0 = one core); RSS per connection is the proxy's growth from "
        "before the idle connections opened to the hold, divided by the connections held. Latency is the steady "
        "load's, publish to delivery. Lost: connections that ended during the hold (a missed heartbeat ends one).",
        "",
        markdown_table(
            [
                "target",
                "connections",
                "failed",
                "lost",
                "open s",
                "p50 ms",
                "p99 ms",
                "proxy CPU share",
                "proxy RSS MiB",
                "KiB per conn",
                "per broker (first run)",
            ],
            [
                [
                    name,
                    fmt(r["connections"], 0),
                    fmt(r["failed"], 0),
                    fmt(r["lost_during_hold"], 0),
                    fmt(r["open_s"], 1),
                    fmt(r["latency_p50_us"] / 1000, 2),
                    fmt(r["latency_p99_us"] / 1000, 2),
                    fmt(r["proxy_cpu_share"], 3),
                    fmt(r["proxy_rss_mib"], 1),
                    fmt(r["proxy_kib_per_conn"], 1),
                    " / ".join(str(n) for n in idle_doc["raw"].get(name, [{}])[0].get("per_broker", [])) or "not read",
                ]
                for name, r in idle_doc["summary"].items()
            ],
        ),
        "",
    ]
    return lines


def _row_tcp(name: str, r: dict[str, float], cc: ConnCpu) -> list[str]:
    return [
        name,
        fmt(r["bulk1_gbit_s"], 2),
        fmt(r["bulk8_gbit_s"], 2),
        fmt(r["bulk1_cpu_s_per_gb"], 2),
        fmt(r["bulk8_cpu_s_per_gb"], 2),
        fmt(r["conn_client_close_s"], 0),
        fmt(r["conn_server_close_s"], 0),
        fmt(cc.us_per_conn, 0),
        "n/a" if math.isnan(cc.core_share) else f"{cc.core_share:.0%}",
        fmt(r["idle_kib_per_conn"], 1),
    ]


SCALING = ("rabbitproxy-w1", "rabbitproxy-w2", "haproxy-nbthread1", "haproxy-nbthread2")


def scaling_section(tcp_doc: dict[str, Any]) -> list[str]:
    """``workers = N`` against HAProxy's ``nbthread``: short connections, and what N cores should give (pure)."""
    tcp = tcp_doc["summary"]
    ts = tcp_doc["settings"]
    present = [n for n in SCALING if n in tcp]
    if not present:
        return []
    raw = tcp_doc.get("raw", {})
    rows = []
    for n in present:
        r = tcp[n]
        cc = conn_cpu(raw, n, ts["duration_s"])
        rows.append(
            [
                n,
                fmt(r["conn_client_close_s"], 0),
                fmt(r["conn_server_close_s"], 0),
                fmt(cc.us_per_conn, 0),
                "n/a" if math.isnan(cc.core_share) else f"{cc.core_share:.0%}",
            ]
        )

    def gain(two: str, one: str) -> str:
        if two not in tcp or one not in tcp:
            return "n/a"
        return fmt(ratio(tcp[two]["conn_client_close_s"], tcp[one]["conn_client_close_s"]), 2) + " x"

    note = ts.get("scaling", {}).get("note", "")
    return [
        "### Worker processes (`workers = N`) against HAProxy threads (`nbthread`)",
        "",
        f"Short connections only, same clients and backend as above. {note[:1].upper()}{note[1:]}.",
        "",
        markdown_table(
            ["target", "conn/s client closes", "conn/s backend closes", "CPU µs per conn", "cores busy (conn)"],
            rows,
        ),
        "",
        "Two against one, connections per second (client closes): "
        f"rabbitproxy {gain('rabbitproxy-w2', 'rabbitproxy-w1')}, "
        f"HAProxy {gain('haproxy-nbthread2', 'haproxy-nbthread1')}.",
        "",
        "**What N cores should give.** Each worker is a whole proxy for the connections the kernel hands it "
        "(`SO_REUSEPORT` spreads them by hash): it shares no lock and no memory with the others, and nothing crosses "
        "between processes per connection (counters go to the parent every half second). "
        "So the rate should grow with the workers until something else is the limit: about N x the "
        "one-worker rate on N free cores, less what the kernel's accept and connect paths cost when shared (a few "
        "per cent on Linux with per-socket accept queues), and the CPU per connection should stay that of one worker. "
        "On this 2-core machine a second worker cannot show that: the load driver, the echo backend and the proxy "
        "share the same two cores, so the second worker mostly takes CPU from the driver, and the measured gain is "
        "a floor. HAProxy's threads scale the same way for the same reason (one accept queue per thread with "
        "`SO_REUSEPORT`), at its lower CPU per connection; the ratio between the two should stay about what the "
        "one-core rows show, at any N.",
        "",
    ]


def _row_lat(name: str, r: dict[str, float]) -> list[str]:
    cells = [name]
    for size in ("64", "1k"):
        for p in ("p50", "p99", "p99.9"):
            cells.append(f"{fmt(r[f'lat{size}_{p}_us'], 1)} (+{fmt(r[f'lat{size}_{p}_added_us'], 1)})")
    return cells


def placement_rows(amqp_doc: dict[str, Any]) -> list[list[str]]:
    """Per AMQP target: where its connections landed (first run the brokers were asked), runs as planned (pure)."""
    rows = []
    for name, runs in amqp_doc.get("raw", {}).items():
        read = [r["placement"] for r in runs if r.get("placement")]
        planned = sum(bool(p.get("as_planned")) for p in read)
        rows.append(
            [
                name,
                placement_text(read[0]) if read else "not read",
                f"{planned} of {len(runs)}" if read else "n/a",
            ]
        )
    return rows


def reading(cks: list[Check], tcp_doc: dict[str, Any], amqp_doc: dict[str, Any]) -> str:
    met = [c for c in cks if c.met]
    missed = [c for c in cks if c.met is False]
    load = tcp_doc["machine"].get("load_average_at_start", [])
    parts = [
        f"Of {len(cks)} targets, {len(met)} were met and {len(missed)} missed in this run.",
    ]
    if missed:
        worst = sorted(missed, key=lambda c: -abs(c.value - c.limit) / c.limit)[:3]
        parts.append(
            "The largest misses: "
            + "; ".join(f"{c.name} at {fmt(c.value, 2)}{c.unit} against {c.limit:g}{c.unit}" for c in worst)
            + "."
        )
    raw = tcp_doc.get("raw", {})
    duration = float(tcp_doc.get("settings", {}).get("duration_s", math.nan))
    rp_cc, hp_cc = conn_cpu(raw, "rabbitproxy", duration), conn_cpu(raw, "haproxy", duration)
    if not math.isnan(rp_cc.us_per_conn) and not math.isnan(hp_cc.us_per_conn):
        parts.append(
            f"On short connections rabbitproxy spent {rp_cc.us_per_conn:.0f} µs of CPU per connection with its core "
            f"{rp_cc.core_share:.0%} busy, HAProxy {hp_cc.us_per_conn:.0f} µs at {hp_cc.core_share:.0%}"
            + (
                "; a proxy well below a full core was waiting for the load driver, so the connections/s ratio "
                "is bounded by the driver and CPU per connection is the fairer comparison."
                if min(rp_cc.core_share, hp_cc.core_share) < 0.9
                else "."
            )
        )
    condition = (
        "2 cores shared with other jobs, so absolute numbers are noisy"
        if busy(load)
        else "nothing else of note was running"
    )
    parts.append(
        f"The machine's load average was {', '.join(str(x) for x in load)} when the TCP bench started ({condition}); "
        "the ratios compare targets measured interleaved in the same minutes, which is what the targets are defined "
        "on. See the notes below for what the profiles show."
    )
    return " ".join(parts)


def busy(load: Any) -> bool:
    """True when the one-minute load average at the start says other work competed for the cores."""
    # The bench itself is not running yet when this is sampled, so anything near a full core is someone else.
    return bool(load) and float(load[0]) >= 1.0


def render(
    tcp_doc: dict[str, Any],
    amqp_doc: dict[str, Any],
    notes: str,
    mode: str,
    probe: str = "",
    idle_doc: dict[str, Any] | None = None,
    stream: str = "",
    tail: str = "",
) -> str:
    """The whole of docs/benchmarks.md; ``probe`` is the "Probe cost" section (from bench/probe_cost.py), if any,
    and ``idle_doc`` the JSON of bench/idle_bench.py, if it ran."""
    m = tcp_doc["machine"]
    tcp = tcp_doc["summary"]
    amqp = amqp_doc["summary"]
    ts = tcp_doc["settings"]
    am = amqp_doc["settings"]
    cks = checks(tcp, amqp, idle_doc["summary"] if idle_doc else None)
    confirms = f"on (window {am['window']})" if am["confirms"] else "off"
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/run_all from bench/tcp_bench.py, bench/amqp_bench.py, bench/idle_bench.py and "
        "bench/stream_bench.py; do not edit by hand. -->",
        "",
        f"Run: {tcp_doc['started_at']} ({mode} mode). Regenerate with `bench/run_all` (add `--quick` for a short run); "
        "rebuild this page from the stored results in `bench/results/` without measuring anything with "
        "`bench/run_all --report`.",
        "",
        "## Machine",
        "",
        markdown_table(
            ["CPU", "cores", "kernel", "Python", "uvloop", "HAProxy", "nginx", "RabbitMQ", "iperf3", "sockperf"],
            [
                [
                    str(m[k])
                    for k in (
                        "cpu",
                        "cores",
                        "kernel",
                        "python",
                        "uvloop",
                        "haproxy",
                        "nginx",
                        "rabbitmq",
                        "iperf3",
                        "sockperf",
                    )
                ]
            ],
        ),
        "",
        f"Load average at start: {m.get('load_average_at_start')}; at the end of the TCP bench: "
        f"{ts.get('load_average_at_end')}, of the AMQP bench: {am.get('load_average_at_end')}"
        + (f", of the idle bench: {idle_doc['settings'].get('load_average_at_end')}. " if idle_doc else ". ")
        + (
            "Other jobs were running on the same cores during this run."
            if busy(m.get("load_average_at_start"))
            else "The machine was otherwise idle when the run started."
        ),
        "",
        "## Reading",
        "",
        reading(cks, tcp_doc, amqp_doc),
        "",
        amqp_reading(amqp_doc),
        "",
        "## Targets (ratios of same-run medians)",
        "",
        markdown_table(
            ["target", "measured", "required", "met"],
            [
                [
                    c.name,
                    f"{fmt(c.value, 2)}{c.unit}",
                    f"{'≥' if c.higher else '≤'} {c.limit:g}{c.unit}",
                    "yes" if c.met else ("n/a" if c.met is None else f"**no** ({c.shortfall})"),
                ]
                for c in cks
            ],
        ),
        "",
        "## AMQP load",
        "",
        f"{am['publishers']} publishers and {am['consumers']} consumers (one connection each) over {am['processes']} "
        f"worker processes, {am['queues']} queues, {am['size']} B messages, publisher confirms "
        f"{confirms}, {am['duration']:g} s measured per run, "
        f"{am['repeats']} interleaved repeats, {am['brokers']} brokers "
        f"({'local devcluster' if am['local_cluster'] else 'existing'}). Pinning: {am['pinning']}. "
        "Latency is end to end (publish to delivery, timestamp in the body). Proxy CPU is per million consumed "
        "messages, including connection set-up and the warm-up before the measured window. "
        + where_measured(amqp_doc),
        "",
        "Placement: "
        + am.get("placement", "not controlled (a run from before the bench placed connections)")
        + ". After the connections are open the bench reads from the brokers' management API where each one "
        "landed; n1, n2, ... are the brokers in order.",
        "",
        markdown_table(["target", "connections per broker (first run)", "runs as planned"], placement_rows(amqp_doc)),
        "",
        markdown_table(
            [
                "target",
                "published msg/s",
                "consumed msg/s",
                "p50 ms",
                "p99 ms",
                "proxy CPU s / M msgs",
                "proxy peak RSS MiB",
                "errors",
            ],
            [
                [
                    name,
                    fmt(r["published_per_s"], 0),
                    fmt(r["consumed_per_s"], 0),
                    fmt(r["latency_p50_us"] / 1000, 2),
                    fmt(r["latency_p99_us"] / 1000, 2),
                    fmt(r["proxy_cpu_s_per_million"], 1),
                    fmt(r["proxy_peak_rss_mib"], 1),
                    fmt(r["errors"], 0),
                ]
                for name, r in amqp.items()
            ],
        ),
        "",
        "![AMQP load chart](benchmarks-amqp.png)",
        "",
        *idle_section(idle_doc),
        *([stream.strip(), ""] if stream.strip() else []),
        "## TCP relay",
        "",
        f"{ts['duration_s']:g} s per measurement, {ts['repeats']} interleaved repeats. Pinning: "
        f"{ts['pinning']['note']}. The idle test holds {ts['idle_connections']:,} connections (the container's "
        f"descriptor hard limit of {m.get('nofile_hard_limit')} cannot hold 10,000 proxied connections' 20,000 "
        "descriptors). `rabbitproxy-info` is rabbitproxy with connection logs at info level, measured on short "
        "connections only, where logging costs something.",
        "",
        "### Throughput, connection rate, memory",
        "",
        markdown_table(
            [
                "target",
                "bulk 1 Gbit/s",
                "bulk 8 Gbit/s",
                "CPU s/GB (1)",
                "CPU s/GB (8)",
                "conn/s client closes",
                "conn/s backend closes",
                "CPU µs per conn",
                "core busy (conn)",
                "KiB per idle conn",
            ],
            [
                _row_tcp(n, r, conn_cpu(tcp_doc.get("raw", {}), n, ts["duration_s"]))
                for n, r in tcp.items()
                if n not in SCALING
            ],
        ),
        "",
        "### Request/response latency (sockperf ping-pong, full round trip, µs; added over direct in brackets)",
        "",
        markdown_table(
            ["target", "64 B p50", "64 B p99", "64 B p99.9", "1 KiB p50", "1 KiB p99", "1 KiB p99.9"],
            [_row_lat(n, r) for n, r in tcp.items() if n != "rabbitproxy-info" and n not in SCALING],
        ),
        "",
        *scaling_section(tcp_doc),
        "![TCP relay chart](benchmarks-tcp.png)",
        "",
        *([probe.strip(), ""] if probe.strip() else []),
        notes.strip(),
        "",
        *([tail.strip(), ""] if tail.strip() else []),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tcp", type=Path, required=True)
    ap.add_argument("--amqp", type=Path, required=True)
    ap.add_argument("--notes", type=Path, default=HERE / "perf-notes.md")
    ap.add_argument("--idle", type=Path, help="bench/idle_bench.py JSON (none: the section says not measured)")
    ap.add_argument("--probe", type=Path, default=HERE / "results" / "probe.json", help="bench/probe_cost.py JSON")
    ap.add_argument("--stream", type=Path, default=HERE / "results" / "stream.json", help="bench/stream_bench.py JSON")
    ap.add_argument("--storm", type=Path, default=HERE / "results" / "storm.json", help="bench/storm_bench.py JSON")
    ap.add_argument("--l4", type=Path, default=HERE / "results" / "l4.json", help="bench/l4_bench.py JSON")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    tcp_doc = json.loads(args.tcp.read_text())
    amqp_doc = json.loads(args.amqp.read_text())
    notes = args.notes.read_text() if args.notes.exists() else ""
    probe = ""
    if args.probe.exists():
        from probe_cost import render_section

        probe = render_section(json.loads(args.probe.read_text()))
    idle_doc = json.loads(args.idle.read_text()) if args.idle else None
    stream = ""
    if args.stream.exists():
        from stream_bench import render_section as stream_section

        stream = stream_section(json.loads(args.stream.read_text()))
    # The benches that run on their own (bench/README.md): their stored results, when there are any.
    tail = []
    if args.storm.exists():
        from storm_bench import render_section as storm_section

        tail.append(storm_section(json.loads(args.storm.read_text())))
    if args.l4.exists():
        from l4_bench import markdown as l4_section

        tail.append(l4_section(json.loads(args.l4.read_text())))
    args.out.write_text(render(tcp_doc, amqp_doc, notes, args.mode, probe, idle_doc, stream, "\n\n".join(tail)))
    print(f"wrote {args.out} ({time.strftime('%H:%M:%S')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

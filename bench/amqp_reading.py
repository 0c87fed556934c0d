"""What docs/benchmarks.md says about the AMQP run in words: latency and peak memory of every target, where the
figures come from, and what a message rate above direct connections does and does not mean.

Pure functions of the JSON that ``amqp_bench.py`` writes, so the page says only what the stored results say.
"""

from __future__ import annotations

import math
from typing import Any

from common import fmt

# Targets in the order the sentences name them; anything else the bench measured follows.
ORDER = ("rabbitproxy", "haproxy", "nginx", "direct")
NAMES = {"rabbitproxy": "rabbitproxy", "haproxy": "HAProxy", "nginx": "nginx", "direct": "direct connections"}


def _ordered(summary: dict[str, dict[str, float]]) -> list[str]:
    return [n for n in ORDER if n in summary] + [n for n in summary if n not in ORDER]


def _ms(row: dict[str, float], key: str) -> str:
    return fmt(row.get(key, math.nan) / 1000, 1)


def where_measured(doc: dict[str, Any]) -> str:
    """One sentence: the machine, what shared it, and the load average around the AMQP run."""
    m, st = doc.get("machine", {}), doc.get("settings", {})
    start = m.get("load_average_at_start") or []
    end = st.get("load_average_at_end") or []
    load = "load not recorded"
    if start and end:
        load = f"load average {start[0]:g} when it started and {end[0]:g} when it ended"
    return (
        f"Measured on {m.get('cores', '?')} cores ({m.get('cpu', '?')}, RabbitMQ {m.get('rabbitmq', '?')}) that the "
        f"brokers, the bench's clients and the proxy all share (pinning: {st.get('pinning', 'not recorded')}); "
        f"{load}. {st.get('publishers', '?')} publishers and {st.get('consumers', '?')} consumers, "
        f"{st.get('size', '?')} B messages with publisher confirms, {st.get('repeats', '?')} runs of "
        f"{st.get('duration', math.nan):g} s per target; medians of the runs."
    )


def amqp_reading(doc: dict[str, Any]) -> str:
    """The AMQP paragraph of the page's reading: every target's p50/p99 and peak memory, then the caveats."""
    summary: dict[str, dict[str, float]] = doc.get("summary", {})
    if not summary:
        return "The AMQP bench did not run."
    names = _ordered(summary)
    latency = "; ".join(
        f"{NAMES.get(n, n)} {_ms(summary[n], 'latency_p50_us')} ms at p50 and {_ms(summary[n], 'latency_p99_us')} ms "
        "at p99"
        for n in names
    )
    parts = [f"AMQP latency, publish to delivery: {latency}."]
    proxies = [n for n in names if not math.isnan(summary[n].get("proxy_peak_rss_mib", math.nan))]
    if proxies:
        parts.append(
            "Peak proxy memory (RSS): "
            + ", ".join(f"{NAMES.get(n, n)} {fmt(summary[n]['proxy_peak_rss_mib'], 1)} MiB" for n in proxies)
            + "."
        )
    rp, hp, direct = summary.get("rabbitproxy"), summary.get("haproxy"), summary.get("direct")
    if rp and hp and rp["latency_p99_us"] > hp["latency_p99_us"]:
        parts.append(
            f"rabbitproxy's p99 is {rp['latency_p99_us'] / hp['latency_p99_us']:.2f}x HAProxy's and its peak memory "
            f"{rp['proxy_peak_rss_mib'] / hp['proxy_peak_rss_mib']:.1f}x"
            + (
                ": its higher message rate does not come with a shorter tail."
                if rp["consumed_per_s"] > hp["consumed_per_s"]
                else "."
            )
        )
    faster = [n for n in proxies if direct and summary[n]["consumed_per_s"] > direct["consumed_per_s"]]
    if direct and faster:
        ratios = ", ".join(
            f"{NAMES.get(n, n)} {summary[n]['consumed_per_s'] / direct['consumed_per_s']:.2f}x" for n in faster
        )
        parts.append(
            f"{' and '.join(NAMES.get(n, n) for n in faster)} moved more messages than direct connections "
            f"({ratios}). That is this machine, not a speed-up to "
            "expect: the clients and brokers saturate the two cores they share with the proxy, and a proxy that "
            "batches their small frames into fewer reads saves them CPU (counted in the notes below). Where "
            "clients and brokers have cores to spare, expect direct connections to be at least as fast; the "
            "comparison that carries over is proxy against proxy."
        )
    parts.append(where_measured(doc))
    return " ".join(parts)

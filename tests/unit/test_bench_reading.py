"""docs/benchmarks.md gives every AMQP target's p50/p99 latency and peak memory, says where the figures come from,
and does not sell a rate above direct connections as a speed-up (issue 27, item 6).

The figures are read from the stored results (bench/results/amqp.json) and from a made-up run, never typed in.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tests.support.bench import BENCH, report

STORED = BENCH / "results"
import amqp_reading  # noqa: E402  (bench/ is on sys.path once tests.support.bench is imported)


def stored(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((STORED / f"{name}.json").read_text())
    return data


def ms(us: float) -> str:
    return f"{us / 1000:.1f} ms"


def test_the_reading_gives_every_targets_latency_and_memory_from_the_stored_run() -> None:
    doc = stored("amqp")
    text = amqp_reading.amqp_reading(doc)
    for name, row in doc["summary"].items():
        assert f"{ms(row['latency_p50_us'])} at p50 and {ms(row['latency_p99_us'])} at p99" in text, name
        if not math.isnan(row["proxy_peak_rss_mib"]):
            assert f"{row['proxy_peak_rss_mib']:.1f} MiB" in text, name
    # Where the figures come from: the machine, what shares it, the load.
    assert f"{doc['machine']['cores']} cores" in text
    assert "load average" in text and "share" in text


def run(rp_rate: float, direct_rate: float, rp_p99: float, hp_p99: float) -> dict[str, Any]:
    def row(rate: float, p99: float, rss: float) -> dict[str, float]:
        return {
            "published_per_s": rate,
            "consumed_per_s": rate,
            "latency_p50_us": 50_000.0,
            "latency_p99_us": p99,
            "proxy_peak_rss_mib": rss,
        }

    return {
        "machine": {"cores": 8, "cpu": "test", "rabbitmq": "4.0.5", "load_average_at_start": [0.1]},
        "settings": {"pinning": "none", "load_average_at_end": [0.5], "duration": 20.0},
        "summary": {
            "direct": row(direct_rate, 100_000.0, math.nan),
            "rabbitproxy": row(rp_rate, rp_p99, 50.0),
            "haproxy": row(1000.0, hp_p99, 20.0),
        },
    }


def test_a_rate_above_direct_is_called_what_it_is_and_a_longer_tail_is_said() -> None:
    above = amqp_reading.amqp_reading(run(rp_rate=1500.0, direct_rate=1000.0, rp_p99=300_000.0, hp_p99=200_000.0))
    assert "rabbitproxy 1.50x" in above and "not a speed-up to expect" in above
    assert "rabbitproxy's p99 is 1.50x HAProxy's" in above
    below = amqp_reading.amqp_reading(run(rp_rate=900.0, direct_rate=1000.0, rp_p99=100_000.0, hp_p99=200_000.0))
    assert "not a speed-up" not in below and "p99 is" not in below


def test_the_generated_page_carries_the_reading() -> None:
    page = report.render(stored("tcp"), stored("amqp"), "", "full", "", stored("idle"))
    assert amqp_reading.amqp_reading(stored("amqp")) in page
    assert "bench/run_all --report" in page

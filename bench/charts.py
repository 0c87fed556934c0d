"""PNG charts of the bench summaries (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot
import matplotlib.pyplot as plt


def _bars(ax: Any, summary: dict[str, dict[str, float]], key: str, title: str, scale: float = 1.0) -> None:
    names = [n for n, row in summary.items() if not math.isnan(row.get(key, math.nan))]
    values = [summary[n][key] * scale for n in names]
    ax.bar(names, values, color=["#888" if n == "direct" else "#e8743b" if "rabbit" in n else "#4c72b0" for n in names])
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.tick_params(axis="y", labelsize=7)


def amqp_chart(summary: dict[str, dict[str, float]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    _bars(axes[0], summary, "consumed_per_s", "consumed msg/s (higher is better)")
    _bars(axes[1], summary, "latency_p99_us", "end-to-end p99 ms (lower is better)", 1 / 1000)
    _bars(axes[2], summary, "proxy_cpu_s_per_million", "proxy CPU s per M msgs (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tcp_chart(summary: dict[str, dict[str, float]], path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    _bars(axes[0], summary, "bulk1_gbit_s", "bulk, 1 stream, Gbit/s")
    _bars(axes[1], summary, "bulk1_cpu_s_per_gb", "proxy CPU s per GB (1 stream)")
    _bars(axes[2], summary, "lat64_p50_added_us", "added p50 latency, 64 B, us")
    _bars(axes[3], summary, "conn_client_close_s", "short connections/s (client closes)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

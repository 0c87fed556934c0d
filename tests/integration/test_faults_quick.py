"""The fault-injection harness's quick variant through rabbitproxy: no confirmed message may be lost.

Each test is one scenario of ``bench/faults.py --quick`` on the session cluster (a node SIGKILLed and restarted, a
backend put in maint through the admin API, the proxy reloaded five times, a memory alarm that blocks every
publisher), with paced confirmed publishers and de-duplicating consumers in worker processes, through rabbitproxy in
one process and with ``workers = 2``. The full run, with HAProxy beside it, renders docs/reliability.md.

Each scenario stays under 30 s on a busy machine (12-16 s with CPU hogs beside it). faults.QUICK_TIMING keeps the
phases short and runs the killed node's restart, the slowest step, during the recovery window and the drain. The
drain ends only once every publisher has its last confirms and the queue is settled (fault_clients.drain_over,
unit-tested), so a short one misses nothing; the counting that makes a lost message fail this test is unit-tested too
(tests/unit/test_faults_bench.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.bench import BENCH

assert BENCH.is_dir()

import fault_targets  # noqa: E402
import faults  # noqa: E402


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("scenario", faults.QUICK)
def test_no_confirmed_message_is_lost_through_rabbitproxy(
    cluster: DevCluster, tmp_path: Path, scenario: str, workers: int
) -> None:
    row = faults.run_one(
        cluster,
        "rabbitproxy",
        faults.SCENARIOS[scenario],
        "quorum",
        tmp_path,
        faults.QUICK_LOAD,
        faults.QUICK_TIMING,
        fault_targets.Checks(),
        quick=True,
        workers=workers,
    )
    assert row["complete"], row["worker_failures"]
    assert row["confirmed"] > 0
    assert row["lost"] == 0, f"confirmed but never consumed: {row['lost_sample']}"
    assert row["proxy_restarts"] == 0
    assert row["proxy_errors"] == 0, row["proxy_error_lines"]
    if scenario == "reload":
        # A reload with an unchanged config keeps every established connection.
        assert row["reconnects"] == 0, row["client_errors"]
    elif scenario == "alarm":
        # The broker blocked the bulk publisher (few confirms while the alarm held), the proxy stopped reading it
        # for longer than 2.5 of its heartbeats, and cut nobody: every one of its messages confirmed, no reconnect.
        bulk = row["bulk"]
        assert bulk["confirmed_while_blocked"] < bulk["messages"] // 2, bulk
        assert bulk["confirmed"] == bulk["messages"], bulk
        assert row["reconnects"] == 0, row["client_errors"]
    else:
        # The fault hit clients (a node gone, or its connections closed by maint), and they came back.
        assert row["reconnects"] > 0
    if scenario == "maint":
        # on maint rabbitproxy closes the node's connections and sends no new ones there.
        assert row["conns_on_node_during"] == 0
    # The session cluster is left as the fixture promises: every node running.
    assert all(cluster.beam_pid(node) is not None for node in cluster.nodes)


def test_haproxy_accepts_the_harness_config(tmp_path: Path) -> None:
    text = fault_targets.haproxy_config(15672, tmp_path / "haproxy.sock", [(5001, 3331), (5002, 3332)], faults.Checks())
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

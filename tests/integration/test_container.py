"""The container image, built with podman and run from its mounted root in front of the session's RabbitMQ cluster.

All the work is in scripts/container-smoke (so it can also be run by hand); this test hands it the cluster's nodes
and checks every result it reports. From nothing (no base image, no cache) it takes about two minutes; with the
cached base image and podman's layer cache, well under a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rabbitproxy.dev.cluster import DevCluster

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "container-smoke"


@pytest.mark.timeout(1500)
def test_image_builds_and_proxies_amqp_as_non_root(cluster: DevCluster) -> None:
    backends = ",".join(f"127.0.0.1:{n.amqp_port}" for n in cluster.nodes)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--backends", backends],
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no summary from the script; stderr:\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1])
    assert result["ok"], f"{result.get('error')}\n--- script stderr (tail) ---\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0

    assert result["uid"] != 0
    assert result["user"] == "10001:10001"
    assert 0 < result["image_size_bytes"] < 200 * 1000 * 1000
    assert result["exposed_ports"] == ["5672/tcp", "9080/tcp"]
    assert result["argv"] == ["rabbitproxy", "serve", "--config", "/etc/rabbitproxy/rabbitproxy.toml"]
    assert result["healthcheck"] == ["CMD", "rabbitproxy", "healthcheck", "--quiet"]
    assert result["healthcheck_output"].startswith("healthy: http://127.0.0.1:")
    # Three connections of 50 messages, plus 50 on the connection kept open through the drain.
    assert result["messages_round_tripped"] == 200
    # The process holding the listening socket is PID 1 of its namespace and alone there: the ENTRYPOINT execs
    # the proxy (the console script's shebang starts Python directly), so SIGTERM reaches it.
    assert result["pid_in_namespace"] == 1
    assert result["processes_in_namespace"] == 1
    assert result["listener_cmdline"][1:] == [
        "/opt/rabbitproxy/bin/rabbitproxy",
        "serve",
        "--config",
        "/etc/rabbitproxy/rabbitproxy.toml",
    ]
    assert Path(result["listener_cmdline"][0]).name.startswith("python")
    # It runs as the image's user in every id, without capabilities, and cannot change its own code or config.
    assert result["listener_ids"] == {"uid": [10001] * 4, "gid": [10001] * 4, "cap_eff": [0]}
    assert result["writable_by_user"] == []
    assert result["drain_connection_kept"] is True
    assert result["healthcheck_exit_while_draining"] == 1
    assert result["exit_code"] == 0

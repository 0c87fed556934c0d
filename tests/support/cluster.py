"""Config entries for the session's RabbitMQ cluster (the ``cluster`` fixture in tests/integration/conftest.py)."""

from __future__ import annotations

from rabbitproxy.dev.cluster import DevCluster


def backends_for(cluster: DevCluster, weights: list[int] | None = None) -> list[dict[str, object]]:
    """Backend config entries for the cluster's nodes (names rabbit1..N)."""
    out: list[dict[str, object]] = []
    for i, node in enumerate(cluster.nodes):
        entry: dict[str, object] = {"name": f"rabbit{i + 1}", "address": "127.0.0.1", "port": node.amqp_port}
        if weights is not None:
            entry["weight"] = weights[i]
        out.append(entry)
    return out

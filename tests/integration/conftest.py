"""One RabbitMQ cluster for the whole test session (starting three nodes takes ~25 s; per test would be ruinous)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rabbitproxy.dev.cluster import DevCluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    """Three clustered RabbitMQ nodes with the management plugin, on free ports in a temp dir.

    Tests may pause, kill and restart nodes but must leave every node running again when they finish.
    """
    c = DevCluster(3)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def backends_for(cluster: DevCluster, weights: list[int] | None = None) -> list[dict[str, object]]:
    """Backend config entries for the cluster's nodes (names rabbit1..N)."""
    out: list[dict[str, object]] = []
    for i, node in enumerate(cluster.nodes):
        entry: dict[str, object] = {"name": f"rabbit{i + 1}", "address": "127.0.0.1", "port": node.amqp_port}
        if weights is not None:
            entry["weight"] = weights[i]
        out.append(entry)
    return out

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

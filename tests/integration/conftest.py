"""The session's RabbitMQ clusters (starting three nodes takes ~25 s; per test would be ruinous).

``cluster`` is the host's RabbitMQ (3.10.8 on Debian 12); ``cluster40`` is RabbitMQ 4.0.5 from Debian 13, run from a
cached chroot (rabbitproxy.dev.rootfs) and started only when a test asks for it. ``broker`` runs a test once on each:
the broker matrix, kept to the tests where the releases differ (tests/README.md says which and why).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.dev.nodes import Node, free_ports


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


@pytest.fixture(scope="session")
def stream_proxy_ports() -> list[int]:
    """One proxy port per 4.0 node that the node advertises to stream clients as its own address.

    Chosen before the nodes start because ``stream.advertised_port`` is node configuration; below the ephemeral
    range, like the nodes' own ports, so nothing else is handed one meanwhile. tests/integration/test_streams.py
    runs a proxy service on each, with that node as its only backend (docs/operations.md, "Streams").
    """
    return free_ports(3)


@pytest.fixture(scope="session")
def cluster40(stream_proxy_ports: list[int]) -> Iterator[DevCluster]:
    """Three clustered RabbitMQ 4.0 nodes with management and streams; the same rules as ``cluster``.

    Node N advertises 127.0.0.1:``stream_proxy_ports[N-1]`` to stream clients, so a client that asks where a
    stream's leader or replicas are is sent back through the proxy, to the one node it asked for.
    """

    def advertise(node: Node) -> list[str]:
        return ["stream.advertised_host = 127.0.0.1", f"stream.advertised_port = {stream_proxy_ports[node.index - 1]}"]

    c = DevCluster(3, release="4.0", stream=True, node_config=advertise)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(params=[pytest.param("system", id="rabbitmq3.10"), pytest.param("4.0", id="rabbitmq4.0")])
def broker(request: pytest.FixtureRequest) -> DevCluster:
    """The session's 3.10 cluster, then its 4.0 cluster: a test that takes ``broker`` runs on both."""
    name = "cluster" if request.param == "system" else "cluster40"
    found: DevCluster = request.getfixturevalue(name)
    return found

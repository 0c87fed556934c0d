"""What the brokers of a dev cluster say and do when asked through their CLI: maintenance mode and connections.

A base class of :class:`~rabbitproxy.dev.cluster.DevCluster`, kept apart from the process and boot handling there;
it needs only the CLI calls and the node bookkeeping the cluster provides.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rabbitproxy.dev import ctl
from rabbitproxy.dev.node_process import NodeProcess
from rabbitproxy.dev.nodes import Node


class BrokerQueries:
    """Maintenance mode and connection listings, through ``rabbitmqctl`` and ``rabbitmq-upgrade``."""

    nodes: list[Node]

    # Provided by DevCluster.
    def rabbitmqctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        raise NotImplementedError

    def rabbitmq_upgrade(self, node: Node, *args: str, timeout: float = 120) -> str:
        raise NotImplementedError

    def _any_responsive_node(self) -> Node:
        raise NotImplementedError

    def _proc(self, node: Node) -> NodeProcess:
        raise NotImplementedError

    def _alive(self, node: Node) -> bool:
        raise NotImplementedError

    def drain(self, node: Node, timeout: float = 120) -> None:
        """Put the node in maintenance mode (``rabbitmq-upgrade drain``).

        On 3.10.8 this closes its client connections and its AMQP *and* management listeners; the node keeps running
        and its peers still report it running. Undo with :meth:`revive`.
        """
        self.rabbitmq_upgrade(node, "drain", timeout=timeout)

    def revive(self, node: Node, timeout: float = 120) -> None:
        """Take the node out of maintenance mode (``rabbitmq-upgrade revive``): its listeners open again."""
        self.rabbitmq_upgrade(node, "revive", timeout=timeout)

    def list_connections(self, *fields: str) -> list[dict[str, str]]:
        """Client connections of the whole cluster with the given ``list_connections`` columns.

        Asks the first node that is neither paused nor down; it still waits for every other cluster
        member, so it fails (after the CLI timeout) while a node is paused.

        Values that are not strings in rabbitmqctl's JSON (ports, counters, client properties) are
        returned JSON-encoded, so every value is a string.
        """
        columns = fields or ("name",)
        out = self.rabbitmqctl(self._any_responsive_node(), "list_connections", "--formatter", "json", "-q", *columns)
        rows: list[dict[str, Any]] = json.loads(out) if out.strip() else []
        return [{key: ctl.as_text(value) for key, value in row.items()} for row in rows]

    def connection_counts(self) -> dict[str, int]:
        """Client AMQP connections per node, as each broker itself counts them.

        Killed or stopped nodes count 0. Paused nodes are left out: they cannot answer, and a guess
        would be wrong as soon as clients notice the pause.
        """
        # Each node is asked for its own count. The cluster-wide list_connections would be one CLI
        # run instead of N, but it waits on every member, so one paused node makes it hang, and its
        # JSON pids ("#PID<11016.1213.0>") do not name the node.
        asked = [node for node in self.nodes if not self._proc(node).paused]
        with ThreadPoolExecutor(max_workers=max(1, len(asked))) as pool:
            counts = list(pool.map(self._local_connection_count, asked))
        return {node.name: count for node, count in zip(asked, counts, strict=True)}

    def _local_connection_count(self, node: Node) -> int:
        if not self._alive(node):
            return 0
        # The same registry list_connections reads, restricted to this node.
        out = self.rabbitmqctl(node, "eval", "length(rabbit_networking:local_connections()).", timeout=60)
        return int(out.strip())


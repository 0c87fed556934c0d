"""What ``rabbitproxy demo`` prints once it runs: where to look, and the exact commands that show what the proxy does
with the demo's own nodes (maintenance mode, a resource alarm, a drain through the broker, who is connected)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from rabbitproxy.dev.nodes import Node

# The demo's nodes run with vm_memory_high_watermark.absolute = 1GB (rabbitproxy.dev.nodes.config_lines); a
# watermark this low raises the memory alarm at once, and setting 1GB again clears it.
ALARM_WATERMARK = "0.0000001"
NORMAL_WATERMARK = ("absolute", "1GB")


class ShellLines(Protocol):
    """The one thing the guide needs from a cluster: how to run its CLI against one of its nodes."""

    def shell_line(self, node: Node, tool: str, *args: str) -> str: ...


def demo_config(nodes: Sequence[Node], backends: Sequence[str], listen: str, admin: str) -> dict[str, Any]:
    """The demo proxy's configuration: one AMQP service over ``nodes``, named ``backends``, with the node monitor on.

    ``[services.rabbitmq]`` is what sets the proxy apart: each node's alarms and maintenance mode, read from its own
    management API (the demo's guest user is an administrator), and drains that close connections through the
    broker. alarm_weight 10: a node with an alarm still takes a few new clients, so the page shows it "up".
    """
    return {
        "admin": {"listen": admin},
        "services": [
            {
                "name": "amqp",
                "listen": listen,
                "backends": [
                    {"name": name, "address": "127.0.0.1", "port": n.amqp_port, "management_port": n.management_port}
                    for name, n in zip(backends, nodes, strict=True)
                ],
                "rabbitmq": {"interval": 2.0, "alarm_weight": 10},
            }
        ],
    }


def rabbitproxy_command() -> str:
    """How this very rabbitproxy is started from a shell: its script when it is one, else ``python -m``."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("rabbitproxy") else shutil.which("rabbitproxy")
    return script or f"{sys.executable} -m rabbitproxy"


def what_to_try(cluster: ShellLines, nodes: Sequence[Node], backends: Sequence[str], admin: str) -> list[str]:
    """The lines printed under the demo's addresses; ``backends`` are the proxy's names for ``nodes``, in order."""
    rp = rabbitproxy_command()
    url = f"http://{admin}"
    # The last node is the one taken out: with three nodes the other two keep serving.
    node, name = nodes[-1], backends[-1]
    first, first_name = nodes[0], backends[0]
    return [
        "What to try (in another shell; keep the System Overview page open to watch):",
        "  who is connected through the proxy (user, vhost, connection name, bytes):",
        f"    {rp} connections --admin {url}",
        f"  put {name} in RabbitMQ maintenance mode: the page shows it as 'maintenance', no new clients go there,",
        "  and its clients are closed by the broker and reconnect to the other nodes; then bring it back:",
        f"    {cluster.shell_line(node, 'rabbitmq-upgrade', 'drain')}",
        f"    {cluster.shell_line(node, 'rabbitmq-upgrade', 'revive')}",
        f"  raise a memory alarm on {first_name} (publishers are blocked cluster-wide, the proxy gives the node",
        "  alarm_weight % of its weight and does not mark it down), then clear it:",
        f"    {cluster.shell_line(first, 'rabbitmqctl', 'set_vm_memory_high_watermark', ALARM_WATERMARK)}",
        f"    {cluster.shell_line(first, 'rabbitmqctl', 'set_vm_memory_high_watermark', *NORMAL_WATERMARK)}",
        f"  drain {first_name} from the proxy's side: after 30 s the broker closes what is left (320, with a reason):",
        f"    {rp} backend drain amqp {first_name} --deadline 30s --admin {url}",
        f"    {rp} backend ready amqp {first_name} --admin {url}",
        f"  the same state as the page, in the terminal: {rp} status --admin {url}",
    ]

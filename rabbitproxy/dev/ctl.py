"""Where Debian's RabbitMQ scripts live and how ``rabbitmqctl`` is run against one of our nodes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from rabbitproxy.dev import nodes
from rabbitproxy.dev.nodes import Node

# The /usr/sbin wrappers switch to the ``rabbitmq`` system user; these scripts run as whoever calls them.
RABBITMQ_BIN_DIR = Path("/usr/lib/rabbitmq/bin")
INSTALL_HINT = "sudo apt-get install -y rabbitmq-server"


class RabbitMQNotInstalled(RuntimeError):  # noqa: N818 - name is part of the published API
    """The RabbitMQ server scripts are not where the Debian package puts them."""


class DevClusterError(RuntimeError):
    """A node failed to start, join the cluster or stop in time."""


class RabbitMQCtlError(subprocess.CalledProcessError):
    """``rabbitmqctl`` exited non-zero; ``str()`` includes what it printed."""

    def __str__(self) -> str:
        detail = (self.stderr or self.stdout or "").strip()
        return f"{super().__str__()}\n{detail}" if detail else super().__str__()


def rabbitmq_installed(bin_dir: Path = RABBITMQ_BIN_DIR) -> bool:
    """Whether the server and CLI scripts this package runs are present."""
    return all(os.access(bin_dir / tool, os.X_OK) for tool in ("rabbitmq-server", "rabbitmqctl"))


def rabbitmqctl(
    bin_dir: Path, home: Path, node: Node, *args: str, timeout: float = 60, tool: str = "rabbitmqctl"
) -> str:
    """Run ``rabbitmqctl -n <node> args...`` (or another CLI ``tool``, e.g. rabbitmq-upgrade) and return its stdout.

    Raises RabbitMQCtlError (a CalledProcessError carrying stderr) on a non-zero exit and
    subprocess.TimeoutExpired when it takes longer than ``timeout`` seconds.
    """
    argv = [str(bin_dir / tool), "-n", node.name, *args]
    done = subprocess.run(argv, env=nodes.ctl_env(home), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RabbitMQCtlError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout


def as_text(value: object) -> str:
    """A value of rabbitmqctl's JSON as a string: strings as they are, anything else JSON-encoded."""
    return value if isinstance(value, str) else json.dumps(value)


def check_localhost() -> None:
    """Raise DevClusterError unless ``localhost`` resolves to loopback.

    Node names end in @localhost; if it does not resolve to loopback, nodes and CLI cannot find each other.
    """
    try:
        address = socket.gethostbyname("localhost")
    except OSError as exc:
        raise DevClusterError("'localhost' does not resolve; add it to /etc/hosts") from exc
    if not address.startswith("127."):
        raise DevClusterError(f"'localhost' resolves to {address}, not to a loopback address")

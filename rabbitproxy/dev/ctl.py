"""Where Debian's RabbitMQ scripts live and how ``rabbitmqctl`` is run against one of our nodes."""

from __future__ import annotations

import json
import os
import shlex
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


def command(bin_dir: Path, tool: str, root: Path | None = None) -> list[str]:
    """The argv prefix that runs RabbitMQ's ``tool`` from ``bin_dir``, inside ``root`` when one is given.

    A 4.x node runs from a chrooted Debian root (:mod:`rabbitproxy.dev.rootfs`); its CLI must run there too, with
    the same Erlang release and the same HOME (and so the same cookie) as the nodes.
    """
    if root is None:
        return [str(bin_dir / tool)]
    # RabbitMQ reads /proc (its memory monitor: /proc/<pid>/smaps_rollup, /proc/meminfo) and fails to boot without
    # it. /proc is mounted in a mount namespace of the command's own, so the mount goes away with the command and
    # nothing is left mounted in the cached root; unshare and sh exec, so the pid is still that of the tool.
    script = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(root), str(bin_dir / tool)]


def rabbitmqctl(
    bin_dir: Path,
    home: Path,
    node: Node,
    *args: str,
    timeout: float = 60,
    tool: str = "rabbitmqctl",
    root: Path | None = None,
) -> str:
    """Run ``rabbitmqctl -n <node> args...`` (or another CLI ``tool``, e.g. rabbitmq-upgrade) and return its stdout.

    Raises RabbitMQCtlError (a CalledProcessError carrying stderr) on a non-zero exit and
    subprocess.TimeoutExpired when it takes longer than ``timeout`` seconds.
    """
    argv = [*command(bin_dir, tool, root), "-n", node.name, *args]
    env = nodes.ctl_env(home, root)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RabbitMQCtlError(done.returncode, argv, done.stdout, done.stderr)
    return done.stdout


def shell_line(bin_dir: Path, home: Path, node: Node, tool: str, *args: str, root: Path | None = None) -> str:
    """The command line an operator pastes into a shell to run ``tool -n <node> args`` as :func:`rabbitmqctl` does.

    Only the settings that differ from a plain shell are spelled out: the cluster's HOME (its Erlang cookie) and
    its empty env file (not the system broker's /etc/rabbitmq/rabbitmq-env.conf).
    """
    env = nodes.ctl_env(home, root)
    settings = [f"{key}={env[key]}" for key in ("HOME", "RABBITMQ_CONF_ENV_FILE")]
    return shlex.join(["env", *settings, *command(bin_dir, tool, root), "-n", node.name, *args])


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

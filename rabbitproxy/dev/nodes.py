"""Files, ports and environments of devcluster's RabbitMQ nodes: everything decided before a node is spawned."""

from __future__ import annotations

import os
import random
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Node:
    """One broker of a :class:`DevCluster`; ``management_port`` is 0 when management is disabled."""

    name: str
    amqp_port: int
    management_port: int
    dist_port: int
    index: int = 0
    dir: Path = Path()
    # The stream protocol listener (rabbitmq_stream, 4.x clusters started with streams on); 0 when off.
    stream_port: int = 0

    @property
    def config_file(self) -> Path:
        return self.dir / "rabbitmq.conf"

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbitmq.pid"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def stdout_file(self) -> Path:
        return self.log_dir / "stdout.log"


def prepare_home(home: Path) -> None:
    """Create the HOME shared by a cluster's nodes and CLI runs: an empty env file and the Erlang cookie."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "rabbitmq-env.conf").touch()
    cookie = home / ".erlang.cookie"
    if not cookie.exists():
        # Created with its final mode so it is never readable by others, which Erlang refuses.
        fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(20).upper())


def make_nodes(base_dir: Path, size: int, *, management: bool, stream: bool = False) -> list[Node]:
    """``size`` nodes with fresh names and free ports, each with its directories and plugin file made."""
    token = secrets.token_hex(3)
    per_node = 4 if stream else 3
    ports = free_ports(per_node * size)
    nodes: list[Node] = []
    for i in range(size):
        amqp, management_port, dist, *rest = ports[per_node * i : per_node * (i + 1)]
        short = f"rp{i + 1}-{token}"
        node = Node(
            name=f"{short}@localhost",
            amqp_port=amqp,
            management_port=management_port if management else 0,
            dist_port=dist,
            index=i + 1,
            dir=base_dir / short,
            stream_port=rest[0] if rest else 0,
        )
        node.log_dir.mkdir(parents=True, exist_ok=True)
        (node.dir / "mnesia").mkdir(exist_ok=True)
        # The stream plugin's management pages list stream connections with their node and client properties.
        wanted = (
            ("rabbitmq_management", management),
            ("rabbitmq_stream", stream),
            ("rabbitmq_stream_management", stream and management),
        )
        plugins = [name for name, on in wanted if on]
        (node.dir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        nodes.append(node)
    return nodes


def config_lines(
    node: Node, peer: Node | None, *, management: bool, extra_config: Sequence[str], startup_timeout: float
) -> list[str]:
    """The rabbitmq.conf lines of ``node``; ``peer`` is the node its first boot joins (None: none)."""
    settings = {
        # Loopback only: with loopback_users = none the guest account would otherwise be open to the
        # network.
        "listeners.tcp.default": f"127.0.0.1:{node.amqp_port}",
        "loopback_users": "none",
        # Fixed limits, so a full disk or a big host does not decide whether publishers get blocked.
        "disk_free_limit.absolute": "50MB",
        "vm_memory_high_watermark.absolute": "1GB",
        # Tests pause nodes; a pause longer than net_ticktime partitions the cluster, and the default
        # "ignore" mode would leave it partitioned after the node resumes.
        "cluster_partition_handling": "autoheal",
        "log.file.level": "info",
        "log.console": "false",
    }
    if management:
        settings["management.tcp.port"] = str(node.management_port)
        settings["management.tcp.ip"] = "127.0.0.1"
    if node.stream_port:
        settings["stream.listeners.tcp.1"] = f"127.0.0.1:{node.stream_port}"
    if peer is not None:
        # A node with empty data finds the cluster through classic peer discovery on its first boot, so
        # nobody has to be stopped and rejoined later: nodes 2..N join node 1, a node rebooted from wiped
        # data joins a running member. Node 1 has no peer and forms the cluster, so parallel booting
        # nodes never each form their own. A node booted from existing data ignores these settings and
        # rejoins through Mnesia.
        interval_ms = 500
        settings["cluster_formation.peer_discovery_backend"] = "classic_config"
        settings["cluster_formation.classic_config.nodes.1"] = peer.name
        settings["cluster_formation.discovery_retry_interval"] = str(interval_ms)
        settings["cluster_formation.discovery_retry_limit"] = str(max(10, int(startup_timeout * 1000 / interval_ms)))
    extra: list[str] = []
    for line in extra_config:
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            # The caller's value replaces ours instead of appearing twice.
            settings[key.strip()] = value.strip()
        else:
            extra.append(line)
    return [f"{key} = {value}" for key, value in settings.items()] + extra


def inside(root: Path | None, path: Path) -> str:
    """``path`` (on the host) as a process chrooted to ``root`` sees it; unchanged without a root."""
    return str(path) if root is None else f"/{path.relative_to(root)}"


def node_env(node: Node, home: Path, root: Path | None = None) -> dict[str, str]:
    """Environment of the rabbitmq-server wrapper that runs ``node`` (chrooted to ``root`` when given)."""
    env = ctl_env(home, root)
    env.update(
        RABBITMQ_NODENAME=node.name,
        RABBITMQ_CONFIG_FILE=inside(root, node.config_file),
        RABBITMQ_ADVANCED_CONFIG_FILE=inside(root, node.dir / "advanced.config"),
        RABBITMQ_DIST_PORT=str(node.dist_port),
        RABBITMQ_MNESIA_BASE=inside(root, node.dir / "mnesia"),
        RABBITMQ_LOG_BASE=inside(root, node.log_dir),
        RABBITMQ_ENABLED_PLUGINS_FILE=inside(root, node.dir / "enabled_plugins"),
        RABBITMQ_PID_FILE=inside(root, node.pid_file),
        # Keep inter-node traffic on loopback like the other listeners.
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        # Nobody reads the crash dump of a throwaway node, and writing one delays the exit of a failed boot,
        # which devcluster waits for before it tries again.
        ERL_CRASH_DUMP_SECONDS="0",
    )
    return env


def ctl_env(home: Path, root: Path | None = None) -> dict[str, str]:
    """Environment of rabbitmqctl runs, with the cluster's own HOME (and so its Erlang cookie).

    With a ``root`` (a 4.x cluster run from a chroot) the paths are those the chrooted process sees.
    """
    # Inherited RABBITMQ_* settings (a developer's shell, the system service) must not leak in.
    env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
    env.update(
        HOME=inside(root, home),
        LC_ALL="C.UTF-8",
        RABBITMQ_USE_LONGNAME="false",
        # An empty env file instead of /etc/rabbitmq/rabbitmq-env.conf, which belongs to the system
        # broker.
        RABBITMQ_CONF_ENV_FILE=inside(root, home / "rabbitmq-env.conf"),
        # By default every CLI run claims a port in 35672-35682; concurrent runs across clusters and
        # test workers would exhaust that range. 0..0 lets the kernel pick any free port.
        RABBITMQ_CTL_DIST_PORT_MIN="0",
        RABBITMQ_CTL_DIST_PORT_MAX="0",
        # Erlang's schedulers spin before sleeping by default. The server scripts turn that off, but
        # not for the CLI, and on a loaded 2-core machine the spinning made each CLI run take 3-13 s
        # instead of 1.5 s.
        RABBITMQ_CTL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none",
    )
    return env


def free_ports(count: int) -> list[int]:
    """Ports free right now, below the kernel's ephemeral range when there is room there.

    A port the kernel handed out for port 0 can be handed out again to anything that binds port 0 or
    connects out before the node binds it. A rabbitmqctl run took a node's distribution port that way
    (dist_port_already_used), so the ports come from below the ephemeral range, which the kernel never
    picks on its own. All sockets stay open until all ports are picked, so none is picked twice.
    """
    low = _ephemeral_low()
    sockets: list[socket.socket] = []
    try:
        for port in _candidate_ports(low):
            if len(sockets) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        while len(sockets) < count:  # no room below the range: let the kernel choose after all
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default start of the range


def _candidate_ports(ephemeral_low: int) -> list[int]:
    # Above the ports of well-known services (and the system broker's 5672, 15672, 25672); shuffled so that
    # clusters started at the same time rarely try the same ports.
    first = 26000
    if ephemeral_low - first < 1000:
        return []
    return random.sample(range(first, ephemeral_low), min(200, ephemeral_low - first))

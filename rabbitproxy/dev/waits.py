"""The waits of a node's boot: until it runs, until it is in its peer's cluster, until it sees every member.

Each wait is bounded by a deadline, polls rather than trusting one long CLI call, and stops early when ``abort``
is set (another node of the same boot failed). They run in worker threads, one per booting node.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable

from rabbitproxy.dev.ctl import DevClusterError, RabbitMQCtlError
from rabbitproxy.dev.node_process import NodeProcess
from rabbitproxy.dev.nodes import Node

# ``rabbitmqctl`` bound to one cluster: (node, *args, timeout=...) -> stdout.
Ctl = Callable[..., str]

# How often to look again while waiting for something external to happen. Deadlines, not this interval,
# decide when to give up, so a slow machine only makes the wait longer.
POLL_INTERVAL = 0.25
# Longest single rabbitmqctl wait, so a wait notices a crashed peer or a deadline in between.
CTL_WAIT_SLICE = 20


class BootFailed(Exception):  # noqa: N818 - an outcome that the cluster retries, not an error it reports
    """One boot attempt of one node failed in a way that a fresh attempt from wiped data may fix."""


def ctl_wait(ctl: Ctl, node: Node, deadline: float, *args: str) -> None:
    """Run a blocking rabbitmqctl wait command, bounded so the caller can check again in between."""
    seconds = max(1, min(CTL_WAIT_SLICE, int(deadline - time.monotonic())))
    ctl(node, *args, "--timeout", str(seconds), timeout=seconds + 30)


def await_booted(ctl: Ctl, running: NodeProcess, deadline: float, abort: threading.Event, budget: float) -> bool:
    """True once the node runs; False when aborted or killed on purpose; BootFailed on a failure."""
    node = running.node
    while not abort.is_set():
        proc = running.proc
        assert proc is not None
        if proc.poll() is not None:
            if running.down:
                return False
            raise BootFailed(f"exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise BootFailed(f"did not boot within {budget:.0f}s")
        # The node writes its pid file once it runs; only then is starting a CLI VM worth it. await_startup
        # fails fast while the node is not registered with epmd yet, and blocks while it boots.
        if node.pid_file.exists():
            try:
                ctl_wait(ctl, node, deadline, "await_startup")
                return True
            except (RabbitMQCtlError, subprocess.TimeoutExpired):
                pass
        time.sleep(POLL_INTERVAL)
    return False


def check_joined(ctl: Ctl, node: Node, peer: Node | None) -> int:
    """Raise BootFailed unless the booted node is a member of ``peer``'s cluster; count running nodes."""
    if peer is None:
        return 1  # a node forming its own cluster: itself
    # Peer discovery that gives up boots the node as a cluster of its own; it would never see the others, so
    # this is a failed boot rather than something to wait out.
    try:
        status = json.loads(ctl(node, "cluster_status", "--formatter", "json"))
    except (RabbitMQCtlError, subprocess.TimeoutExpired, ValueError) as exc:
        raise BootFailed(f"booted but did not report its cluster status: {exc}") from exc
    if not isinstance(status, dict):
        raise BootFailed(f"booted but reported a strange cluster status: {status!r}")
    members = status.get("disk_nodes", [])
    if peer.name not in members:
        raise BootFailed(f"booted outside the cluster of {peer.name} (members: {members})")
    return len(status.get("running_nodes", []))


def await_members(
    ctl: Ctl,
    running: NodeProcess,
    members: int,
    deadline: float,
    abort: threading.Event,
    tails: Callable[[], str],
) -> bool:
    """True once the node counts ``members`` running cluster nodes; False when aborted."""
    node = running.node
    while not abort.is_set():
        proc = running.proc
        assert proc is not None
        # Only this node's own exit is an error here: a peer that crashed is being booted again.
        if proc.poll() is not None:
            raise DevClusterError(f"{node.name} exited with status {proc.returncode}" + tails())
        if time.monotonic() > deadline:
            raise DevClusterError(f"{node.name} did not see {members} running cluster node(s) in time" + tails())
        try:
            ctl_wait(ctl, node, deadline, "await_online_nodes", str(members))
            return True
        except (RabbitMQCtlError, subprocess.TimeoutExpired):
            time.sleep(POLL_INTERVAL)
    return False

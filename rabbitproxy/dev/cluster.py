"""Start and stop a throwaway local RabbitMQ cluster for tests, benchmarks and the demo.

The nodes come from Debian's ``rabbitmq-server`` package but run as the current user, each in its own
directory under one temporary base directory and on free loopback ports, so several clusters (and the
system broker on 5672) can coexist on one machine. Everything is synchronous: callers are pytest fixtures
and CLI commands, and the slow parts are external processes anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self

from rabbitproxy.dev import ctl, nodes, processes, rootfs, waits
from rabbitproxy.dev.ctl import (
    INSTALL_HINT,
    RABBITMQ_BIN_DIR,
    DevClusterError,
    RabbitMQCtlError,
    RabbitMQNotInstalled,
    rabbitmq_installed,
)
from rabbitproxy.dev.node_process import STOP_GRACE, NodeProcess
from rabbitproxy.dev.nodes import Node
from rabbitproxy.dev.queries import BrokerQueries

__all__ = [
    "INSTALL_HINT",
    "RABBITMQ_BIN_DIR",
    "RELEASES",
    "DevCluster",
    "DevClusterError",
    "Node",
    "RabbitMQCtlError",
    "RabbitMQNotInstalled",
    "rabbitmq_installed",
]

_LOG_TAIL_LINES = 40
# Boots per node before start() or restart() gives up. A node that crashed while joining (seen on a loaded
# 2-core machine: schema_integrity_check_failed) boots fine from a wiped data directory, so a few attempts
# turn a rare crash into a short delay instead of a failed test session.
_BOOT_ATTEMPTS = 3
# "system": the host's rabbitmq-server package (3.10.8 on Debian 12). "4.0": Debian 13's 4.0.5 run from a cached
# chroot (rabbitproxy.dev.rootfs), built on first use.
RELEASES = ("system", "4.0")


class DevCluster(BrokerQueries):
    """N clustered local RabbitMQ nodes; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        size: int = 3,
        *,
        base_dir: Path | None = None,
        management: bool = True,
        extra_config: Sequence[str] = (),
        startup_timeout: float = 120.0,
        log: Callable[[str], None] | None = None,
        release: str = "system",
        stream: bool = False,
        node_config: Callable[[Node], Sequence[str]] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, got size={size}")
        if release not in RELEASES:
            raise ValueError(f"release must be one of {', '.join(RELEASES)}, got {release!r}")
        self.size = size
        self.release = release
        # The stream plugin and a stream listener per node (Node.stream_port).
        self.stream = stream
        self.management = management
        self.extra_config = tuple(extra_config)
        # rabbitmq.conf lines that differ per node (e.g. each node's stream.advertised_port), after extra_config.
        self.node_config = node_config
        self.startup_timeout = startup_timeout
        self.nodes: list[Node] = []
        self.base_dir: Path | None = base_dir
        self._own_base_dir = base_dir is None
        self._log: Callable[[str], None] = log or (lambda _line: None)
        self._procs: dict[str, NodeProcess] = {}
        self._home = Path()
        # The chroot the nodes and their CLI run in; None for the host's own RabbitMQ.
        self._root: Path | None = None
        # Set by stop(), under the lock _spawn() holds: a boot thread that outlived a failed start() must not
        # start a node after stop() has killed the others.
        self._stopped = False
        self._spawn_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every node, cluster them and wait until each node runs and sees all the others.

        A node that crashes or fails to join while booting is killed, its data wiped and booted again, up
        to three times; startup_timeout bounds each attempt.
        """
        if self.nodes:
            raise RuntimeError("DevCluster.start() may only be called once")
        if self.release == "system":
            if not rabbitmq_installed(RABBITMQ_BIN_DIR):
                raise RabbitMQNotInstalled(
                    f"RabbitMQ was not found in {RABBITMQ_BIN_DIR}; install it with: {INSTALL_HINT}"
                )
        else:
            try:
                self._root = rootfs.ensure_root(self.release, log=self._log)
            except rootfs.RootfsError as exc:
                raise RabbitMQNotInstalled(f"RabbitMQ {self.release} is not available: {exc}") from exc
        ctl.check_localhost()
        began = time.monotonic()
        self._prepare()
        # Stopping is registered before anything is spawned: the nodes run in their own sessions, so an
        # interpreter that exits without stop() (Ctrl-C in the demo) would otherwise leave them behind.
        atexit.register(self._stop_at_exit)
        try:
            # Node 1 boots alone first. A node that joins a peer which is still creating its tables can
            # copy a half-made schema and crash (schema_integrity_check_failed); joining a node that has
            # finished booting avoids that race, and the other nodes then boot in parallel. Booting all
            # at once saves a few seconds but keeps the race, and a crashed joiner is hard to clean up
            # while the node it half joined is itself still booting.
            first, *rest = self.nodes
            self._log(f"starting {first.name} in {self.base_dir}")
            self._bring_up([first], peer=None, members=1)
            if rest:
                self._log(f"{first.name} is up; starting {len(rest)} more node(s) to join it")
                self._bring_up(rest, peer=first, members=self.size, watch=[first])
        except BaseException:
            self.stop()
            raise
        self._log(f"cluster of {self.size} node(s) ready in {time.monotonic() - began:.1f}s")

    def stop(self) -> None:
        """Stop every node (gracefully, then by force after a deadline) and remove the temp dir."""
        atexit.unregister(self._stop_at_exit)
        with self._spawn_lock:
            self._stopped = True
        running = [node for node in self.nodes if self._alive(node)]
        if running:
            self._log(f"stopping {len(running)} node(s)")
        with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            # list() re-raises the first error only after every node has had its turn.
            list(pool.map(self._stop_node, self.nodes))
        if self._own_base_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def _stop_at_exit(self) -> None:
        # The interpreter is going away: no thread pool can run any more, and the data is thrown away with
        # the temp dir anyway, so the nodes are killed one after the other instead of stopped politely.
        with self._spawn_lock:
            self._stopped = True
        for node in self.nodes:
            with contextlib.suppress(DevClusterError):
                self._kill(node)
        if self._own_base_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- operations on single nodes ----------------------------------------------------------------

    def pause(self, node: Node) -> None:
        """Freeze the node's Erlang VM (SIGSTOP): it keeps its sockets but answers nothing."""
        self._proc(node).pause()

    def resume(self, node: Node) -> None:
        """Let a paused node run again (SIGCONT)."""
        self._proc(node).resume()

    def kill(self, node: Node) -> None:
        """Kill the node without any shutdown (SIGKILL), like a crash or power loss."""
        self._kill(self._node(node))

    def restart(self, node: Node) -> None:
        """Start a killed or stopped node again on the same ports and data; wait until it rejoined.

        Like start(), a node that crashes while booting is booted again from wiped data, which makes it
        join the cluster afresh through a running member.
        """
        node = self._node(node)
        if self._alive(node):
            self._stop_node(node)
        others = [n for n in self.nodes if n.name != node.name]
        peer = next((n for n in others if self._responsive(n)), None)
        # A node restarted from its data directory rejoins through Mnesia, not peer discovery; waiting until
        # it sees every node that is still up keeps tests from racing the rejoin.
        self._bring_up([node], peer=peer, members=1 + sum(self._alive(n) for n in others))

    def beam_pid(self, node: Node) -> int | None:
        """PID of the node's Erlang VM (beam.smp), or None when it is not running."""
        return self._proc(node).beam_pid()

    # -- rabbitmqctl -------------------------------------------------------------------------------

    def rabbitmqctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> args...`` and return its stdout.

        Raises RabbitMQCtlError (a CalledProcessError carrying stderr) on a non-zero exit and
        subprocess.TimeoutExpired when it takes longer than ``timeout`` seconds.
        """
        return ctl.rabbitmqctl(RABBITMQ_BIN_DIR, self._home, self._node(node), *args, timeout=timeout, root=self._root)

    def rabbitmq_upgrade(self, node: Node, *args: str, timeout: float = 120) -> str:
        """Run ``rabbitmq-upgrade -n <node> args...`` (maintenance mode), like :meth:`rabbitmqctl`."""
        target = self._node(node)
        return ctl.rabbitmqctl(
            RABBITMQ_BIN_DIR, self._home, target, *args, timeout=timeout, tool="rabbitmq-upgrade", root=self._root
        )

    def shell_line(self, node: Node, tool: str, *args: str) -> str:
        """What to type in another shell to run ``tool`` (rabbitmqctl, rabbitmq-upgrade) against ``node``."""
        return ctl.shell_line(RABBITMQ_BIN_DIR, self._home, self._node(node), tool, *args, root=self._root)

    def amqp_url(self, node: Node) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self._node(node).amqp_port}/"

    def management_url(self, node: Node) -> str:
        return f"http://127.0.0.1:{self._node(node).management_port}/"

    # -- internals ---------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self.base_dir is None:
            # A chrooted node sees only its root, so the node directories (config, data, logs) live inside it, in
            # the root's var/tmp; the host reaches them through the same paths as ever, via the root's path.
            tmp_dir = None if self._root is None else self._root / "var/tmp"
            self.base_dir = Path(tempfile.mkdtemp(prefix="rabbitproxy-devcluster-", dir=tmp_dir))
        elif self._root is not None:
            self.base_dir = self.base_dir.resolve()
            if not self.base_dir.is_relative_to(self._root):
                raise ValueError(f"a {self.release} cluster needs its base_dir inside {self._root}: {self.base_dir}")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._home = self.base_dir / "home"
        nodes.prepare_home(self._home)
        self.nodes.extend(nodes.make_nodes(self.base_dir, self.size, management=self.management, stream=self.stream))
        first = self.nodes[0]
        for node in self.nodes:
            self._write_config(node, peer=None if node is first else first)

    def _write_config(self, node: Node, peer: Node | None) -> None:
        lines = nodes.config_lines(
            node,
            peer,
            management=self.management,
            extra_config=(*self.extra_config, *(self.node_config(node) if self.node_config else ())),
            startup_timeout=self.startup_timeout,
        )
        node.config_file.write_text("".join(f"{line}\n" for line in lines))

    def _spawn(self, node: Node) -> None:
        with self._spawn_lock:
            if self._stopped:
                raise DevClusterError(f"not starting {node.name}: the cluster was stopped")
            running = self._procs.setdefault(node.name, NodeProcess(node))
            running.spawn(ctl.command(RABBITMQ_BIN_DIR, "rabbitmq-server", self._root), self._home, self._root)

    def _bring_up(self, nodes: Sequence[Node], peer: Node | None, members: int, watch: Sequence[Node] = ()) -> None:
        """Boot ``nodes`` in parallel into ``peer``'s cluster (None: form one) and wait for the members.

        Returns once each of ``nodes`` and of the already running ``watch`` nodes counts ``members``
        running cluster nodes.
        """
        began = time.monotonic()
        # Covers every boot attempt of the slowest node, which the others wait for.
        deadline = began + self.startup_timeout * _BOOT_ATTEMPTS

        def one(node: Node, abort: threading.Event) -> None:
            if node in watch:
                self._await_members(node, members, deadline, abort)
                return
            seen = self._boot(node, peer, abort)
            if seen is not None and (seen >= members or self._await_members(node, members, deadline, abort)):
                self._log(f"{node.name} is running ({time.monotonic() - began:.1f}s)")

        # The running nodes wait alongside the booting ones, so their CLI calls overlap the boots.
        processes.run_in_parallel([*watch, *nodes], one)

    def _boot(self, node: Node, peer: Node | None, abort: threading.Event) -> int | None:
        """Boot the node, retrying from wiped data; None when aborted because another node failed.

        Returns how many running cluster nodes the node saw right after booting.
        """
        failures: list[str] = []
        for attempt in range(1, _BOOT_ATTEMPTS + 1):
            if abort.is_set():
                return None
            if failures:
                self._log(
                    f"{node.name} {failures[-1]}; wiping its data and booting it again"
                    f" (attempt {attempt} of {_BOOT_ATTEMPTS})"
                )
                self._wipe(node, peer)
            self._spawn(node)
            try:
                budget = self.startup_timeout
                running = self._procs[node.name]
                if not waits.await_booted(self.rabbitmqctl, running, time.monotonic() + budget, abort, budget):
                    return None
                return waits.check_joined(self.rabbitmqctl, node, peer)
            except waits.BootFailed as exc:
                failures.append(str(exc))
        tails = self._tails(node)
        # The last attempt may still run (a boot that timed out); a caller of restart() must not be left
        # with a half-started node, and stop() would kill it anyway.
        self._kill(node)
        attempts = "".join(f"\n  attempt {i}: {node.name} {reason}" for i, reason in enumerate(failures, 1))
        raise DevClusterError(f"{node.name} failed to start {_BOOT_ATTEMPTS} times:{attempts}{tails}")

    def _wipe(self, node: Node, peer: Node | None) -> None:
        """Kill the node and empty its data, so its next boot joins ``peer``'s cluster afresh."""
        self._kill(node)
        shutil.rmtree(node.dir / "mnesia", ignore_errors=True)
        (node.dir / "mnesia").mkdir()
        self._write_config(node, peer)
        if peer is not None:
            # The failed boot may have registered the node with the cluster already; the peer would then
            # refuse the blank node of that name as inconsistent. Not being a member is fine too.
            try:
                self.rabbitmqctl(peer, "forget_cluster_node", node.name)
            except (RabbitMQCtlError, subprocess.TimeoutExpired) as exc:
                self._log(f"{peer.name} did not forget {node.name}: {str(exc).splitlines()[-1]}")

    def _await_members(self, node: Node, members: int, deadline: float, abort: threading.Event) -> bool:
        running = self._procs[node.name]
        return waits.await_members(self.rabbitmqctl, running, members, deadline, abort, lambda: self._tails(node))

    def _stop_node(self, node: Node) -> None:
        running = self._procs.get(node.name)
        if running is not None:
            running.stop(lambda: self._ctl_stop(node), self._log)

    def _ctl_stop(self, node: Node) -> None:
        self.rabbitmqctl(node, "stop", timeout=STOP_GRACE)

    def _kill(self, node: Node) -> None:
        running = self._procs.get(node.name)
        if running is not None:
            running.kill()

    def _proc(self, node: Node) -> NodeProcess:
        node = self._node(node)
        running = self._procs.get(node.name)
        if running is None:
            raise DevClusterError(f"{node.name} is not running")
        return running

    def wrapper_pid(self, node: Node) -> int | None:
        """PID of the node's ``rabbitmq-server`` wrapper script (the top of its process tree)."""
        proc = self._procs[self._node(node).name].proc
        return None if proc is None else proc.pid

    def _alive(self, node: Node) -> bool:
        running = self._procs.get(node.name)
        return running is not None and running.alive

    def _responsive(self, node: Node) -> bool:
        running = self._procs.get(node.name)
        return running is not None and running.responsive

    def _any_responsive_node(self) -> Node:
        for node in self.nodes:
            if self._responsive(node):
                return node
        raise DevClusterError("no node of the cluster is running")

    def _node(self, node: Node) -> Node:
        for own in self.nodes:
            if own.name == node.name:
                return own
        raise ValueError(f"{node.name} is not a node of this cluster")

    def _tails(self, node: Node) -> str:
        return "".join(
            f"\n--- last lines of {path} ---\n{processes.tail(path, _LOG_TAIL_LINES)}"
            for path in (node.stdout_file, node.log_file)
        )

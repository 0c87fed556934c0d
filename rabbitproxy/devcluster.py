"""Start and stop a throwaway local RabbitMQ cluster for tests, benchmarks and the demo.

The nodes come from Debian's ``rabbitmq-server`` package but run as the current user, each in its own
directory under one temporary base directory and on free loopback ports, so several clusters (and the
system broker on 5672) can coexist on one machine. Everything is synchronous: callers are pytest fixtures
and CLI commands, and the slow parts are external processes anyway.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil

# The /usr/sbin wrappers switch to the ``rabbitmq`` system user; these scripts run as whoever calls them.
RABBITMQ_BIN_DIR = Path("/usr/lib/rabbitmq/bin")
INSTALL_HINT = "sudo apt-get install -y rabbitmq-server"

# How often to look again while waiting for something external to happen. Deadlines, not this interval,
# decide when to give up, so a slow machine only makes the wait longer.
_POLL_INTERVAL = 0.25
_STOP_GRACE = 30.0
# Longest single rabbitmqctl wait, so a wait notices a crashed peer or a deadline in between.
_CTL_WAIT_SLICE = 20
_LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Node:
    """One broker of a :class:`DevCluster`; ``management_port`` is 0 when management is disabled."""

    name: str
    amqp_port: int
    management_port: int
    dist_port: int
    index: int = 0
    dir: Path = Path()

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


class RabbitMQNotInstalled(RuntimeError):  # noqa: N818 - name is part of the published API
    """The RabbitMQ server scripts are not where the Debian package puts them."""


class DevClusterError(RuntimeError):
    """A node failed to start, join the cluster or stop in time."""


class RabbitMQCtlError(subprocess.CalledProcessError):
    """``rabbitmqctl`` exited non-zero; ``str()`` includes what it printed."""

    def __str__(self) -> str:
        detail = (self.stderr or self.stdout or "").strip()
        return f"{super().__str__()}\n{detail}" if detail else super().__str__()


def rabbitmq_installed() -> bool:
    """Whether the server and CLI scripts this module runs are present (for skip markers)."""
    return all(os.access(RABBITMQ_BIN_DIR / tool, os.X_OK) for tool in ("rabbitmq-server", "rabbitmqctl"))


class DevCluster:
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
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, got size={size}")
        self.size = size
        self.management = management
        self.extra_config = tuple(extra_config)
        self.startup_timeout = startup_timeout
        self.nodes: list[Node] = []
        self.base_dir: Path | None = base_dir
        self._own_base_dir = base_dir is None
        self._log: Callable[[str], None] = log or (lambda _line: None)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._paused: set[str] = set()
        # Nodes killed or stopped on purpose: their exit is not a startup failure.
        self._down: set[str] = set()
        self._home = Path()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every node, cluster them and wait until each node runs and sees all the others."""
        if self.nodes:
            raise RuntimeError("DevCluster.start() may only be called once")
        if not rabbitmq_installed():
            raise RabbitMQNotInstalled(f"RabbitMQ was not found in {RABBITMQ_BIN_DIR}; install it with: {INSTALL_HINT}")
        _check_localhost()
        began = time.monotonic()
        deadline = began + self.startup_timeout
        self._prepare()
        # Stopping is registered before anything is spawned: the nodes run in their own sessions, so an
        # interpreter that exits without stop() (Ctrl-C in the demo) would otherwise leave them behind.
        atexit.register(self.stop)
        try:
            for node in self.nodes:
                self._spawn(node)
            self._log(f"started {self.size} RabbitMQ node(s) in {self.base_dir}; waiting for them to boot")
            self._await_ready(self.nodes, self.size, deadline)
        except BaseException:
            self.stop()
            raise
        self._log(f"cluster of {self.size} node(s) ready in {time.monotonic() - began:.1f}s")

    def stop(self) -> None:
        """Stop every node (gracefully, then by force after a deadline) and remove the temp dir."""
        atexit.unregister(self.stop)
        running = [node for node in self.nodes if self._alive(node)]
        if running:
            self._log(f"stopping {len(running)} node(s)")
        with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            # list() re-raises the first error only after every node has had its turn.
            list(pool.map(self._stop_node, self.nodes))
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
        node = self._node(node)
        pid = self._require_beam(node)
        os.kill(pid, signal.SIGSTOP)
        self._paused.add(node.name)
        # Signal delivery is asynchronous; callers expect the node to be frozen when this returns.
        self._await_status(node, pid, stopped=True)

    def resume(self, node: Node) -> None:
        """Let a paused node run again (SIGCONT)."""
        node = self._node(node)
        pid = self._require_beam(node)
        os.kill(pid, signal.SIGCONT)
        self._paused.discard(node.name)
        self._await_status(node, pid, stopped=False)

    def kill(self, node: Node) -> None:
        """Kill the node without any shutdown (SIGKILL), like a crash or power loss."""
        node = self._node(node)
        self._kill_tree(node, self._tree(node))
        self._paused.discard(node.name)

    def restart(self, node: Node) -> None:
        """Start a killed or stopped node again on the same ports and data; wait until it rejoined."""
        node = self._node(node)
        if self._alive(node):
            self._stop_node(node)
        deadline = time.monotonic() + self.startup_timeout
        self._spawn(node)
        # A node restarted from its data directory rejoins through Mnesia, not peer discovery; wait
        # until it sees every node that is still up, or tests would race the rejoin.
        self._await_ready([node], sum(self._alive(n) for n in self.nodes), deadline)

    def beam_pid(self, node: Node) -> int | None:
        """PID of the node's Erlang VM (beam.smp), or None when it is not running."""
        node = self._node(node)
        for proc in self._tree(node):
            with contextlib.suppress(psutil.Error):
                if proc.name().startswith("beam"):
                    return int(proc.pid)
        return None

    # -- rabbitmqctl -------------------------------------------------------------------------------

    def rabbitmqctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> args...`` and return its stdout.

        Raises RabbitMQCtlError (a CalledProcessError carrying stderr) on a non-zero exit and
        subprocess.TimeoutExpired when it takes longer than ``timeout`` seconds.
        """
        node = self._node(node)
        argv = [str(RABBITMQ_BIN_DIR / "rabbitmqctl"), "-n", node.name, *args]
        done = subprocess.run(argv, env=self._ctl_env(), capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RabbitMQCtlError(done.returncode, argv, done.stdout, done.stderr)
        return done.stdout

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
        return [{key: _as_text(value) for key, value in row.items()} for row in rows]

    def connection_counts(self) -> dict[str, int]:
        """Client AMQP connections per node, as each broker itself counts them.

        Killed or stopped nodes count 0. Paused nodes are left out: they cannot answer, and a guess
        would be wrong as soon as clients notice the pause.
        """
        # Each node is asked for its own count. The cluster-wide list_connections would be one CLI
        # run instead of N, but it waits on every member, so one paused node makes it hang, and its
        # JSON pids ("#PID<11016.1213.0>") do not name the node.
        asked = [node for node in self.nodes if node.name not in self._paused]
        with ThreadPoolExecutor(max_workers=max(1, len(asked))) as pool:
            counts = list(pool.map(self._local_connection_count, asked))
        return {node.name: count for node, count in zip(asked, counts, strict=True)}

    def _local_connection_count(self, node: Node) -> int:
        if not self._alive(node):
            return 0
        # The same registry list_connections reads, restricted to this node.
        out = self.rabbitmqctl(node, "eval", "length(rabbit_networking:local_connections()).", timeout=60)
        return int(out.strip())

    def amqp_url(self, node: Node) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self._node(node).amqp_port}/"

    def management_url(self, node: Node) -> str:
        return f"http://127.0.0.1:{self._node(node).management_port}/"

    # -- internals ---------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="rabbitproxy-devcluster-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._home = self.base_dir / "home"
        self._home.mkdir(exist_ok=True)
        (self._home / "rabbitmq-env.conf").touch()
        cookie = self._home / ".erlang.cookie"
        if not cookie.exists():
            # Created with its final mode so it is never readable by others, which Erlang refuses.
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(20).upper())
        token = secrets.token_hex(3)
        ports = _free_ports(3 * self.size)
        for i in range(self.size):
            amqp, management, dist = ports[3 * i : 3 * i + 3]
            short = f"rp{i + 1}-{token}"
            node = Node(
                name=f"{short}@localhost",
                amqp_port=amqp,
                management_port=management if self.management else 0,
                dist_port=dist,
                index=i + 1,
                dir=self.base_dir / short,
            )
            node.log_dir.mkdir(parents=True, exist_ok=True)
            (node.dir / "mnesia").mkdir(exist_ok=True)
            node.config_file.write_text("".join(f"{line}\n" for line in self._config_lines(node)))
            plugins = "[rabbitmq_management]." if self.management else "[]."
            (node.dir / "enabled_plugins").write_text(plugins + "\n")
            self.nodes.append(node)

    def _config_lines(self, node: Node) -> list[str]:
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
        if self.management:
            settings["management.tcp.port"] = str(node.management_port)
            settings["management.tcp.ip"] = "127.0.0.1"
        if node.index > 1:
            # Nodes 2..N find node 1 through classic peer discovery on first boot, so nobody has to be
            # stopped and rejoined later. Node 1 has no peers configured and always forms the cluster,
            # which rules out the race where parallel booting nodes each start their own. The retries
            # cover node 1 booting slower than its peers on a busy machine.
            interval_ms = 500
            settings["cluster_formation.peer_discovery_backend"] = "classic_config"
            settings["cluster_formation.classic_config.nodes.1"] = self.nodes[0].name
            settings["cluster_formation.discovery_retry_interval"] = str(interval_ms)
            settings["cluster_formation.discovery_retry_limit"] = str(
                max(10, int(self.startup_timeout * 1000 / interval_ms))
            )
        extra: list[str] = []
        for line in self.extra_config:
            key, sep, value = line.partition("=")
            if sep and not line.lstrip().startswith("#"):
                # The caller's value replaces ours instead of appearing twice.
                settings[key.strip()] = value.strip()
            else:
                extra.append(line)
        return [f"{key} = {value}" for key, value in settings.items()] + extra

    def _node_env(self, node: Node) -> dict[str, str]:
        env = self._ctl_env()
        env.update(
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_CONFIG_FILE=str(node.config_file),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node.dir / "advanced.config"),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_MNESIA_BASE=str(node.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.log_dir),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(node.pid_file),
            # Keep inter-node traffic on loopback like the other listeners.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _ctl_env(self) -> dict[str, str]:
        # Inherited RABBITMQ_* settings (a developer's shell, the system service) must not leak in.
        env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
        env.update(
            HOME=str(self._home),
            LC_ALL="C.UTF-8",
            RABBITMQ_USE_LONGNAME="false",
            # An empty env file instead of /etc/rabbitmq/rabbitmq-env.conf, which belongs to the system
            # broker.
            RABBITMQ_CONF_ENV_FILE=str(self._home / "rabbitmq-env.conf"),
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

    def _spawn(self, node: Node) -> None:
        # A pid file left by the previous run would make _await_booted ask the CLI too early.
        node.pid_file.unlink(missing_ok=True)
        self._down.discard(node.name)
        with node.stdout_file.open("ab") as out:
            self._procs[node.name] = subprocess.Popen(
                [str(RABBITMQ_BIN_DIR / "rabbitmq-server")],
                env=self._node_env(node),
                cwd=node.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the caller's terminal does not reach the brokers, and the
                # whole process group can be killed at once.
                start_new_session=True,
            )

    def _await_ready(self, nodes: Sequence[Node], members: int, deadline: float) -> None:
        """Wait until each of ``nodes`` has booted and counts ``members`` running cluster nodes.

        Nodes are waited for in parallel because every check starts a CLI Erlang VM, which takes
        seconds of wall time on a loaded machine even though it needs little CPU.
        """
        began = time.monotonic()
        abort = threading.Event()

        def wait(node: Node) -> None:
            try:
                if self._await_booted(node, deadline, abort) and self._await_members(node, members, deadline, abort):
                    self._log(f"{node.name} is running ({time.monotonic() - began:.1f}s)")
            except BaseException:
                abort.set()  # the other waits give up at their next check instead of at the deadline
                raise

        pool = ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="devcluster-wait")
        try:
            futures = [pool.submit(wait, node) for node in nodes]
            done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            for future in done:
                if (error := future.exception()) is not None:
                    raise error
        finally:
            abort.set()
            # Not waiting for the other threads: on failure, stop() kills their nodes next, which ends
            # any CLI call they are blocked in.
            pool.shutdown(wait=False, cancel_futures=True)

    def _await_booted(self, node: Node, deadline: float, abort: threading.Event) -> bool:
        """True once the node runs; False when the wait was aborted because another node failed."""
        while not abort.is_set():
            self._check_waiting(node, deadline, "did not boot")
            # The node writes its pid file once it runs; only then is starting a CLI VM worth it.
            # await_startup fails fast while the node is not registered with epmd yet, and blocks while
            # it boots.
            if node.pid_file.exists():
                try:
                    self._ctl_wait(node, deadline, "await_startup")
                    return True
                except (RabbitMQCtlError, subprocess.TimeoutExpired):
                    pass
            time.sleep(_POLL_INTERVAL)
        return False

    def _await_members(self, node: Node, members: int, deadline: float, abort: threading.Event) -> bool:
        """True once the node counts ``members`` running nodes in its cluster; False when aborted."""
        while not abort.is_set():
            self._check_waiting(node, deadline, f"did not see {members} running cluster node(s)")
            try:
                self._ctl_wait(node, deadline, "await_online_nodes", str(members))
                return True
            except (RabbitMQCtlError, subprocess.TimeoutExpired):
                time.sleep(_POLL_INTERVAL)
        return False

    def _ctl_wait(self, node: Node, deadline: float, *args: str) -> None:
        """Run a blocking rabbitmqctl wait command, bounded so the caller can check again in between."""
        seconds = max(1, min(_CTL_WAIT_SLICE, int(deadline - time.monotonic())))
        self.rabbitmqctl(node, *args, "--timeout", str(seconds), timeout=seconds + 30)

    def _check_waiting(self, node: Node, deadline: float, what: str) -> None:
        self._check_processes()
        if time.monotonic() > deadline:
            raise DevClusterError(f"{node.name} {what} within {self.startup_timeout:.0f}s" + self._tails(node))

    def _check_processes(self) -> None:
        for node in self.nodes:
            proc = self._procs.get(node.name)
            if proc is not None and proc.poll() is not None and node.name not in self._down:
                raise DevClusterError(f"{node.name} exited with status {proc.returncode}" + self._tails(node))

    def _stop_node(self, node: Node) -> None:
        proc = self._procs.get(node.name)
        if proc is None:
            return
        tree = self._tree(node)
        if proc.poll() is None:
            if node.name in self._paused:
                with contextlib.suppress(ProcessLookupError, DevClusterError):
                    os.kill(self._require_beam(node), signal.SIGCONT)
            deadline = time.monotonic() + _STOP_GRACE
            try:
                self.rabbitmqctl(node, "stop", timeout=_STOP_GRACE)
            except (RabbitMQCtlError, subprocess.TimeoutExpired) as exc:
                self._log(f"rabbitmqctl stop failed on {node.name}: {exc}")
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log(f"{node.name} did not stop within {_STOP_GRACE:.0f}s; killing it")
        self._kill_tree(node, tree)
        self._paused.discard(node.name)

    def _tree(self, node: Node) -> list[Any]:
        """The wrapper shell and everything below it, while they can still be found from the wrapper."""
        proc = self._procs.get(node.name)
        if proc is None or proc.poll() is not None:
            return []
        try:
            root = psutil.Process(proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _kill_tree(self, node: Node, tree: list[Any]) -> None:
        """SIGKILL everything the node started; ``tree`` is a _tree() snapshot taken while it ran."""
        proc = self._procs.get(node.name)
        if proc is None:
            return
        self._down.add(node.name)
        # Only a wrapper we have not reaped yet still owns its pid, and so its process group id; after
        # that, killpg could hit an unrelated group that reuses the number.
        owns_group = proc.poll() is None
        # The VM and its helpers go first, so the wrapper shell is still there to reap the VM; killing
        # the wrapper first would leave that to init. erl_child_setup and its helpers run in sessions of
        # their own, out of reach of killpg, hence the explicit list.
        for member in tree[1:]:
            with contextlib.suppress(psutil.Error):
                if member.name() != "epmd":  # shared with every other Erlang node on the machine
                    member.kill()
        if owns_group:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired as exc:
            raise DevClusterError(f"{node.name} (pid {proc.pid}) survived SIGKILL") from exc

    def _await_status(self, node: Node, pid: int, *, stopped: bool) -> None:
        deadline = time.monotonic() + _STOP_GRACE
        while (psutil.Process(pid).status() == psutil.STATUS_STOPPED) != stopped:
            if time.monotonic() > deadline:
                state = "stop" if stopped else "continue"
                raise DevClusterError(f"{node.name} (pid {pid}) did not {state} within {_STOP_GRACE:.0f}s")
            time.sleep(0.01)

    def _alive(self, node: Node) -> bool:
        proc = self._procs.get(node.name)
        return proc is not None and proc.poll() is None

    def _require_beam(self, node: Node) -> int:
        pid = self.beam_pid(node)
        if pid is None:
            raise DevClusterError(f"{node.name} is not running")
        return pid

    def _any_responsive_node(self) -> Node:
        for node in self.nodes:
            if self._alive(node) and node.name not in self._paused:
                return node
        raise DevClusterError("no node of the cluster is running")

    def _node(self, node: Node) -> Node:
        for own in self.nodes:
            if own.name == node.name:
                return own
        raise ValueError(f"{node.name} is not a node of this cluster")

    def _tails(self, node: Node) -> str:
        return "".join(f"\n--- last lines of {path} ---\n{_tail(path)}" for path in (node.stdout_file, node.log_file))


def _free_ports(count: int) -> list[int]:
    """Ports the kernel considers free right now; all sockets stay open until all are picked."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _check_localhost() -> None:
    # Node names end in @localhost; if it does not resolve to loopback, nodes and CLI cannot find each other.
    try:
        address = socket.gethostbyname("localhost")
    except OSError as exc:
        raise DevClusterError("'localhost' does not resolve; add it to /etc/hosts") from exc
    if not address.startswith("127."):
        raise DevClusterError(f"'localhost' resolves to {address}, not to a loopback address")


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({exc})"
    return "\n".join(text.splitlines()[-lines:])


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)

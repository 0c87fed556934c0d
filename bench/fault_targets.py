"""The proxies of the fault-injection runs, configured as an operator would, and the feedback agents they ask.

rabbitproxy: AMQP health checks, ``on_marked_down = "close"``, a feedback agent per node, the admin API for
``maint``, in one process or with ``workers = N``. HAProxy 2.6: ``mode tcp`` with ``check inter/fall/rise``,
``on-marked-down shutdown-sessions``, an ``agent-check`` on the same agents, client/server timeouts above the AMQP
heartbeat, and an admin stats socket for ``set server ... state maint``; no ``hard-stop-after``, as an operator
writes it for AMQP: its old workers keep their connections after a reload for as long as the clients do. Both get
the same check interval, fall and rise, so their failover times compare.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import common

SERVICE = "amqp"


@dataclass(frozen=True)
class Checks:
    """The failure-detection settings shared by both proxies (seconds)."""

    interval: float = 1.0
    timeout: float = 1.0
    fall: int = 2
    rise: int = 2
    heartbeat: int = 10
    close_timeout: float = 5.0
    shutdown_timeout: float = 5.0


def rabbitproxy_config(
    listen_port: int, admin_port: int, backends: Sequence[tuple[int, int]], checks: Checks, workers: int = 1
) -> str:
    """``backends``: (AMQP port, agent port) per node, named rabbit1..N (pure; unit-tested)."""
    lines = [
        f"workers = {workers}",
        "",
        "[admin]",
        f'listen = "127.0.0.1:{admin_port}"',
        "",
        "[log]",
        'level = "info"',
        "",
        "[[services]]",
        f'name = "{SERVICE}"',
        f'listen = "127.0.0.1:{listen_port}"',
        'balance = "least-connections"',
        "connect_timeout = 2.0",
        "retries = 2",
        f"close_timeout = {checks.close_timeout}",
        f"shutdown_timeout = {checks.shutdown_timeout}",
        "[services.health_check]",
        'type = "amqp"',
        f"interval = {checks.interval}",
        f"timeout = {checks.timeout}",
        f"fall = {checks.fall}",
        f"rise = {checks.rise}",
        'on_marked_down = "close"',
        "[services.feedback]",
        'type = "agent"',
        f"interval = {checks.interval}",
        f"timeout = {checks.timeout}",
    ]
    for i, (amqp_port, agent_port) in enumerate(backends):
        lines += [
            "[[services.backends]]",
            f'name = "rabbit{i + 1}"',
            'address = "127.0.0.1"',
            f"port = {amqp_port}",
            f"agent_port = {agent_port}",
        ]
    return "\n".join(lines) + "\n"


def haproxy_config(listen_port: int, socket_path: Path, backends: Sequence[tuple[int, int]], checks: Checks) -> str:
    """The HAProxy equivalent (pure; unit-tested; ``haproxy -c`` accepts it: tests/integration)."""
    ms = int(checks.interval * 1000)
    # An AMQP connection may be silent for a whole heartbeat interval; the timeouts must outlast two of them, or
    # HAProxy cuts healthy idle connections.
    idle = 3 * checks.heartbeat
    lines = [
        "global",
        "    maxconn 2000",
        "    log stderr format raw local0 warning",
        f"    stats socket {socket_path} mode 600 level admin",
        # No hard-stop-after: after a reload the old workers serve their AMQP connections until the clients end
        # them, which is what an operator wants of a reload. A stop is bounded by the stop itself (stop_gracefully).
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    timeout connect 2s",
        f"    timeout client {idle}s",
        f"    timeout server {idle}s",
        f"    timeout check {int(checks.timeout * 1000)}ms",
        "    retries 2",
        "    option redispatch",
        "",
        f"listen {SERVICE}",
        f"    bind 127.0.0.1:{listen_port}",
        "    balance leastconn",
        f"    default-server check inter {ms} fall {checks.fall} rise {checks.rise} on-marked-down shutdown-sessions"
        f" agent-check agent-inter {ms}",
    ]
    for i, (amqp_port, agent_port) in enumerate(backends):
        lines.append(f"    server rabbit{i + 1} 127.0.0.1:{amqp_port} agent-port {agent_port}")
    return "\n".join(lines) + "\n"


# -- feedback agents --------------------------------------------------------------------------------------------------


class Agent:
    """A feedback agent for one node: answers its current reply (``up 100%`` or ``down``) on every connection."""

    def __init__(self) -> None:
        self.reply = "up 100%"
        agent = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    self.request.sendall((agent.reply + "\n").encode())

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        # A short poll interval: close() waits for the serving loop to notice, once per agent and run.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- a network cut between the proxies and one node ------------------------------------------------------------------


class Cut:
    """Drop every packet to and from one node's AMQP port (nftables): the node runs on, clustered, unreachable.

    Only the proxies (clients and health checks) use that port; the nodes talk to each other and to the CLI over
    Erlang distribution ports, so the node stays a healthy cluster member that the proxies cannot reach, as after a
    broken link or a bad firewall change. The table's name is unique to this process, so other users of the machine
    and other runs are not touched.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.table = f"rabbitproxy_faults_{os.getpid()}_{port}"

    def _nft(self, script: str) -> None:
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True, timeout=30)

    def cut(self) -> None:
        self._nft(
            f"table inet {self.table} {{\n"
            "  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            f"    tcp dport {self.port} drop\n"
            f"    tcp sport {self.port} drop\n"
            "  }\n"
            "}\n"
        )

    def heal(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._nft(f"delete table inet {self.table}\n")


# -- a running proxy --------------------------------------------------------------------------------------------------


@dataclass
class Proxy:
    """One proxy under test; ``start`` may be called again after ``stop_gracefully`` (same ports, same config)."""

    kind: str
    workdir: Path
    backends: list[tuple[int, int]]
    checks: Checks
    port: int = field(default_factory=common.free_port)
    admin_port: int = field(default_factory=common.free_port)
    proc: common.Proc | None = None
    starts: int = 0
    # rabbitproxy's ``workers``; HAProxy runs its threads as it defaults to.
    workers: int = 1

    @property
    def socket_path(self) -> Path:
        return self.workdir / "haproxy.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "proxy.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "rabbitproxy":
            path = self.workdir / "rabbitproxy.toml"
            path.write_text(rabbitproxy_config(self.port, self.admin_port, self.backends, self.checks, self.workers))
            argv = [*common.RABBITPROXY, "serve", "--config", str(path), "--loop", "uvloop"]
        elif self.kind == "haproxy":
            path = self.workdir / "haproxy.cfg"
            path.write_text(haproxy_config(self.port, self.socket_path, self.backends, self.checks))
            argv = ["haproxy", "-W", "-db", "-f", str(path)]
        else:
            raise ValueError(f"unknown target {self.kind!r}")
        # Appended, so the log of a restarted proxy keeps what the first one wrote.
        log = self.log_path.open("ab")
        try:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self.proc = common.Proc(self.kind, argv, self.log_path, popen=popen)
        self.starts += 1
        common.wait_port(self.port, proc=popen)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.popen is not None and self.proc.popen.poll() is None

    def stop_gracefully(self) -> None:
        """rabbitproxy: SIGTERM (closes listeners, waits ``shutdown_timeout``, closes the rest). HAProxy: the same
        by hand, as a stop script with a grace period does: SIGUSR1 (soft stop: listeners close, connections stay),
        then SIGTERM after ``shutdown_timeout`` (a soft stop alone never ends while AMQP clients stay connected)."""
        if self.proc is None or self.proc.popen is None:
            return
        popen = self.proc.popen
        wait = self.checks.shutdown_timeout + self.checks.close_timeout + 20
        if self.kind == "haproxy":
            popen.send_signal(signal.SIGUSR1)
            try:
                popen.wait(self.checks.shutdown_timeout)
            except subprocess.TimeoutExpired:
                popen.send_signal(signal.SIGTERM)
        else:
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(wait)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def reload(self) -> None:
        """rabbitproxy: SIGHUP; HAProxy (master-worker): SIGUSR2."""
        assert self.proc is not None and self.proc.popen is not None
        self.proc.popen.send_signal(signal.SIGHUP if self.kind == "rabbitproxy" else signal.SIGUSR2)

    def set_maint(self, backend: int, on: bool) -> None:
        """Halt a backend (rabbitproxy ``maint``: its connections are closed) or bring it back.

        HAProxy's ``state maint`` only stops new connections; an operator halting a node also runs ``shutdown
        sessions server``, so both commands are sent.
        """
        name = f"rabbit{backend + 1}"
        if self.kind == "rabbitproxy":
            body = json.dumps({"state": "maint" if on else "ready"}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.admin_port}/api/services/{SERVICE}/backends/{name}",
                data=body,
                headers={"Content-Type": "application/json"},
                method="PATCH",
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        elif on:
            self.haproxy_command(f"set server {SERVICE}/{name} state maint")
            self.haproxy_command(f"shutdown sessions server {SERVICE}/{name}")
        else:
            self.haproxy_command(f"set server {SERVICE}/{name} state ready")

    def haproxy_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def backends_up(self) -> list[bool]:
        """Whether the proxy itself counts each backend as up (health and agent)."""
        if self.kind == "rabbitproxy":
            url = f"http://127.0.0.1:{self.admin_port}/api/services/{SERVICE}"
            with urllib.request.urlopen(url, timeout=10) as resp:
                data = json.loads(resp.read())
            return [b.get("status") == "up" for b in data["backends"]]
        out = self.haproxy_command("show stat")
        rows = [line.split(",") for line in out.splitlines() if line.startswith(f"{SERVICE},rabbit")]
        return [r[17].startswith("UP") for r in rows]

    def wait_all_up(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last: list[bool] | str = []
        while time.monotonic() < deadline:
            try:
                last = self.backends_up()
                if last and all(last):
                    return
            except (OSError, ValueError, KeyError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise TimeoutError(f"{self.kind}: not every backend is up after {timeout}s: {last}")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def errors_since(self, offset: int) -> list[str]:
        """Log lines at error level or worse written after ``offset``."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        marks = ("[error", "[critical", "Traceback") if self.kind == "rabbitproxy" else ("[ALERT]", "[EMERG]")
        return [line for line in text.splitlines() if any(m in line for m in marks)]

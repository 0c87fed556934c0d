"""A highly available pair, for real: keepalived (VRRP) and ``rabbitproxy serve`` in network namespaces.

The topology, all of it created here and removed at the end (unique names per run, so a crashed run cannot collide
with the next one)::

    client ns ─┐                          ┌─ proxy ns "a": keepalived + rabbitproxy (priority 200)
    10.231.0.10 ├── bridge in a switch ns ─┤   10.231.0.11, the VIP 10.231.0.100 when it is master
                │                          └─ proxy ns "b": keepalived + rabbitproxy (priority 190)
                                               10.231.0.12

Each proxy reaches the session's RabbitMQ nodes (which listen on 127.0.0.1 in the root namespace) through socat:
inside its namespace ``127.0.0.1:57NN`` forwards to a Unix socket in the test's directory, and a root-namespace
socat forwards that socket to the node's AMQP port. The brokers see loopback clients, so ``guest`` works, and
killing one proxy's forwarders takes all of its backends away without touching the shared cluster.

The keepalived configuration is what ``rabbitproxy keepalived-config`` prints; each proxy listens on the VIP with
``freebind`` (the standby binds it before owning it) and keeps an ``[admin] health_file``; keepalived tracks that
file and runs ``rabbitproxy healthcheck``.
A client in the client namespace publishes with confirms through the VIP over an aio-pika ``connect_robust``
connection (tests/integration/ha_publisher.py) while the test kills, stops and starves the proxies; at the end every
message the broker confirmed must be in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aio_pika
import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.waiting import wait_for_sync

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.231.0"
VIP = f"{SUBNET}.100"
ADDRESSES = {"client": f"{SUBNET}.10", "a": f"{SUBNET}.11", "b": f"{SUBNET}.12"}
# High priorities keep the backup's skew time ((256 - priority) / 256 s) short when the master gives up.
PRIORITY = {"a": 200, "b": 190}
PEER = {"a": "b", "b": "a"}
BACKEND_BASE_PORT = 5700
ADMIN = "http://127.0.0.1:9080"
# The targets: the VIP leaves a killed proxy within 3 s and a stopping one within 1 s.
KILL_FAILOVER = 3.0
PREEMPT_WINDOW = 7.0
# How long a proxy that was started again may take to become a healthy BACKUP: rise 2 probes, each a new Python
# process, which a heavily loaded machine starts slowly. A deadline, not an expectation.
RECOVERY = 120
STOP_FAILOVER = 1.0


def run(*cmd: str, timeout: float = 30) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


class Lines:
    """Collects a process's output lines in a thread, so the pipe never fills and the test can look at them."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)


@dataclass
class Pair:
    tag: str
    tmp: Path
    cluster: DevCluster
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    publisher_out: Lines | None = None

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    # -- processes ---------------------------------------------------------------------------------------------

    def spawn(self, key: str, cmd: list[str], *, ns: str | None = None, pipe: bool = False) -> None:
        """Start ``cmd`` (in namespace ``ns``), kept under ``key`` for the cleanup.

        Its output goes to ``<key>.log`` in the test's directory (shown when the test fails), or with ``pipe`` to
        ``stdout`` for the test to read.
        """
        full = ["ip", "netns", "exec", self.ns(ns), *cmd] if ns else cmd
        previous = self.procs.get(key)
        if previous is not None:
            # A restart: the one before has been killed or stopped; reap it.
            previous.wait(30)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.tmp / f"{key}.log", "a") as log:
            # A session of its own, so the cleanup can end the process and its children (socat's forks) by group.
            self.procs[key] = subprocess.Popen(
                full,
                stdout=subprocess.PIPE if pipe else log,
                stderr=log,
                text=True,
                env=env,
                start_new_session=True,
            )

    def signal(self, key: str, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[key].pid, sig)

    def wait_exit(self, key: str, timeout: float = 30) -> int:
        return self.procs[key].wait(timeout)

    def start_proxy(self, name: str) -> None:
        # Through a console script, as installed ("rabbitproxy-a" so that `ps` tells the two sides apart).
        script = self.tmp / "bin" / f"rabbitproxy-{name}"
        self.spawn(f"proxy-{name}", [str(script), "serve", "--config", str(self.tmp / f"{name}.toml")], ns=name)

    def start_keepalived(self, name: str) -> None:
        t = self.tmp
        cmd = ["keepalived", "--dont-fork", "--log-console", "--vrrp", "--use-file", str(t / f"keepalived-{name}.conf")]
        cmd += ["--pid", str(t / f"keepalived-{name}.pid"), "--vrrp_pid", str(t / f"keepalived-{name}-vrrp.pid")]
        self.spawn(f"keepalived-{name}", cmd, ns=name)

    def start_backend_forwarders(self, name: str) -> None:
        for i in range(len(self.cluster.nodes)):
            listen = f"TCP-LISTEN:{BACKEND_BASE_PORT + i},bind=127.0.0.1,reuseaddr,fork"
            self.spawn(f"socat-{name}-{i}", ["socat", listen, f"UNIX-CONNECT:{self.tmp / f'node{i}.sock'}"], ns=name)

    def cut_backends(self, name: str) -> None:
        """Take every backend away from proxy ``name``: its forwarders go, new connections are refused."""
        for i in range(len(self.cluster.nodes)):
            self.signal(f"socat-{name}-{i}", signal.SIGKILL)

    # -- state -------------------------------------------------------------------------------------------------

    def owner(self) -> str | None:
        owners = []
        for n in ("a", "b"):
            shown = run("ip", "-n", self.ns(n), "-br", "addr", "show", "dev", "eth0")
            if f" {VIP}/24 " in f"{shown.strip()} ":
                owners.append(n)
        assert len(owners) <= 1, f"both proxies hold the VIP: {owners}"
        return owners[0] if owners else None

    def health_file(self, name: str) -> str:
        try:
            return (self.tmp / f"health-{name}").read_text().strip()
        except FileNotFoundError:
            return ""

    def transitions(self, name: str) -> list[str]:
        """The states keepalived's notify hook reported for ``name``, oldest first."""
        try:
            text = (self.tmp / f"transitions-{name}").read_text()
        except FileNotFoundError:
            return []
        # Each line: "<time> <side> INSTANCE <name> <state> <priority>".
        return [line.split()[4] for line in text.splitlines() if len(line.split()) >= 5]

    def confirmed(self) -> list[int]:
        assert self.publisher_out is not None
        return [int(line.split()[1]) for line in self.publisher_out.snapshot() if line.startswith("confirmed ")]

    def healthcheck(self, name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.ns(name),
                sys.executable,
                "-m",
                "rabbitproxy",
                "healthcheck",
                "--admin",
                ADMIN,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            check=False,
        )

    def diagnostics(self) -> str:
        parts = []
        for path in sorted(self.tmp.glob("*.log")) + sorted(self.tmp.glob("transitions-*")):
            parts.append(
                f"--- {path.name} (last 25 lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:])
            )
        if self.publisher_out is not None:
            parts.append("--- publisher (last 15 lines)\n" + "\n".join(self.publisher_out.snapshot()[-15:]))
        # A failover waits for keepalived's probe, a new Python process each second, and keepalived's own timers:
        # on an overloaded machine both run late, which the load average shows.
        parts.append(f"--- load average {os.getloadavg()}")
        return "\n".join(parts)


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _build_topology(pair: Pair) -> None:
    for name in ("switch", "client", "a", "b"):
        run("ip", "netns", "add", pair.ns(name))
        pair.namespaces.append(pair.ns(name))
    sw = pair.ns("switch")
    run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", sw, "link", "set", "br0", "up")
    for name, address in ADDRESSES.items():
        port = f"to-{name}"
        run("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", pair.ns(name))
        run("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", pair.ns(name), "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", pair.ns(name), "link", "set", "eth0", "up")
        run("ip", "-n", pair.ns(name), "link", "set", "lo", "up")


def _write_configs(pair: Pair) -> None:
    t = pair.tmp
    bin_dir = t / "bin"
    bin_dir.mkdir(mode=0o755)
    # keepalived runs the probe with its own environment and refuses scripts a non-root user could change: a
    # root-owned wrapper that runs this checkout's rabbitproxy. It must exec: keepalived kills a probe that times
    # out, and a child of a shell it killed would live on.
    _write_executable(
        bin_dir / "rabbitproxy", f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m rabbitproxy "$@"\n'
    )
    for name in ("a", "b"):
        # What pip writes as the console script; its name becomes the process name (/proc/PID/comm).
        _write_executable(
            bin_dir / f"rabbitproxy-{name}", f"#!{sys.executable}\nfrom rabbitproxy.cli import main\nmain()\n"
        )
    _write_executable(bin_dir / "notify", f'#!/bin/sh\necho "$(date +%s.%N) $*" >> {t}/transitions-"$1"\n')
    for name in ("a", "b"):
        backends = "".join(
            f'\n  [[services.backends]]\n  name = "rabbit{i + 1}"\n  address = "127.0.0.1"\n'
            f"  port = {BACKEND_BASE_PORT + i}\n"
            for i in range(len(pair.cluster.nodes))
        )
        (t / f"{name}.toml").write_text(
            f"""[admin]
listen = "127.0.0.1:9080"
health_file = "{t / f"health-{name}"}"

[log]
level = "info"

[[services]]
name = "amqp"
listen = "{VIP}:5672"
freebind = true
shutdown_timeout = 3.0

  [services.health_check]
  type = "tcp"
  interval = 1.0
  timeout = 2.0
  fall = 2
  rise = 1
{backends}"""
        )
        conf = run(
            str(bin_dir / "rabbitproxy"),
            "keepalived-config",
            "--vip", f"{VIP}/24",
            "--interface", "eth0",
            "--peer", ADDRESSES[PEER[name]],
            "--source", ADDRESSES[name],
            "--priority", str(PRIORITY[name]),
            "--router-id", "31",
            "--password", "rpha",
            "--rabbitproxy", str(bin_dir / "rabbitproxy"),
            "--admin", ADMIN,
            "--health-file", str(t / f"health-{name}"),
            "--notify", f"{bin_dir / 'notify'} {name}",
            # The probe and notify run from this test's private temp dir, which only root may enter; hosts use
            # the default, nobody.
            "--script-user", "root",
        )  # fmt: skip
        (t / f"keepalived-{name}.conf").write_text(conf)


async def _declare(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})


async def _drain(url: str, queue: str) -> set[int]:
    """Every message body in ``queue`` (as numbers), read directly from a node; then the queue is deleted."""
    seen: set[int] = set()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        while True:
            message = await q.get(no_ack=True, fail=False, timeout=10)
            if message is None:
                # The cluster is the session's: leave nothing behind for the next test.
                await q.delete(if_unused=False, if_empty=False)
                return seen
            seen.add(int(message.body))


@pytest.fixture
def pair(cluster: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tag = f"rpha{uuid.uuid4().hex[:6]}"
    # A short root-owned directory: Unix socket paths are limited to 107 bytes, and keepalived checks that no
    # directory above its scripts is writable by others.
    tmp = tmp_path_factory.mktemp(tag)
    tmp.chmod(0o755)
    p = Pair(tag, tmp, cluster)
    try:
        _build_topology(p)
        for i, node in enumerate(cluster.nodes):
            sock = tmp / f"node{i}.sock"
            p.spawn(f"socat-root-{i}", ["socat", f"UNIX-LISTEN:{sock},fork", f"TCP:127.0.0.1:{node.amqp_port}"])
        _write_configs(p)
        yield p
    finally:
        for key in list(p.procs):
            p.signal(key, signal.SIGKILL)
        for proc in p.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if p.publisher_out is not None:
            p.publisher_out.join(10)
        for proc in p.procs.values():
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in p.namespaces:
            # Whatever still runs inside our namespaces (keepalived's VRRP child, socat's forks) is ours.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _elapsed_until(predicate: Callable[[], object], since: float, timeout: float, what: str) -> float:
    wait_for_sync(predicate, timeout=timeout, interval=0.02, what=what)
    return time.monotonic() - since


def _holds(predicate: Callable[[], object], duration: float, what: Callable[[], str]) -> None:
    """Check ``predicate`` again and again for ``duration`` seconds; fail the moment it stops holding."""
    end = time.monotonic() + duration
    while time.monotonic() < end:
        assert predicate(), what()
        time.sleep(0.05)


def test_pair_fails_over_without_losing_confirmed_messages(pair: Pair) -> None:
    queue = f"ha-pair-{pair.tag}"
    url = pair.cluster.amqp_url(pair.cluster.nodes[0])
    asyncio.run(_declare(url, queue))
    measured: dict[str, float] = {}
    try:
        for name in ("a", "b"):
            pair.start_backend_forwarders(name)
            pair.start_proxy(name)
        for name in ("a", "b"):
            wait_for_sync(lambda n=name: pair.health_file(n) == "0", timeout=60, what=f"proxy {name} healthy")
        # a first, so that it wins the first election (both start as BACKUP; nopreempt keeps whoever is master).
        pair.start_keepalived("a")
        wait_for_sync(lambda: pair.owner() == "a", timeout=30, what="a owns the VIP")
        pair.start_keepalived("b")
        wait_for_sync(lambda: pair.transitions("b") == ["BACKUP"], timeout=30, what="b is the backup")

        pub = ["-m", "tests.integration.ha_publisher", f"amqp://guest:guest@{VIP}:5672/", queue]
        pair.spawn("publisher", [sys.executable, *pub], ns="client", pipe=True)
        stdout = pair.procs["publisher"].stdout
        assert stdout is not None
        pair.publisher_out = Lines(stdout)
        wait_for_sync(lambda: len(pair.confirmed()) >= 20, timeout=60, what="20 confirms through a")

        # 1. SIGKILL the active proxy: its track script is refused, keepalived gives up the VIP, b takes it over.
        t0 = time.monotonic()
        pair.signal("proxy-a", signal.SIGKILL)
        before = len(pair.confirmed())
        measured["kill"] = _elapsed_until(lambda: pair.owner() == "b", t0, 30, "the VIP on b after a was killed")
        wait_for_sync(lambda: len(pair.confirmed()) >= before + 20, timeout=60, what="20 more confirms through b")

        # 2. a comes back: healthy again, it returns to BACKUP and, without preemption, leaves the VIP on b.
        pair.start_proxy("a")
        wait_for_sync(lambda: pair.transitions("a")[-1:] == ["BACKUP"], timeout=RECOVERY, what="a back to BACKUP")
        assert "FAULT" in pair.transitions("a")
        # A preempting backup ignores the lower-priority master's adverts and takes over when its master-down
        # timer runs out: 3 advert intervals plus its skew time, 3.2 s (a run with --preempt saw 3.6 s). Twice that.
        _holds(
            lambda: pair.owner() == "b",
            PREEMPT_WINDOW,
            # b giving up (FAULT) would hand the VIP to a too: the transitions tell the two apart.
            lambda: f"the VIP left b: a {pair.transitions('a')}, b {pair.transitions('b')} (nopreempt is set)",
        )

        # 3. Stop b gracefully: the health file turns 1 the moment the drain starts and keepalived reacts at once.
        t0 = time.monotonic()
        pair.signal("proxy-b", signal.SIGTERM)
        before = len(pair.confirmed())
        measured["stop"] = _elapsed_until(lambda: pair.owner() == "a", t0, 30, "the VIP on a after b was stopped")
        wait_for_sync(lambda: len(pair.confirmed()) >= before + 20, timeout=60, what="20 more confirms through a")
        assert pair.wait_exit("proxy-b") == 0

        # 4. b returns; then a loses every backend: its /healthz says so and the VIP goes to b, which can serve.
        pair.start_proxy("b")
        wait_for_sync(lambda: pair.transitions("b")[-1:] == ["BACKUP"], timeout=RECOVERY, what="b back to BACKUP")
        t0 = time.monotonic()
        pair.cut_backends("a")
        before = len(pair.confirmed())
        measured["no-backend"] = _elapsed_until(lambda: pair.owner() == "b", t0, 30, "the VIP on b after a lost")
        probe = pair.healthcheck("a")
        assert (probe.returncode, "no-healthy-backend" in probe.stderr) == (1, True), probe
        wait_for_sync(lambda: len(pair.confirmed()) >= before + 20, timeout=60, what="20 more confirms through b")

        pair.signal("publisher", signal.SIGKILL)
        pair.wait_exit("publisher")
        confirmed = set(pair.confirmed())
        stored = asyncio.run(_drain(url, queue))
        assert confirmed - stored == set(), "confirmed messages missing from the queue"
        # Each transition went through the notify hook.
        assert {"MASTER", "FAULT", "BACKUP"} <= set(pair.transitions("a"))
        assert {"MASTER", "FAULT", "BACKUP"} <= set(pair.transitions("b"))
        print(f"\nHA pair failover times: {measured}, {len(confirmed)} confirmed messages")
        print(f"load average {os.getloadavg()}")
        assert measured["kill"] < KILL_FAILOVER, measured
        assert measured["stop"] < STOP_FAILOVER, measured
    except BaseException:
        print(f"\nmeasured so far: {measured}\n{pair.diagnostics()}")
        raise

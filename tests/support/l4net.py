"""A layer-4 NAT topology in network namespaces: a client, the balancer, and backends on a bridge behind it.

    client ns  10.233.1.2 --veth-- 10.233.1.1 (the VIP)  balancer ns  bridge 10.233.2.1
                default via 10.233.1.1                                   |-- veth -- 10.233.2.11  backend ns 1
                                                                         |-- veth -- 10.233.2.12  backend ns 2
                                                                         |-- veth -- 10.233.2.13  backend ns 3
                                                          backends: default via 10.233.2.1 (replies return by DNAT)

The bridge is created inside the balancer namespace, each backend's veth pair made there with its peer moved into
the backend's namespace, so no interface ever exists in the root namespace; every name carries this process's id.
Each backend runs :data:`BACKEND`, which greets every connection with its own name and the peer address it sees
and then echoes lines; the client runs :data:`CLIENT`, a line-driven helper that opens short or long-lived
connections to the VIP and reports which backend answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .process import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]
CLIENT_IP, VIP, BRIDGE_IP = "10.233.1.2", "10.233.1.1", "10.233.2.1"
BACKEND_IPS = ("10.233.2.11", "10.233.2.12", "10.233.2.13")
PORT = 7000
CHECK_PORT = 7001
# The admin API inside the balancer namespace, a namespace of its own: no other process can hold the port.
ADMIN_PORT = 8700

# argv: name, address. Greets "NAME PEER" on connect, then echoes lines; serves CHECK_PORT as a bare TCP check
# port too. The check port lives in a thread the test can stop alone ("stop-check" on stdin), so a backend can
# fail its health check while its established flows stay up.
BACKEND = f"""
import socket, sys, threading
name, addr = sys.argv[1], sys.argv[2]
def serve(port, greet):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(4096)
    def one(c, peer):
        try:
            if greet:
                c.sendall(f"{{name}} {{peer[0]}}\\n".encode())
                f = c.makefile("rb")
                for line in f:
                    c.sendall(line)
        except OSError:
            pass
        c.close()
    def loop():
        while True:
            try:
                c, peer = s.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(c, peer), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return s
serve({PORT}, True)
check = serve({CHECK_PORT}, False)
print("listening", flush=True)
for line in sys.stdin:
    if line.strip() == "stop-check":
        check.shutdown(socket.SHUT_RDWR)
        check.close()
        print("check stopped", flush=True)
"""

# Commands on stdin, one JSON answer per line on stdout:
#   count N [P] N short connections in turn (to port P of the VIP, default PORT):
#               {"names": {name: n}, "peers": [...], "failed": k}
#   syn N       N connections opened and closed at once, nothing read (any backend): {"failed": k}
#   open N      N long-lived connections kept by the helper: {"names": [name per connection]}
#   ping        a line on each long-lived one: {"alive": [true/false per connection]}
CLIENT = f"""
import json, socket, sys, collections
held = []
def greet(c):
    f = c.makefile("rb")
    line = f.readline().decode().split()
    return line, f
for cmd in sys.stdin:
    op, *args = cmd.split()
    if op == "count":
        names, peers, failed = collections.Counter(), set(), 0
        for _ in range(int(args[0])):
            try:
                port = int(args[1]) if len(args) > 1 else {PORT}
                with socket.create_connection(("{VIP}", port), timeout=10) as c:
                    line, _f = greet(c)
                    names[line[0]] += 1
                    peers.add(line[1])
            except (OSError, IndexError):
                failed += 1
        print(json.dumps({{"names": names, "peers": sorted(peers), "failed": failed}}), flush=True)
    elif op == "syn":
        failed = 0
        for _ in range(int(args[0])):
            try:
                socket.create_connection(("{VIP}", {PORT}), timeout=10).close()
            except OSError:
                failed += 1
        print(json.dumps({{"failed": failed}}), flush=True)
    elif op == "open":
        out = []
        for _ in range(int(args[0])):
            c = socket.create_connection(("{VIP}", {PORT}), timeout=10)
            line, f = greet(c)
            held.append((c, f))
            out.append(line[0])
        print(json.dumps({{"names": out}}), flush=True)
    elif op == "ping":
        alive = []
        for c, f in held:
            try:
                c.sendall(b"ping\\n")
                alive.append(f.readline() == b"ping\\n")
            except OSError:
                alive.append(False)
        print(json.dumps({{"alive": alive}}), flush=True)
"""

ADMIN = """
import json, sys, urllib.request
method, path, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request("http://127.0.0.1:PORT" + path, method=method, data=body.encode() or None,
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=20) as r:
    sys.stdout.write(r.read().decode())
""".replace("PORT", str(ADMIN_PORT))


def sh(*argv: str, ns: str | None = None, check: bool = True, stdin: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, input=stdin)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Topology:
    tag: str
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def client(self) -> str:
        return f"{self.tag}c"

    @property
    def balancer(self) -> str:
        return f"{self.tag}b"

    def backend_ns(self, i: int) -> str:
        return f"{self.tag}s{i}"

    @property
    def namespaces(self) -> list[str]:
        return [self.client, self.balancer, *(self.backend_ns(i) for i in range(len(BACKEND_IPS)))]

    def build(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        lb = self.balancer
        sh("ip", "-n", lb, "link", "add", "toclient", "type", "veth", "peer", "name", "tolb", "netns", self.client)
        sh("ip", "-n", lb, "addr", "add", f"{VIP}/24", "dev", "toclient")
        sh("ip", "-n", lb, "link", "set", "toclient", "up")
        sh("ip", "-n", self.client, "addr", "add", f"{CLIENT_IP}/24", "dev", "tolb")
        sh("ip", "-n", self.client, "link", "set", "tolb", "up")
        sh("ip", "-n", self.client, "route", "add", "default", "via", VIP)
        sh("ip", "-n", lb, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", lb, "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
        sh("ip", "-n", lb, "link", "set", "br0", "up")
        for i, addr in enumerate(BACKEND_IPS):
            ns, port = self.backend_ns(i), f"port{i}"
            sh("ip", "-n", lb, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", lb, "link", "set", port, "master", "br0")
            sh("ip", "-n", lb, "link", "set", port, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            # LB.org's NAT mode: the replies go back through the balancer, which un-NATs them.
            sh("ip", "-n", ns, "route", "add", "default", "via", BRIDGE_IP)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=lb)

    def destroy(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for ns in self.namespaces:
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)

    def spawn(self, key: str, ns: str, code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
        self.procs[key] = proc
        return proc

    def start_backends(self) -> None:
        for i, addr in enumerate(BACKEND_IPS):
            proc = self.spawn(f"backend{i}", self.backend_ns(i), BACKEND, f"b{i}", addr)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "listening"

    def stop_check_port(self, i: int) -> None:
        proc = self.procs[f"backend{i}"]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("stop-check\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "check stopped"

    def start_brokers(self, i: int, second: str, port: int) -> list[int]:
        """Two clustered RabbitMQ nodes in backend namespace ``i``, on its address and on ``second`` (added to its
        interface here), AMQP on ``port``; returns their management ports."""
        sh("ip", "addr", "add", f"{second}/24", "dev", "eth0", ns=self.backend_ns(i))
        proc = self.spawn("broker", self.backend_ns(i), BROKER, BACKEND_IPS[i], second, str(port))
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != 2 or not all(p.isdigit() for p in line):
            raise AssertionError(f"the brokers did not start: {line}\n{proc.communicate(timeout=60)[0][-3000:]}")
        return [int(p) for p in line]

    def broker_maintenance(self) -> None:
        proc = self.procs["broker"]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("drain\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "drained"

    def client_proc(self) -> subprocess.Popen[str]:
        proc = self.procs.get("client")
        if proc is None or proc.poll() is not None:
            proc = self.spawn("client", self.client, CLIENT)
        return proc

    def ask(self, command: str) -> Any:
        proc = self.client_proc()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, f"the client helper died: {proc.communicate(timeout=10)}"
        return json.loads(line)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        text = sh(sys.executable, "-c", ADMIN, method, path, "" if body is None else json.dumps(body), ns=self.balancer)
        return json.loads(text) if text.startswith(("{", "[")) else text

    def nft(self, *args: str, check: bool = True) -> str:
        return sh("nft", *args, ns=self.balancer, check=check)


# Runs in a backend namespace: a two-node RabbitMQ cluster, each node's AMQP and management listeners on an address
# of its own (argv: the two addresses, the AMQP port). Two nodes, because on 3.10.8 `rabbitmq-upgrade drain` closes
# the drained node's management listener too, and only a peer's API can then tell maintenance from a crash
# (rabbitproxy.control.node_monitor). Prints both management ports, then obeys "drain" (the first node goes into
# maintenance mode) on stdin; stops on EOF.
BROKER = """
import sys
from rabbitproxy.dev.cluster import DevCluster
addresses, port = sys.argv[1:3], sys.argv[3]
order = []
def own(node):
    order.append(node.name)
    a = addresses[len(order) - 1]
    return [f"listeners.tcp.extra = {a}:{port}", f"management.tcp.ip = {a}"]
cluster = DevCluster(2, node_config=own)
cluster.start()
try:
    print(*(n.management_port for n in cluster.nodes), flush=True)
    for line in sys.stdin:
        if line.strip() == "drain":
            cluster.rabbitmq_upgrade(cluster.nodes[0], "drain")
            print("drained", flush=True)
finally:
    cluster.stop()
"""


@contextlib.contextmanager
def topology(tag: str) -> Iterator[Topology]:
    topo = Topology(tag)
    try:
        topo.build()
        topo.start_backends()
        yield topo
    finally:
        topo.destroy()


class BalancerProxy(ProxyProcess):
    """``rabbitproxy serve`` inside the balancer namespace (READY=1 comes over a filesystem socket)."""

    def __init__(self, topo: Topology, config: dict[str, Any], tmp_path: Path, **kw: Any) -> None:
        super().__init__(config, tmp_path, **kw)
        self.topo = topo

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.topo.balancer, *super().argv()]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def l4_config(weights: tuple[int, ...], *, table: str, workers: int = 1, **service: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "name": "amqp",
        "mode": "l4-nat",
        "listen": f"{VIP}:{PORT}",
        "health_check": {"type": "tcp", "interval": 0.3, "timeout": 1.0, "rise": 1, "fall": 2},
        "backends": [
            {"name": f"b{i}", "address": addr, "port": PORT, "check_port": CHECK_PORT, "weight": w}
            for i, (addr, w) in enumerate(zip(BACKEND_IPS, weights, strict=False))
        ],
    }
    svc.update(service)
    return {
        "workers": workers,
        "nft_table": table,
        "admin": {"listen": f"127.0.0.1:{ADMIN_PORT}"},
        "services": [svc],
    }

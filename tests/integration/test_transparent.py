"""Transparent mode across real routing: client, proxy and server in network namespaces of their own.

    client ns  10.232.1.2 --veth-- 10.232.1.1  proxy ns  10.232.2.1 --veth-- 10.232.2.2  server ns
                default via 10.232.1.1                               default via 10.232.2.1

The proxy runs ``rabbitproxy serve`` with ``source_address = "client"``; the server is a plain TCP server that
answers with the peer address it sees. The proxy namespace has the policy routing docs/deployment.md prescribes:
an nftables socket match marks packets that belong to a transparent socket, and ``fwmark 1`` is routed locally.
Every address is in 10.232.0.0/16 inside namespaces this test creates (with this process's id in their names) and
deletes, even when the test fails; nothing touches the root namespace's interfaces or routes.

The session's RabbitMQ cluster listens on 127.0.0.1 of the root namespace, out of the namespaces' reach, so the last
test starts a one-node cluster of its own inside the server namespace (DevCluster, with an extra listener on the
server's address) and asks that broker, through ``rabbitmqctl list_connections``, where an AMQP client's
connection comes from.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.process import ProxyProcess
from tests.support.proxy import proxy_config, service_config

SUFFIX = f"{os.getpid() % 100000}"
CLIENT_NS, PROXY_NS, SERVER_NS = f"rp16c{SUFFIX}", f"rp16p{SUFFIX}", f"rp16s{SUFFIX}"
CLIENT_IP, PROXY_CLIENT_SIDE, PROXY_SERVER_SIDE, SERVER_IP = "10.232.1.2", "10.232.1.1", "10.232.2.1", "10.232.2.2"
SERVER_PORT = 7000

# The proxy host's policy routing for transparent mode, as docs/deployment.md shows it.
NFT_RULES = """
table ip rabbitproxy_tproxy {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 1
  }
}
"""

# Answers every connection, after its first 8 bytes (the AMQP hello), with the peer address it sees.
SERVER = f"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVER_IP}", {SERVER_PORT}))
s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.settimeout(10)
    try:
        got = b""
        while len(got) < 8:
            chunk = c.recv(8 - len(got))
            if not chunk:
                break
            got += chunk
        c.sendall(peer[0].encode() + b"\\n")
    except OSError:
        pass
    c.close()
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
    c.sendall(b"AMQP\\x00\\x00\\x09\\x01")
    print(c.makefile().readline().strip())
"""


def sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    """The three namespaces, linked and routed; all deleted on the way out, whatever happened."""
    names = (CLIENT_NS, PROXY_NS, SERVER_NS)
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Each veth pair is made inside the proxy namespace with its peer placed straight into the other one, so
        # no interface name ever exists in the root namespace.
        for here, there in (("toclient", CLIENT_NS), ("toserver", SERVER_NS)):
            sh("ip", "-n", PROXY_NS, "link", "add", here, "type", "veth", "peer", "name", "toproxy", "netns", there)
        for ns, dev, addr in (
            (PROXY_NS, "toclient", PROXY_CLIENT_SIDE),
            (PROXY_NS, "toserver", PROXY_SERVER_SIDE),
            (CLIENT_NS, "toproxy", CLIENT_IP),
            (SERVER_NS, "toproxy", SERVER_IP),
        ):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", CLIENT_NS, "route", "add", "default", "via", PROXY_CLIENT_SIDE)
        # The brokers' return route goes through the proxy: here their default route.
        sh("ip", "-n", SERVER_NS, "route", "add", "default", "via", PROXY_SERVER_SIDE)
        sh("ip", "-n", PROXY_NS, "rule", "add", "fwmark", "1", "lookup", "100")
        sh("ip", "-n", PROXY_NS, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        subprocess.run(
            ["ip", "netns", "exec", PROXY_NS, "nft", "-f", "-"],
            input=NFT_RULES, check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        yield
    finally:
        for ns in names:
            # Anything still running in our namespaces (a broker whose helper died, say) was started by this test;
            # a deleted namespace would otherwise live on around it.
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def peer_reporting_server() -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", SERVER_NS, sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        # The first line is printed once the socket listens (readline has no timeout, but the process exits,
        # and so ends the line, if it cannot bind).
        assert proc.stdout.readline().strip() == "listening", proc.communicate(timeout=10)[0]
        yield
    finally:
        proc.kill()
        proc.communicate(timeout=10)


class NamespacedProxy(ProxyProcess):
    """``rabbitproxy serve`` inside the proxy namespace (its READY=1 comes over a filesystem socket, which is not
    bound to a network namespace, unlike an abstract one)."""

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", PROXY_NS, *super().argv()]


def peer_seen_through(port: int) -> str:
    return sh(sys.executable, "-c", CLIENT, PROXY_CLIENT_SIDE, str(port), ns=CLIENT_NS).stdout.strip()


@pytest.fixture
def topology() -> Iterator[None]:
    with namespaces(), peer_reporting_server():
        yield


def test_the_server_sees_the_client_namespaces_address(topology: None, tmp_path: Path) -> None:
    backend = {"name": "server", "address": SERVER_IP, "port": SERVER_PORT}
    cfg = proxy_config(
        service_config([backend], name="transparent", listen=f"{PROXY_CLIENT_SIDE}:5672", source_address="client"),
        # The same backend through a plain service: the server then sees the proxy, which shows that the address
        # above is the transparent socket's doing, not the topology's.
        service_config([backend], name="plain", listen=f"{PROXY_CLIENT_SIDE}:5673"),
    )
    with NamespacedProxy(cfg, tmp_path):
        assert peer_seen_through(5672) == CLIENT_IP
        assert peer_seen_through(5673) == PROXY_SERVER_SIDE
        # Again, on a new connection: each gets its own transparent socket.
        assert peer_seen_through(5672) == CLIENT_IP


def test_without_cap_net_admin_the_proxy_refuses_to_start_naming_the_key(tmp_path: Path) -> None:
    """The real capability check: ``rabbitproxy serve`` without CAP_NET_ADMIN and CAP_NET_RAW (either lets a
    process set IP_TRANSPARENT) exits 2 at start with the key and the capability in its message."""
    cfg = proxy_config(service_config([{"name": "b", "address": "127.0.0.1", "port": 1}], source_address="client"))
    proxy = ProxyProcess(cfg, tmp_path)
    drop = ["setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-all"]
    done = subprocess.run([*drop, *proxy.argv()], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "services['amqp'].source_address: \"client\" (transparent mode) needs the CAP_NET_ADMIN" in done.stderr


# Runs in the server namespace: a one-node RabbitMQ cluster that also listens on the server's address; answers each
# line on stdin with the broker's client connections (peer_host, client_properties) as JSON; stops on EOF.
BROKER = f"""
import json, sys
from rabbitproxy.dev.cluster import DevCluster
cluster = DevCluster(1, management=False, extra_config=["listeners.tcp.transparent = {SERVER_IP}:5672"])
cluster.start()
try:
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(cluster.list_connections("peer_host", "client_properties")), flush=True)
finally:
    cluster.stop()
"""

# Runs in the client namespace: an AMQP connection with a name the broker can be asked about; closes on EOF.
AMQP_CLIENT = """
import asyncio, sys
import aio_pika

async def main():
    connection = await aio_pika.connect(sys.argv[1], client_properties={"connection_name": sys.argv[2]}, timeout=60)
    print("connected", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await connection.close()

asyncio.run(main())
"""


def in_namespace(ns: str, script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def first_line(proc: subprocess.Popen[str], expected: str) -> None:
    """Wait for the process's first line (it exits, and so ends the line, if it fails) and check it."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        raise AssertionError(f"expected {expected!r}, got {line!r}:\n{proc.communicate(timeout=30)[0][-3000:]}")


def finish(proc: subprocess.Popen[str], timeout: float) -> None:
    """Close stdin (the scripts' signal to stop) and wait; kill what does not stop in time."""
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)


def test_a_rabbitmq_node_sees_the_amqp_clients_address(tmp_path: Path) -> None:
    with namespaces():
        broker = in_namespace(SERVER_NS, BROKER)
        try:
            # A node start, on a busy 2-core machine: DevCluster's own startup_timeout bounds it.
            first_line(broker, "ready")
            backend = {"name": "rabbit", "address": SERVER_IP, "port": 5672}
            cfg = proxy_config(
                service_config(
                    [backend],
                    listen=f"{PROXY_CLIENT_SIDE}:5672",
                    source_address="client",
                    health_check={"type": "amqp", "interval": 1.0, "timeout": 5.0, "rise": 1},
                )
            )
            with NamespacedProxy(cfg, tmp_path):
                client = in_namespace(CLIENT_NS, AMQP_CLIENT, f"amqp://guest:guest@{PROXY_CLIENT_SIDE}:5672/", "tp-16")
                try:
                    first_line(client, "connected")
                    assert broker.stdin is not None and broker.stdout is not None
                    broker.stdin.write("list\n")
                    broker.stdin.flush()
                    connections = json.loads(broker.stdout.readline())
                    ours = [c for c in connections if "tp-16" in c["client_properties"]]
                    # rabbitmqctl's JSON gives an IPv4 address as its four numbers.
                    assert [".".join(map(str, json.loads(c["peer_host"]))) for c in ours] == [CLIENT_IP], connections
                finally:
                    finish(client, 60)
        finally:
            finish(broker, 120)

"""Where the bench's AMQP connections land: the plan every target follows, and what the brokers say afterwards.

A proxy doing round robin puts the k-th connection it accepts on backend ``(s + k) % N``, where ``s`` is wherever its
pointer stood. The benches therefore open their connections one at a time in a fixed order (the *plan*), connect
``direct`` clients to ``plan[k] = k % N`` themselves, and before each proxied run move the proxy's pointer to
backend 0: one named probe connection shows where the pointer is (read from the management API), and a few AMQP
protocol headers sent through the proxy use up the slots before backend 0. Then every target places the same role on
the same broker, and the placement read back from the brokers after each run proves it (or shows that it did not).

The pure parts (the plan, the alignment count, the summary of a connection list) are unit-tested in
``tests/unit/test_bench.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
PREFIX = "rabbitproxy-bench"


@dataclass(frozen=True)
class Client:
    """One connection of the plan: its role (``pub``/``con``/``idle``), index within the role and broker."""

    seq: int
    role: str
    index: int
    node: int
    tag: str = ""

    @property
    def name(self) -> str:
        """The AMQP ``connection_name`` client property, which the management API reports back."""
        return f"{PREFIX}-{self.tag}-{self.seq}-{self.role}{self.index}"


def plan(publishers: int, consumers: int, nodes: int, tag: str = "") -> list[Client]:
    """The connection order: publishers and consumers alternate, and the k-th connection goes to node ``k % nodes``.

    Alternating roles puts publishers and consumers on every broker instead of one role per broker.
    """
    roles: list[tuple[str, int]] = []
    for i in range(max(publishers, consumers)):
        if i < publishers:
            roles.append(("pub", i))
        if i < consumers:
            roles.append(("con", i))
    return [Client(k, role, i, k % max(1, nodes), tag) for k, (role, i) in enumerate(roles)]


def align_count(landed: int, nodes: int) -> int:
    """How many more connections a round-robin proxy must place before its next one goes to node 0.

    ``landed`` is the node the last connection went to.
    """
    return (nodes - 1 - landed) % nodes


# -- reading placement back from the brokers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Management:
    """The management API of one node of the cluster (it answers for the whole cluster)."""

    url: str
    user: str = "guest"
    password: str = "guest"

    def get(self, path: str, timeout: float = 30.0) -> Any:
        req = urllib.request.Request(self.url.rstrip("/") + path)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def connections(self) -> list[dict[str, Any]]:
        """Every client connection of the cluster: its name property, node, and the broker port it reached."""
        rows = self.get("/api/connections?columns=node,port,client_properties")
        return [
            {
                "name": str((r.get("client_properties") or {}).get("connection_name", "")),
                "node": str(r.get("node", "")),
                "port": int(r.get("port") or 0),
            }
            for r in rows
            if isinstance(r, dict)
        ]


def broker_index(conn: dict[str, Any], brokers: Sequence[tuple[str, int]]) -> int | None:
    """Which of ``brokers`` (by AMQP port, which is unique per broker here) a listed connection reached."""
    for i, (_host, port) in enumerate(brokers):
        if conn.get("port") == port:
            return i
    return None


def landed(conns: Sequence[dict[str, Any]], brokers: Sequence[tuple[str, int]], prefix: str) -> dict[str, int]:
    """Connection name -> broker index for the listed connections whose name starts with ``prefix``."""
    out: dict[str, int] = {}
    for c in conns:
        name = c.get("name", "")
        if name.startswith(prefix):
            i = broker_index(c, brokers)
            if i is not None:
                out[name] = i
    return out


def summarize(clients: Sequence[Client], where: dict[str, int], nodes: int) -> dict[str, Any]:
    """Per broker, how many of each role landed there, and whether every client went where the plan said (pure)."""
    per_node: list[dict[str, int]] = [{} for _ in range(nodes)]
    missing = 0
    off_plan = 0
    for c in clients:
        i = where.get(c.name)
        if i is None:
            missing += 1
            continue
        if i != c.node:
            off_plan += 1
        per_node[i][c.role] = per_node[i].get(c.role, 0) + 1
    return {
        "per_node": per_node,
        "seen": len(clients) - missing,
        "missing": missing,
        "off_plan": off_plan,
        "as_planned": missing == 0 and off_plan == 0,
    }


def placement_text(summary: dict[str, Any]) -> str:
    """One line for a table cell: ``n1 2 pub 1 con · n2 ...``, and whether it matched the plan."""
    if not summary or "per_node" not in summary:
        return "not read"
    parts = []
    for i, roles in enumerate(summary["per_node"]):
        inner = " ".join(f"{v} {k}" for k, v in sorted(roles.items())) or "none"
        parts.append(f"n{i + 1}: {inner}")
    verdict = (
        "as planned"
        if summary.get("as_planned")
        else f"{summary.get('off_plan', 0)} off plan, {summary.get('missing', 0)} not seen"
    )
    return "; ".join(parts) + f" ({verdict})"


def wait_landed(
    mgmt: Management, brokers: Sequence[tuple[str, int]], prefix: str, expect: int, timeout: float = 30.0
) -> dict[str, int]:
    """Poll the management API until ``expect`` connections named ``prefix...`` are listed, or the deadline.

    The management API lists a new connection only after its next statistics round (5 s by default).
    """
    deadline = time.monotonic() + timeout
    where: dict[str, int] = {}
    while True:
        try:
            where = landed(mgmt.connections(), brokers, prefix)
        except (OSError, urllib.error.URLError, ValueError):
            where = {}
        if len(where) >= expect or time.monotonic() > deadline:
            return where
        time.sleep(0.5)


# -- moving a round-robin proxy's pointer ---------------------------------------------------------------------------


def header_probe(host: str, port: int, timeout: float = 30.0) -> None:
    """One connection through a proxy that reaches a broker: the AMQP header, then the broker's first frame.

    Waiting for the broker's ``connection.start`` proves the proxy picked a backend for it (a proxy that reads the
    AMQP handshake before choosing would not pick one for a bare TCP connect).
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(AMQP_HEADER)
        s.recv(1)


async def align(
    url: str,
    proxy: tuple[str, int],
    mgmt: Management,
    brokers: Sequence[tuple[str, int]],
    tag: str,
) -> int | None:
    """Move a round-robin proxy's pointer so that its next connection goes to broker 0.

    Returns the broker the probe landed on, or None when the management API did not show it (then nothing moved).
    """
    import aio_pika

    name = f"{PREFIX}-align-{tag}"
    conn = await aio_pika.connect(url, timeout=30, client_properties={"connection_name": name})
    try:
        where = await asyncio.to_thread(wait_landed, mgmt, brokers, name, 1)
    finally:
        await conn.close()
    if name not in where:
        return None
    for _ in range(align_count(where[name], len(brokers))):
        header_probe(*proxy)
    return where[name]

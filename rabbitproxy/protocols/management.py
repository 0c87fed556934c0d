"""What RabbitMQ's management API answers, read into typed values: pure, no I/O, checked like any peer input.

The answers come from the brokers we balance over, so they are untrusted the way any peer's bytes are: a field
of the wrong type or a missing key is a :class:`ManagementError` naming the field, never a ``KeyError`` deep in a
monitor loop. Only the fields the proxy acts on or shows are read; everything else in these large documents is
ignored. The shapes are those of RabbitMQ 3.10 to 4.0 (tests/fixtures/management/ holds real answers).

Endpoints, and what each is for:

- ``GET /api/overview``: the name of the node that answered (``node``), its version, the listeners.
- ``GET /api/nodes/{node}``: memory and disk alarms, descriptors, sockets, memory, Erlang processes, and on
  releases that report it ``being_drained`` (maintenance mode). The statistics behind it are collected every few
  seconds, so an alarm shows here a little after it is raised.
- ``GET /api/health/checks/local-alarms``: 200 or 503 with the alarms in effect on the node that answers, at
  once (it asks the alarm handler, not the statistics).
- ``GET /api/health/checks/node-is-quorum-critical``: 200, or 503 naming the quorum queues that would lose their
  majority if the node that answers went away.
- ``DELETE /api/connections/{name}`` with ``X-Reason``: the broker closes one client connection with
  ``connection.close`` 320 CONNECTION_FORCED and that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

# The statuses of a health-check endpoint: 200 passed, 503 failed; anything else is not an answer to the check.
CHECK_PASSED: Final = 200
CHECK_FAILED: Final = 503


class ManagementError(Exception):
    """An answer of the management API that does not have the shape we read."""


def _dict(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ManagementError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, *, default: Any = ...) -> Any:
    value = data.get(key, default)
    if value is ...:
        raise ManagementError(f"{what}: no {key!r}")
    if value is None and default is None:
        return None
    # JSON has no separate integers for booleans, but Python's bool is an int: keep the two apart.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ManagementError(f"{what}: {key!r} is a boolean, expected {kind}")
    if not isinstance(value, kind):
        raise ManagementError(f"{what}: {key!r} is {type(value).__name__}, expected {kind}")
    return value


@dataclass(frozen=True, slots=True)
class Listener:
    node: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class Overview:
    """``/api/overview``: who answered."""

    node: str
    version: str | None
    cluster_name: str | None
    listeners: tuple[Listener, ...]

    def listening(self, node: str, protocol: str = "amqp") -> bool:
        """Whether the cluster lists a ``protocol`` listener of ``node`` (a drained node has none)."""
        return any(item.node == node and item.protocol == protocol for item in self.listeners)


def parse_overview(data: object) -> Overview:
    doc = _dict(data, "overview")
    listeners: list[Listener] = []
    for i, raw in enumerate(_get(doc, "listeners", list, "overview", default=[])):
        item = _dict(raw, f"overview listener {i}")
        listeners.append(
            Listener(
                node=_get(item, "node", str, f"overview listener {i}"),
                protocol=_get(item, "protocol", str, f"overview listener {i}"),
                port=_get(item, "port", int, f"overview listener {i}"),
            )
        )
    return Overview(
        node=_get(doc, "node", str, "overview"),
        version=_get(doc, "rabbitmq_version", str, "overview", default=None),
        cluster_name=_get(doc, "cluster_name", str, "overview", default=None),
        listeners=tuple(listeners),
    )


@dataclass(frozen=True, slots=True)
class NodeState:
    """``/api/nodes/{node}``: the figures an operator looks at first when a node misbehaves."""

    name: str
    running: bool
    mem_alarm: bool
    disk_alarm: bool
    # None where the release does not report maintenance mode (3.10 leaves it null).
    being_drained: bool | None
    fd_used: int | None
    fd_total: int | None
    sockets_used: int | None
    sockets_total: int | None
    mem_used: int | None
    mem_limit: int | None
    proc_used: int | None
    proc_total: int | None
    uptime_ms: int | None

    @property
    def alarms(self) -> tuple[str, ...]:
        """The local alarms in effect, as RabbitMQ names their resources."""
        return tuple(kind for kind, on in (("memory", self.mem_alarm), ("disk", self.disk_alarm)) if on)


def parse_node(data: object) -> NodeState:
    doc = _dict(data, "node")
    name = _get(doc, "name", str, "node")
    what = f"node {name}"

    def count(key: str) -> int | None:
        # Statistics are absent (or null) while a node's metrics have not been collected yet.
        return _get(doc, key, int, what, default=None)  # type: ignore[no-any-return]

    return NodeState(
        name=name,
        running=_get(doc, "running", bool, what, default=False),
        mem_alarm=_get(doc, "mem_alarm", bool, what, default=False),
        disk_alarm=_get(doc, "disk_free_alarm", bool, what, default=False),
        being_drained=_get(doc, "being_drained", bool, what, default=None),
        fd_used=count("fd_used"),
        fd_total=count("fd_total"),
        sockets_used=count("sockets_used"),
        sockets_total=count("sockets_total"),
        mem_used=count("mem_used"),
        mem_limit=count("mem_limit"),
        proc_used=count("proc_used"),
        proc_total=count("proc_total"),
        uptime_ms=count("uptime"),
    )


def parse_nodes(data: object) -> list[NodeState]:
    if not isinstance(data, list):
        raise ManagementError(f"nodes: expected a JSON array, got {type(data).__name__}")
    return [parse_node(item) for item in data]


@dataclass(frozen=True, slots=True)
class Alarm:
    node: str
    resource: str


def parse_alarms_check(status: int, data: object) -> tuple[Alarm, ...]:
    """``/api/health/checks/local-alarms`` (or ``alarms``): the alarms in effect, empty when it passed."""
    if status == CHECK_PASSED:
        return ()
    if status != CHECK_FAILED:
        raise ManagementError(f"alarms check: HTTP {status}")
    doc = _dict(data, "alarms check")
    out: list[Alarm] = []
    for i, raw in enumerate(_get(doc, "alarms", list, "alarms check", default=[])):
        what = f"alarm {i}"
        item = _dict(raw, what)
        out.append(Alarm(node=_get(item, "node", str, what), resource=_get(item, "resource", str, what)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class QuorumCheck:
    """``node-is-quorum-critical``: whether taking the node that answered out would cost quorum queues a majority."""

    critical: bool
    # Readable names, such as "queue 'orders' in vhost '/'".
    queues: tuple[str, ...] = ()
    reason: str = ""


def parse_quorum_check(status: int, data: object) -> QuorumCheck:
    if status == CHECK_PASSED:
        return QuorumCheck(critical=False)
    if status != CHECK_FAILED:
        raise ManagementError(f"quorum check: HTTP {status}")
    doc = _dict(data, "quorum check")
    names: list[str] = []
    for i, raw in enumerate(_get(doc, "queues", list, "quorum check", default=[])):
        item = _dict(raw, f"quorum check queue {i}")
        readable = item.get("readable_name")
        if isinstance(readable, str):
            names.append(readable)
        else:
            vhost = _get(item, "virtual_host", str, f"quorum check queue {i}", default="?")
            names.append(f"queue {_get(item, 'name', str, f'quorum check queue {i}')!r} in vhost {vhost!r}")
    return QuorumCheck(
        critical=True, queues=tuple(names), reason=_get(doc, "reason", str, "quorum check", default="") or ""
    )


def _endpoint(host: str, port: int) -> str:
    # RabbitMQ prints an IPv6 peer in brackets (rabbit_misc:ntoab).
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connection_name(client: tuple[str, int], server: tuple[str, int]) -> str:
    """The name the broker gives a connection: ``"client_host:client_port -> server_host:server_port"``.

    ``client`` is the peer as the broker sees it: the proxy's own address towards the backend, or the real
    client's when a PROXY header told the broker who it is. ``server`` is the broker's listener address, or with a
    PROXY header the destination the header names (3.10.8 takes both ends from the header).
    """
    return f"{_endpoint(*client)} -> {_endpoint(*server)}"

"""The nftables ruleset of the ``mode = "l4-nat"`` services, rendered as libnftables JSON: pure, no I/O.

One table of our own (family ``ip``) holds everything:

- ``prerouting`` and ``output`` (nat hooks, priority dstnat): a packet opening a flow to a service's listen
  address and port jumps to the service's chain; ``output`` covers clients on the balancer itself.
- one chain per service: ``numgen random mod TOTAL vmap { 0-99 : goto be_a, 100-299 : goto be_b }`` over the
  usable backends' effective weights (``weighted-round-robin``), or ``jhash ip saddr mod TOTAL`` for
  ``source-hash``, so a client address keeps its backend while the set of backends stays the same.
- one chain per backend: a named counter of new flows, then ``dnat to ADDRESS:PORT``.
- ``forward`` (filter): per backend, named counters of the bytes each way, matched on the flow's original
  destination so that two services sharing a backend count apart.

Only the first packet of a flow traverses a nat chain: conntrack keeps every later packet on the backend chosen
then, so a backend that leaves the map (drain, down, maint) keeps its established flows and takes no new ones.
A service with no usable backend has no rule at all, and a connect to its address is refused by the balancer's
own stack, as the relay would refuse it.

Names in the table are derived from a hash of the service and backend names, so that they stay within nft's
identifier rules whatever the operator names things, and stay the same across re-renders: counters are kept by
``flush table`` and the ``add`` of an object that exists, so they never go backwards while the process runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

FAMILY = "ip"
# The nat hooks' conventional priority (NF_IP_PRI_NAT_DST) and the filter hook's.
DSTNAT = -100
FILTER = 0


@dataclass(frozen=True, slots=True)
class L4Backend:
    """One backend as the table knows it: where flows go and the stem of its objects' names."""

    service: str
    name: str
    address: str
    port: int

    @property
    def key(self) -> str:
        return _digest(self.service, self.name)


@dataclass(frozen=True, slots=True)
class L4Service:
    """What one l4 service's rules say: its address (None for 0.0.0.0), port, hashing and weighted targets."""

    name: str
    vip: str | None
    port: int
    hashed: bool
    backends: tuple[L4Backend, ...]
    # (backend key, weight) of the usable backends, in pool order; empty when none is usable.
    targets: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> str:
        return _digest(self.name)


@dataclass(frozen=True, slots=True)
class Objects:
    """The chains and counters a rendered table holds (to delete the ones a later render no longer has)."""

    chains: frozenset[str] = field(default_factory=frozenset)
    counters: frozenset[str] = field(default_factory=frozenset)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def counter_names(backend: L4Backend) -> tuple[str, str, str]:
    """The names of ``backend``'s counters: new flows, bytes client to backend, bytes backend to client."""
    return f"n_{backend.key}", f"i_{backend.key}", f"o_{backend.key}"


def objects_of(services: list[L4Service]) -> Objects:
    chains = {"prerouting", "output", "forward"}
    counters: set[str] = set()
    for s in services:
        chains.add(f"svc_{s.key}")
        for b in s.backends:
            chains.add(f"be_{b.key}")
            counters.update(counter_names(b))
    return Objects(frozenset(chains), frozenset(counters))


def render(table: str, services: list[L4Service], *, fresh: bool, before: Objects = Objects()) -> dict[str, Any]:
    """The one nft transaction that makes ``table`` hold exactly ``services``' rules.

    ``fresh`` replaces the table as a whole (at start: whatever a crashed predecessor left goes, counters too);
    otherwise the table is flushed and filled again, keeping its counters, and the chains and counters of
    ``before`` that the new state no longer has are deleted.
    """
    t = {"family": FAMILY, "name": table}
    cmds: list[dict[str, Any]] = [{"add": {"table": t}}]
    cmds.append({"delete": {"table": t}} if fresh else {"flush": {"table": t}})
    if fresh:
        cmds.append({"add": {"table": t}})
    now = objects_of(services)
    base = {"family": FAMILY, "table": table}
    hooks = {
        "prerouting": {"type": "nat", "hook": "prerouting", "prio": DSTNAT, "policy": "accept"},
        "output": {"type": "nat", "hook": "output", "prio": DSTNAT, "policy": "accept"},
        "forward": {"type": "filter", "hook": "forward", "prio": FILTER, "policy": "accept"},
    }
    for name in sorted(now.chains):
        cmds.append({"add": {"chain": {**base, "name": name, **hooks.get(name, {})}}})
    for name in sorted(now.counters):
        cmds.append({"add": {"counter": {**base, "name": name}}})

    def rule(chain: str, *expr: dict[str, Any]) -> None:
        cmds.append({"add": {"rule": {**base, "chain": chain, "expr": list(expr)}}})

    for s in services:
        _service_rules(s, rule)
    for name in sorted(before.chains - now.chains):
        cmds.append({"delete": {"chain": {**base, "name": name}}})
    for name in sorted(before.counters - now.counters):
        cmds.append({"delete": {"counter": {**base, "name": name}}})
    return {"nftables": cmds}


def _match(left: dict[str, Any], right: object) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _payload(protocol: str, fieldname: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": fieldname}}


def _service_rules(s: L4Service, rule: Any) -> None:
    chain = f"svc_{s.key}"
    entry = [_match(_payload("tcp", "dport"), s.port)]
    if s.vip is not None:
        entry.insert(0, _match(_payload("ip", "daddr"), s.vip))
    else:
        # listen = "0.0.0.0:PORT": any address of this host, but only of this host. Without this, flows that the
        # balancer merely routes (a backend's own connections to some other broker's port) would be DNATed too.
        entry.insert(0, _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"))
    if s.targets:
        rule("prerouting", *entry, {"jump": {"target": chain}})
        rule("output", *entry, {"jump": {"target": chain}})
        rule(chain, _choice(s))
    # The original destination, which tells this service's flows from another's to the same backend.
    original = [_match({"ct": {"key": "proto-dst", "dir": "original"}}, s.port)]
    if s.vip is not None:
        original.insert(0, _match({"ct": {"key": "ip daddr", "dir": "original"}}, s.vip))
    for b in s.backends:
        new, inbound, outbound = counter_names(b)
        rule(f"be_{b.key}", {"counter": new}, _match({"meta": {"key": "l4proto"}}, "tcp"),
             {"dnat": {"addr": b.address, "port": b.port}})  # fmt: skip
        rule("forward", _match(_payload("ip", "daddr"), b.address), _match(_payload("tcp", "dport"), b.port),
             *original, {"counter": inbound})  # fmt: skip
        rule("forward", _match(_payload("ip", "saddr"), b.address), _match(_payload("tcp", "sport"), b.port),
             *original, {"counter": outbound})  # fmt: skip


def _choice(s: L4Service) -> dict[str, Any]:
    """The verdict that picks a backend: a goto for one target, else a weighted vmap over a number."""
    if len(s.targets) == 1:
        return {"goto": {"target": f"be_{s.targets[0][0]}"}}
    total = sum(w for _, w in s.targets)
    elements: list[list[Any]] = []
    low = 0
    for key, weight in s.targets:
        high = low + weight - 1
        # A range of one value is written as the value: nft refuses an interval whose ends are equal.
        elements.append([low if low == high else {"range": [low, high]}, {"goto": {"target": f"be_{key}"}}])
        low = high + 1
    number: dict[str, Any]
    if s.hashed:
        # A fixed seed: the same client address lands on the same backend after every re-render.
        number = {"jhash": {"mod": total, "seed": 0, "expr": _payload("ip", "saddr")}}
    else:
        number = {"numgen": {"mode": "random", "mod": total, "offset": 0}}
    return {"vmap": {"key": number, "data": {"set": elements}}}

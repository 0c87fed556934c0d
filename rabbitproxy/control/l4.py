"""``mode = "l4-nat"``: keep the kernel's nftables table in step with the control plane's view of the backends.

The control plane is the one the relay has: health checks, feedback agents, the node monitor and the admin API
change :class:`~rabbitproxy.balancing.backend.Backend` objects, and :meth:`Pool.weighted` (the rule
``Pool.choose`` follows too) says which backends take new connections and at what weight. :class:`L4Nat`
subscribes to that one place: it renders the whole table from it (:mod:`rabbitproxy.control.l4_rules`) and, when
the rendering differs from what the kernel holds, hands it to ``nft -j -f -`` as ONE transaction.

Why a subprocess of ``nft`` and not a binding: the libnftables Python module ships only as a distribution package
outside our virtual environment, while the ``nft`` command reads the same JSON from standard input; a ruleset
this small loads in a few milliseconds.

Why computing and applying are one synchronous step: the state rendered is read from the Backends and handed to
``nft`` without an ``await`` in between (house rule 13), so no verdict can land between the two and be lost until
the next change; the command blocks the loop for those milliseconds, once per change, never per connection.
Changes are noticed by a poll every :data:`POLL` seconds (health checks, agents and node monitors change Backends
without telling anyone, as the worker push already relies on) and at once after an admin API change
(:meth:`sync` called by the supervisor); the poll is the debounce: a burst of changes makes one transaction.

A backend that goes down with ``on_marked_down = "close"`` or into the operator's maint has its flows deleted from
conntrack (``conntrack -D``), after the table without it is in place, so its clients' next packets are refused by
another backend and they reconnect at once. The table is written fresh at start (replacing whatever a crashed
predecessor left), deleted at a clean stop, and left alone by a crash, so traffic keeps flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from rabbitproxy.config.l4 import L4_NAT
from rabbitproxy.control.l4_rules import FAMILY, L4Backend, L4Service, Objects, counter_names, objects_of, render
from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.l4")

POLL = 0.1
# Seconds one nft or conntrack command may take before it is given up (it then counts as a failure).
COMMAND_TIMEOUT = 10.0
# How long a counter reading is reused: the API page and /metrics may ask several times a second.
COUNTERS_TTL = 0.5


class NftError(Exception):
    """``nft`` refused a transaction or could not run; the message is its own."""


def run_nft(payload: dict[str, Any]) -> str:
    """Run one ``nft -j`` transaction (``{"nftables": [...]}`` on stdin); return its output; raise NftError."""
    try:
        done = subprocess.run(
            ["nft", "-j", "-f", "-"],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"nft could not run: {exc}") from None
    if done.returncode != 0:
        raise NftError(done.stderr.strip() or f"nft exited with {done.returncode}")
    return done.stdout


def delete_flows(vip: str | None, port: int, address: str, backend_port: int) -> int:
    """Delete the conntrack entries of the flows from ``vip:port`` to this backend; return how many went."""
    argv = ["conntrack", "-D", "-p", "tcp", "--orig-port-dst", str(port)]
    if vip is not None:
        argv += ["--orig-dst", vip]
    argv += ["--reply-src", address, "--reply-port-src", str(backend_port)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"conntrack could not run: {exc}") from None
    # conntrack exits 1 when no entry matched; its summary line says how many were deleted either way.
    for line in done.stderr.splitlines():
        if "flow entries have been deleted" in line:
            return int(line.split(":")[-1].split()[0])
    raise NftError(done.stderr.strip() or f"conntrack exited with {done.returncode}")


@dataclass(frozen=True, slots=True)
class FlowCounters:
    """What the kernel counted for one backend of an l4 service since this process wrote the table."""

    flows: int
    bytes_in: int
    bytes_out: int


def l4_services(services: Mapping[str, Service]) -> list[Service]:
    return [s for s in services.values() if s.config.mode == L4_NAT]


def vip_of(service: Service) -> str | None:
    """The service's listen address, or None for 0.0.0.0 (any address of this host)."""
    host = service.config.listen_host
    return None if host == "0.0.0.0" else host


def describe(service: Service) -> L4Service:
    """The table's view of ``service`` now: a synchronous read of its pool (no await may come in between)."""
    cfg = service.config
    backends = tuple(L4Backend(service.name, b.name, b.address, b.port) for b in service.pool.backends)
    keys = {b.name: lb.key for b, lb in zip(service.pool.backends, backends, strict=True)}
    targets = tuple((keys[b.name], w) for b, w in service.pool.weighted())
    return L4Service(service.name, vip_of(service), cfg.listen_port, cfg.balance == "source-hash", backends, targets)


class L4Nat:
    """The nftables table of one process's l4 services; owned by the supervisor (the parent with workers)."""

    def __init__(
        self,
        table: str,
        services: Mapping[str, Service],
        *,
        nft: Callable[[dict[str, Any]], str] = run_nft,
        flush: Callable[[str | None, int, str, int], int] = delete_flows,
    ) -> None:
        self.table = table
        self.services = services
        self.nft = nft
        self.flush = flush
        # What the kernel holds, as rendered (None: nothing written by this process yet).
        self.applied: list[L4Service] | None = None
        self.objects = Objects()
        # (service, backend) -> whether its flows were last seen as to be cut (down with "close", or maint).
        self.cut: dict[tuple[str, str], bool] = {}
        self.transactions = 0
        self.failures = 0
        self.flows_deleted = 0
        self._counters: dict[str, tuple[int, int]] = {}
        self._counters_at = -1.0

    @property
    def engaged(self) -> bool:
        """Whether this process has written the table (then it deletes it at a clean stop)."""
        return self.applied is not None

    def wanted(self) -> bool:
        return bool(l4_services(self.services)) or self.engaged

    def sync(self) -> bool:
        """Render the table from the backends now and apply it if it changed; True when a transaction ran.

        Raises :class:`NftError` when nft refuses it (the next call tries again: ``applied`` is unchanged).
        """
        services = [describe(s) for s in l4_services(self.services)]
        if not services and self.applied is None:
            return False  # no l4 service, and no table of ours: nft is never run
        if services == self.applied:
            self._cut_flows()
            return False
        payload = render(self.table, services, fresh=self.applied is None, before=self.objects)
        self.nft(payload)
        self.applied = services
        self.objects = objects_of(services)
        self.transactions += 1
        log.info(
            "l4 table applied",
            table=self.table,
            services={s.name: {self._name(s, k): w for k, w in s.targets} for s in services},
        )
        self._cut_flows()
        return True

    @staticmethod
    def _name(service: L4Service, key: str) -> str:
        return next(b.name for b in service.backends if b.key == key)

    def _cut_flows(self) -> None:
        """Delete the conntrack entries of backends that just went down (with "close") or into maint."""
        seen: set[tuple[str, str]] = set()
        for service in l4_services(self.services):
            close_on_down = service.config.health_check.on_marked_down == "close"
            cfg = service.config
            vip = vip_of(service)
            for b in service.pool.backends:
                key = (service.name, b.name)
                seen.add(key)
                down = not b.healthy or b.agent_down is not None
                cut = (down and close_on_down) or b.admin_state == "maint"
                before = self.cut.get(key)
                self.cut[key] = cut
                if cut and before is False:
                    try:
                        n = self.flush(vip, cfg.listen_port, b.address, b.port)
                    except NftError as exc:
                        self.failures += 1
                        log.error(
                            "deleting a backend's flows failed", service=service.name, backend=b.name, error=str(exc)
                        )
                        continue
                    self.flows_deleted += n
                    log.warning("backend's flows deleted", service=service.name, backend=b.name, flows=n)
        for key in [k for k in self.cut if k not in seen]:
            del self.cut[key]

    def cut_now(self, service_name: str, backend_name: str) -> None:
        """A drain's deadline passed: delete the flows of that backend if it is still draining (l4 services only)."""
        service = self.services.get(service_name)
        if service is None or service.config.mode != L4_NAT or not self.engaged:
            return
        b = service.pool.by_name.get(backend_name)
        if b is None or b.operator_state != "drain":
            return
        try:
            n = self.flush(vip_of(service), service.config.listen_port, b.address, b.port)
        except NftError as exc:
            self.failures += 1
            log.error("deleting a drained backend's flows failed", service=service_name, backend=b.name, error=str(exc))
            return
        self.flows_deleted += n
        log.warning("drain deadline: backend's flows deleted", service=service_name, backend=b.name, flows=n)

    async def run(self) -> None:
        """Keep the table in step until cancelled; a failed transaction is logged and tried again next tick."""
        while True:
            try:
                self.sync()
            except NftError as exc:
                self.failures += 1
                log.error(
                    "nft refused the l4 table; the kernel keeps the previous one", table=self.table, error=str(exc)
                )
            except Exception:
                self.failures += 1
                log.exception("programming the l4 table failed")
            await asyncio.sleep(POLL)

    def remove(self) -> None:
        """Delete the table (a clean stop): new flows are refused; established ones keep their NAT binding."""
        if not self.engaged:
            return
        t = {"family": FAMILY, "name": self.table}
        try:
            self.nft({"nftables": [{"add": {"table": t}}, {"delete": {"table": t}}]})
        except NftError as exc:
            log.error("could not delete the l4 table", table=self.table, error=str(exc))
            return
        self.applied = None
        self.objects = Objects()
        log.info("l4 table deleted", table=self.table)

    def counters(self) -> dict[tuple[str, str], FlowCounters]:
        """Per (service, backend) of the l4 services: new flows and bytes each way, read from nft's counters."""
        now = time.monotonic()
        if self.engaged and now - self._counters_at > COUNTERS_TTL:
            self._counters_at = now
            try:
                self._counters = self._read_counters()
            except (NftError, ValueError, KeyError) as exc:
                log.warning("could not read the l4 counters", table=self.table, error=str(exc))
        out: dict[tuple[str, str], FlowCounters] = {}
        for s in self.applied or []:
            for b in s.backends:
                new, inbound, outbound = (self._counters.get(n, (0, 0)) for n in counter_names(b))
                out[(s.name, b.name)] = FlowCounters(new[0], inbound[1], outbound[1])
        return out

    def _read_counters(self) -> dict[str, tuple[int, int]]:
        text = self.nft({"nftables": [{"list": {"counters": {"family": FAMILY, "table": self.table}}}]})
        out: dict[str, tuple[int, int]] = {}
        for item in json.loads(text)["nftables"]:
            c = item.get("counter")
            if c is not None and c.get("table") == self.table:
                out[c["name"]] = (int(c["packets"]), int(c["bytes"]))
        return out

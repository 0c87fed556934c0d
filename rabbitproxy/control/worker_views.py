"""What the parent of ``workers = N`` holds for the workers' connections: their counts and views of them.

The parent accepts no connection itself. Its ``Service`` and ``Backend`` objects get a :class:`Tally` (a connection
set that only knows how many the workers have open), the workers' counters are summed with :func:`add_counts`,
and a listing asked of a worker becomes :class:`RemoteConnection` objects the admin API reads like live ones.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from rabbitproxy.balancing.admission import AdmissionFigures
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.amqp_handshake import Handshake

if TYPE_CHECKING:
    from rabbitproxy.balancing.backend import Backend
    from rabbitproxy.control.workers import WorkerSet, WorkerSlot


class Tally(set[Any]):
    """A connection set of the parent that holds no connections, only how many the workers have open.

    The parent's ``Service.active`` and ``Backend.active`` are ``len(connections)``: with this in place they are
    the workers' sum, for the admin API, the metrics and the rebalancer's arithmetic alike. Iterating it yields
    nothing: the parent closes no connection itself.
    """

    __slots__ = ("count",)

    def __init__(self, count: int = 0) -> None:
        super().__init__()
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0


class RemoteConnection:
    """A worker's connection as the parent's admin API sees it: the ``Connection`` view, read when it was asked."""

    __slots__ = (
        "_handshake",
        "backend",
        "bytes_in",
        "bytes_out",
        "client_addr",
        "client_dst",
        "client_src",
        "id",
        "last_activity",
        "pid",
        "reason",
        "started",
        "worker",
        "workers",
    )

    def __init__(self, workers: WorkerSet, slot: WorkerSlot, backend: Backend | None, row: list[Any]) -> None:
        _, self.id, _, self.client_addr, self.bytes_in, self.bytes_out, self.started, self.last_activity, hs = row
        self.backend = backend
        self._handshake = Handshake(**hs) if hs is not None else None
        self.client_src: tuple[str, int] | None = None
        self.client_dst: tuple[str, int] | None = None
        self.reason: CloseReason | None = None
        self.worker = slot.index
        self.pid = slot.pid
        self.workers = workers

    @property
    def handshake(self) -> Handshake | None:
        return self._handshake

    def close(self, reason: CloseReason) -> None:
        self.workers.tell(self.worker, {"t": "close", "conn": self.id, "reason": str(reason)})

    def backend_endpoints(self) -> tuple[tuple[str, int], tuple[str, int]] | None:
        return None


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The sum of two per-service counter trees (as the worker's ``stats`` message gives them)."""
    out: dict[str, Any] = {}
    for name in a.keys() | b.keys():
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            out[name] = x if y is None else y
            continue
        out[name] = {
            "active": x["active"] + y["active"],
            "total": x["total"] + y["total"],
            "ended": dict(Counter(x["ended"]) + Counter(y["ended"])),
            "close_timeouts": x["close_timeouts"] + y["close_timeouts"],
            "failed_logins": x["failed_logins"] + y["failed_logins"],
            "handshakes_given_up": x["handshakes_given_up"] + y["handshakes_given_up"],
            "vhost_open": dict(Counter(x["vhost_open"]) + Counter(y["vhost_open"])),
            "backends": {
                bn: [p + q for p, q in zip(x["backends"].get(bn, [0] * 5), y["backends"].get(bn, [0] * 5), strict=True)]
                for bn in x["backends"].keys() | y["backends"].keys()
            },
            "admission": _add_admission(x.get("admission"), y.get("admission")),
        }
    return out


def _add_admission(x: list[Any] | None, y: list[Any] | None) -> list[Any] | None:
    if x is None or y is None:
        return x if y is None else y
    return AdmissionFigures.from_wire(x).plus(AdmissionFigures.from_wire(y)).to_wire()


def admission_now(current: dict[str, Any], base: dict[str, Any]) -> AdmissionFigures | None:
    """One service's admission figures over the workers: the live workers' present, everyone's counts so far.

    ``base`` holds what retired workers counted; their held clients died with them, so only their counts add up.
    """
    live, past = current.get("admission"), base.get("admission")
    if live is None and past is None:
        return None
    total = AdmissionFigures.from_wire(live) if live is not None else AdmissionFigures()
    if past is not None:
        total = total.plus(AdmissionFigures.from_wire(past), now=False)
    return total

"""What the parent of ``workers = N`` knows of the workers' connections: their figures, and listings asked of them.

The parent accepts no connection itself. Its ``Service`` and ``Backend`` objects get a :class:`Tally` (a connection
set that only knows how many the workers have open), and the workers' figures are summed with :func:`add_counts`:
the counters of the running workers and of their dead predecessors, the gauges of the running workers only
(:func:`write_figures`). ``GET /api/connections`` is answered from pages each worker cuts from its own connections
(:func:`list_connections`); one connection is asked of the one worker its id names (:func:`worker_of`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any, cast

from rabbitproxy.balancing import listing
from rabbitproxy.balancing.admission import AdmissionFigures
from rabbitproxy.control.channel import ChannelError
from rabbitproxy.control.closer import Cause, CloseOutcome, CloseStats, Via

if TYPE_CHECKING:
    from rabbitproxy.control.workers import WorkerSet, WorkerSlot
    from rabbitproxy.relay.service import Service


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


def add_counts(a: Any, b: Any) -> Any:
    """The sum of two trees of figures (as the worker's ``stats`` message gives them): dicts are added key by key,
    lists element by element, numbers as numbers; what only one side has is taken as it is."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: add_counts(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in a.keys() | b.keys()}
    if isinstance(a, list) and isinstance(b, list):
        return [add_counts(x, y) for x, y in zip(a, b, strict=True)]
    return a + b


def counters_of(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The counters of a worker's ``stats`` message, per service (what a dead worker leaves to its successor)."""
    return {name: s["counters"] for name, s in stats.get("services", {}).items()}


def write_figures(
    services: Mapping[str, Service],
    closed: dict[str, CloseStats],
    workers: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
) -> dict[tuple[str, str], int]:
    """Write the workers' figures onto the parent's services and backends; return how many workers hold each
    (service, backend) for their rebalancer.

    ``workers`` gives, per worker slot, what its dead predecessors counted (the base) and its last ``stats``
    message. Counters are the sum of both; gauges (open connections, vhosts, holds) are the running workers'
    only, so a dead worker's connections leave the sum.
    """
    counters: dict[str, Any] = {}
    gauges: dict[str, Any] = {}
    oldest: dict[str, float] = {}
    for base, stats in workers:
        counters = add_counts(add_counts(counters, base), counters_of(stats))
        gauges = add_counts(gauges, {name: s["gauges"] for name, s in stats.get("services", {}).items()})
        for name, s in stats.get("services", {}).items():
            oldest[name] = max(oldest.get(name, 0.0), s.get("oldest_wait", 0.0))
    holds: dict[tuple[str, str], int] = {}
    for sname, service in services.items():
        service.remote_admission = _admission(sname, counters, gauges, oldest)
        g = gauges.get(sname, {})
        service.connections = Tally(g.get("active", 0))
        service.vhost_open = {k: v for k, v in g.get("vhost_open", {}).items() if v}
        c = counters.get(sname)
        if c is not None:
            service.total = c["total"]
            service.ended = Counter(c["ended"])
            service.close_timeouts = c["close_timeouts"]
            service.failed_logins = c["failed_logins"]
            service.handshakes_given_up = c["handshakes_given_up"]
            # The workers close (drains, maint, the rebalancer, operators' closes); the parent reports their sum.
            closed.setdefault(sname, CloseStats()).counts = Counter(
                {cast("tuple[Cause, Via]", tuple(k.split("/", 1))): n for k, n in c["closed"].items()}
            )
        for b in service.pool.backends:
            active, holding = g.get("backends", {}).get(b.name, [0, 0])
            b.connections = Tally(active)
            b.rebalance_hold = holding > 0
            holds[sname, b.name] = holding
            figures = c["backends"].get(b.name) if c is not None else None
            if figures is not None:
                b.total, b.connect_errors, b.traffic_in, b.traffic_out = figures
    return holds


def _admission(
    name: str, counters: Mapping[str, Any], gauges: Mapping[str, Any], oldest: Mapping[str, float]
) -> AdmissionFigures | None:
    """One service's admission control over the workers; None when no worker paces it."""
    counted = counters.get(name, {}).get("admission")
    if counted is None:
        return None
    held, wait_sum, buckets = counted
    return AdmissionFigures(
        waiting=gauges.get(name, {}).get("admission", 0),
        oldest_wait=oldest.get(name, 0.0),
        held=held,
        wait_sum=wait_sum,
        wait_buckets=tuple(buckets),
    )


# -- connections ---------------------------------------------------------------------------------------------------


def _key(raw: list[Any]) -> listing.Key:
    return (int(raw[0]), float(raw[1]), int(raw[2]))


def _tagged(view: dict[str, Any], slot: WorkerSlot) -> dict[str, Any]:
    view["worker"] = slot.index
    view["worker_pid"] = slot.pid
    return view


def worker_of(ws: WorkerSet, conn_id: int) -> WorkerSlot:
    """The worker that numbers its connections like ``conn_id`` (see control.worker.worker_ids)."""
    return ws.slots[(conn_id - 1) % ws.count]


async def list_connections(ws: WorkerSet, query: listing.ConnectionQuery, now: float) -> dict[str, Any]:
    """The page ``query`` asks for, over every running worker: each sends its own first ``offset + limit``, in
    order, and the parent merges them (a worker that does not answer in time is left out)."""
    total = 0
    pages: list[list[tuple[listing.Key, dict[str, Any]]]] = []
    request = {"t": "connections", "query": dataclasses.asdict(query), "now": now}
    for slot, answer in await ws.ask_all(request):
        total += int(answer.get("total", 0))
        pages.append([(_key(key), _tagged(view, slot)) for key, view in answer.get("rows", [])])
    merged = heapq.merge(*pages, key=itemgetter(0))
    views = [view for _, view in itertools.islice(merged, query.offset, query.offset + query.limit)]
    return listing.page(total, views, query)


async def find_connection(ws: WorkerSet, conn_id: int) -> dict[str, Any] | None:
    """The view of connection ``conn_id``, asked of the one worker that can have it; None if it has not."""
    slot = worker_of(ws, conn_id)
    if slot.channel is None or not slot.ready:
        return None
    answer = await ws.request(slot, {"t": "connection", "conn": conn_id})
    return None if answer.get("missing") else _tagged(answer["view"], slot)


async def close_connection(ws: WorkerSet, conn_id: int, text: str) -> tuple[dict[str, Any], CloseOutcome] | None:
    """Ask the worker that has connection ``conn_id`` to close it as an operator's close (broker, else TCP).

    Its view (taken just before the close) and how it went; None when that worker does not have it.
    """
    slot = worker_of(ws, conn_id)
    if slot.channel is None or not slot.ready:
        return None
    answer = await ws.request(slot, {"t": "close_one", "conn": conn_id, "text": text}, 30.0)
    if answer.get("missing"):
        return None
    via = answer.get("via")
    if via not in ("broker", "tcp", "ended"):
        raise ChannelError(f"worker answered a close with {answer!r}")
    return _tagged(answer["view"], slot), CloseOutcome(via, str(answer.get("detail")))

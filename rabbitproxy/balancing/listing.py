"""Who is connected: the filtering, sorting and paging behind ``GET /api/connections``, pure (no I/O, no loop).

The admin API (and with ``workers = N`` each worker, for its own share) hands this module the live connections as
``(service name, Connection)`` pairs and the clock; it reads them only through the typed
:class:`~rabbitproxy.balancing.pool.Connection` view. Everything that can go
wrong with a query (an unknown sort, a limit out of range, an unknown parameter) is a :class:`QueryError` naming
the parameter, so a typo in a script is an answer, not a silently unfiltered list.

Filters are matched on the objects first and views are built for the returned page only: listing a proxy with
tens of thousands of clients costs a pass over them and a partial sort, not a dict per connection.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Final, Literal, get_args

from rabbitproxy.balancing.views import Connection

Sort = Literal["age", "bytes_in", "bytes_out", "idle"]
SORTS: Final[tuple[Sort, ...]] = get_args(Sort)
Order = Literal["desc", "asc"]
ORDERS: Final[tuple[Order, ...]] = get_args(Order)
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
# Filter values are compared with client-supplied text of at most 256 characters (the handshake reader's cut), so
# a longer value can never match; refusing it keeps a careless script from sending megabytes of query string.
MAX_FILTER: Final = 256
# The reason given for closing a connection goes to the log and, through the broker, to the client's own log.
MAX_REASON: Final = 200
DEFAULT_REASON: Final = "closed by the proxy's operator"
_FILTERS: Final = ("service", "backend", "user", "vhost", "name")
_PARAMS: Final = frozenset({*_FILTERS, "sort", "order", "limit", "offset"})


class QueryError(ValueError):
    """A query the API cannot answer; ``errors`` holds one message per bad parameter."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _whole(raw: str, key: str, low: int, high: int | None, errors: list[str]) -> int | None:
    text = raw.strip()
    if text.isascii() and text.isdigit():
        value = int(text)
        if value >= low and (high is None or value <= high):
            return value
    bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
    errors.append(f"{key}: must be a whole number {bound}, not {raw!r}")
    return None


@dataclass(frozen=True, slots=True)
class ConnectionQuery:
    """What ``GET /api/connections`` was asked: filters (None = any), the order and the page."""

    service: str | None = None
    backend: str | None = None
    user: str | None = None
    vhost: str | None = None
    # A substring of the client's connection_name, matched without regard to case.
    name: str | None = None
    sort: Sort = "age"
    # "desc": the oldest, biggest or longest idle first, which is what an operator hunting a connection wants.
    order: Order = "desc"
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> ConnectionQuery:
        """Read a query string; QueryError naming every bad or unknown parameter."""
        errors: list[str] = []
        unknown = sorted(set(params) - _PARAMS)
        if unknown:
            errors.append(f"unknown parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(_PARAMS))})")
        filters: dict[str, str | None] = {}
        for key in _FILTERS:
            value = params.get(key)
            if value is not None and len(value) > MAX_FILTER:
                errors.append(f"{key}: at most {MAX_FILTER} characters")
            # An empty value (?user=) means no filter, as an empty filter box on the page does.
            filters[key] = value or None
        sort = params.get("sort", "age")
        if sort not in SORTS:
            errors.append(f"sort: must be one of {', '.join(SORTS)}, not {sort!r}")
        order = params.get("order", "desc")
        if order not in ORDERS:
            errors.append(f"order: must be one of {', '.join(ORDERS)}, not {order!r}")
        limit = _whole(params["limit"], "limit", 1, MAX_LIMIT, errors) if "limit" in params else DEFAULT_LIMIT
        offset = _whole(params["offset"], "offset", 0, None, errors) if "offset" in params else 0
        if errors:
            raise QueryError(errors)
        assert limit is not None and offset is not None
        return cls(
            service=filters["service"],
            backend=filters["backend"],
            user=filters["user"],
            vhost=filters["vhost"],
            name=filters["name"],
            sort=sort,  # type: ignore[arg-type]  # checked against SORTS above
            order=order,  # type: ignore[arg-type]
            limit=limit,
            offset=offset,
        )

    def matches(self, service: str, conn: Connection) -> bool:
        if self.service is not None and service != self.service:
            return False
        if self.backend is not None and (conn.backend is None or conn.backend.name != self.backend):
            return False
        if self.user is None and self.vhost is None and self.name is None:
            return True
        hs = conn.handshake
        if hs is None:
            # A filter on the identity cannot match a connection whose handshake was not read (yet).
            return False
        if self.user is not None and hs.user != self.user:
            return False
        if self.vhost is not None and hs.vhost != self.vhost:
            return False
        return self.name is None or (
            hs.connection_name is not None and self.name.casefold() in hs.connection_name.casefold()
        )


def idle_seconds(conn: Connection, now: float) -> float | None:
    """Seconds since the last byte either way; None where the data path does not keep that (no idle timeout)."""
    last = conn.last_activity
    return max(0.0, now - last) if last > 0 else None


Key = tuple[int, float, int]


def order_key(query: ConnectionQuery, conn: Connection, now: float) -> Key:
    """Where ``conn`` goes in the order ``query`` asks for, as one key sorted ascending.

    One key for every sort and order, so the pages of several workers merge into the same order a single process
    gives. Under order=desc the oldest, biggest or longest idle come first; ties go by id, i.e. by the order the
    clients arrived in. With sort=idle, connections whose idle time is unknown come after every known one, in
    either order, oldest first.
    """
    sort = query.sort
    if sort == "idle":
        idle = idle_seconds(conn, now)
        if idle is None:
            return (1, 0.0, conn.id)
        value = idle
    elif sort == "age":
        value = now - conn.started
    else:
        value = float(conn.bytes_in if sort == "bytes_in" else conn.bytes_out)
    return (0, -value, conn.id) if query.order == "desc" else (0, value, -conn.id)


# The protocol a connection's handshake showed, as operators name it.
PROTOCOL_NAMES: Final = {"0-9-1": "AMQP 0-9-1", "1.0": "AMQP 1.0", "stream": "stream"}


def connection_view(service: str, conn: Connection, now: float) -> dict[str, Any]:
    """One connection as JSON-ready data; identity fields are None until the AMQP handshake told them."""
    backend = conn.backend
    hs = conn.handshake
    idle = idle_seconds(conn, now)
    return {
        "id": conn.id,
        "service": service,
        "backend": backend.name if backend is not None else None,
        "backend_address": _host_port(backend.address, backend.port) if backend is not None else None,
        "client": conn.client_addr,
        # Client to backend, and backend to client, as in the backends' traffic counters.
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "age": round(max(0.0, now - conn.started), 3),
        "idle": round(idle, 3) if idle is not None else None,
        "protocol": PROTOCOL_NAMES.get(hs.protocol) if hs is not None and hs.protocol else None,
        "user": hs.user if hs else None,
        "vhost": hs.vhost if hs else None,
        "connection_name": hs.connection_name if hs else None,
        "product": hs.product if hs else None,
        "version": hs.version if hs else None,
        "platform": hs.platform if hs else None,
        "heartbeat": hs.heartbeat if hs else None,
    }


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rank(
    connections: Iterable[tuple[str, Connection]], query: ConnectionQuery, now: float
) -> tuple[int, list[tuple[Key, str, Connection]]]:
    """How many connections match ``query``, and the first ``offset + limit`` of them in order, with their keys.

    A partial sort: a worker asked for one page of its tens of thousands of connections sorts only what a page can
    reach.
    """
    total = 0

    def matched() -> Iterator[tuple[Key, str, Connection]]:
        nonlocal total
        for service, conn in connections:
            if query.matches(service, conn):
                total += 1
                yield order_key(query, conn, now), service, conn

    # A generator, not a list: only the heap of offset + limit entries is kept.
    top = heapq.nsmallest(query.offset + query.limit, matched(), key=itemgetter(0))
    return total, top


def page(total: int, views: list[dict[str, Any]], query: ConnectionQuery) -> dict[str, Any]:
    """The answer to ``query``: the page's connection views, the total that matched and the next page's offset."""
    end = query.offset + query.limit
    return {
        "total": total,
        "offset": query.offset,
        "limit": query.limit,
        # Offsets shift as connections come and go; a client paging through a busy proxy may see one twice or
        # miss one, which is fine for looking and why closing goes by id.
        "next_offset": end if end < total else None,
        "sort": query.sort,
        "order": query.order,
        "connections": views,
    }


def select(connections: Iterable[tuple[str, Connection]], query: ConnectionQuery, now: float) -> dict[str, Any]:
    """The page of connections ``query`` asks for, with the total that matched and the next page's offset."""
    total, top = rank(connections, query, now)
    return page(total, [connection_view(service, conn, now) for _, service, conn in top[query.offset :]], query)


def find(connections: Iterable[tuple[str, Connection]], conn_id: int) -> tuple[str, Connection] | None:
    """The live connection with this id, and its service's name; None when there is none (any more)."""
    for service, conn in connections:
        if conn.id == conn_id:
            return service, conn
    return None


def reason_text(raw: str | None) -> str:
    """The reason an operator gave for a close, made safe for a log line and an HTTP header; ValueError if too long.

    Control characters (a newline would forge a second log line, or end the header) become spaces.
    """
    if raw is None or not raw.strip():
        return DEFAULT_REASON
    if len(raw) > MAX_REASON:
        raise ValueError(f"reason: at most {MAX_REASON} characters, got {len(raw)}")
    return "".join(c if c.isprintable() else " " for c in raw).strip()

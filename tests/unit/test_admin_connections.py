"""GET /api/connections without a server: the query's validation, the filters, the sorts and the paging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from rabbitproxy.balancing.listing import (
    DEFAULT_LIMIT,
    DEFAULT_REASON,
    MAX_REASON,
    ConnectionQuery,
    QueryError,
    connection_view,
    find,
    reason_text,
    select,
)
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.amqp_handshake import Handshake

NOW = 1000.0


@dataclass
class _Backend:
    name: str
    address: str = "127.0.0.1"
    port: int = 5672
    connections: set[Any] = field(default_factory=set)


@dataclass(eq=False)
class _Conn:
    """A connection as the admin API sees it through the Connection protocol."""

    id: int
    backend: _Backend | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = NOW
    last_activity: float = 0.0
    handshake: Handshake | None = None
    client_addr: str = "10.0.0.7:51234"
    client_src: tuple[str, int] | None = None
    client_dst: tuple[str, int] | None = None
    reason: CloseReason | None = None

    def close(self, reason: CloseReason) -> None:
        self.reason = reason

    def backend_endpoints(self) -> None:
        return None


R1, R2 = _Backend("rabbit1"), _Backend("rabbit2", "::1", 5673)


def _hs(user: str, vhost: str, name: str | None) -> Handshake:
    return Handshake(
        protocol="0-9-1", user=user, vhost=vhost, connection_name=name, product="aio-pika", version="9.4", heartbeat=60
    )


def _fleet() -> list[tuple[str, Any]]:
    orders = _hs("alice", "/", "Orders-1")
    return [
        ("amqp", _Conn(1, R1, 100, 5, started=NOW - 50, last_activity=NOW - 3, handshake=orders)),
        ("amqp", _Conn(2, R2, 900, 1, started=NOW - 10, handshake=_hs("bob", "shop", "billing"))),
        ("amqp", _Conn(3, R1, 5, 700, started=NOW - 30, last_activity=NOW - 20, handshake=_hs("alice", "shop", None))),
        ("other", _Conn(4, None, 0, 0, started=NOW - 1)),
    ]


def _ids(query: ConnectionQuery) -> list[int]:
    return [c["id"] for c in select(_fleet(), query, NOW)["connections"]]


def test_defaults() -> None:
    q = ConnectionQuery.from_params({})
    assert (q.sort, q.order, q.limit, q.offset) == ("age", "desc", DEFAULT_LIMIT, 0)
    assert (q.service, q.backend, q.user, q.vhost, q.name) == (None,) * 5


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": "0"}, "limit: must be a whole number from 1 to 1000"),
        ({"limit": "1001"}, "limit: must be a whole number from 1 to 1000"),
        ({"limit": "ten"}, "limit:"),
        ({"limit": "-5"}, "limit:"),
        ({"offset": "-1"}, "offset: must be a whole number of at least 0"),
        ({"offset": "1.5"}, "offset:"),
        ({"sort": "size"}, "sort: must be one of age, bytes_in, bytes_out, idle"),
        ({"order": "up"}, "order: must be one of desc, asc"),
        ({"usr": "alice"}, "unknown parameter(s): usr"),
        ({"name": "x" * 257}, "name: at most 256 characters"),
    ],
)
def test_bad_queries_name_the_parameter(params: dict[str, str], fragment: str) -> None:
    with pytest.raises(QueryError) as info:
        ConnectionQuery.from_params(params)
    assert any(fragment in e for e in info.value.errors), info.value.errors


def test_every_bad_parameter_is_reported_at_once() -> None:
    with pytest.raises(QueryError) as info:
        ConnectionQuery.from_params({"limit": "0", "sort": "x", "what": "1"})
    assert len(info.value.errors) == 3


def test_filters() -> None:
    assert _ids(ConnectionQuery(service="amqp")) == [1, 3, 2]
    assert _ids(ConnectionQuery(service="other")) == [4]
    assert _ids(ConnectionQuery(backend="rabbit1")) == [1, 3]
    assert _ids(ConnectionQuery(user="alice")) == [1, 3]
    assert _ids(ConnectionQuery(vhost="shop")) == [3, 2]
    assert _ids(ConnectionQuery(user="alice", vhost="shop")) == [3]
    # A substring of connection_name, any case; a connection without a name or a handshake never matches.
    assert _ids(ConnectionQuery(name="orders")) == [1]
    assert _ids(ConnectionQuery(name="ORD")) == [1]
    assert _ids(ConnectionQuery(name="I")) == [2]
    assert _ids(ConnectionQuery(user="nobody")) == []


def test_empty_filter_values_mean_no_filter() -> None:
    q = ConnectionQuery.from_params({"user": "", "name": ""})
    assert _ids(q) == [1, 3, 2, 4]


def test_sorts_and_orders() -> None:
    assert _ids(ConnectionQuery(sort="age")) == [1, 3, 2, 4]
    assert _ids(ConnectionQuery(sort="age", order="asc")) == [4, 2, 3, 1]
    assert _ids(ConnectionQuery(sort="bytes_in")) == [2, 1, 3, 4]
    assert _ids(ConnectionQuery(sort="bytes_out")) == [3, 1, 2, 4]
    # Unknown idle times (no idle timeout watches those connections) come last either way.
    assert _ids(ConnectionQuery(sort="idle")) == [3, 1, 2, 4]
    assert _ids(ConnectionQuery(sort="idle", order="asc")) == [1, 3, 2, 4]


def test_ties_go_by_arrival() -> None:
    same = [("s", _Conn(i, R1, 10, started=NOW - 5)) for i in (7, 5, 6)]
    assert [c["id"] for c in select(same, ConnectionQuery(sort="bytes_in"), NOW)["connections"]] == [5, 6, 7]


def test_paging() -> None:
    page = select(_fleet(), ConnectionQuery(limit=2), NOW)
    assert [c["id"] for c in page["connections"]] == [1, 3]
    assert (page["total"], page["offset"], page["limit"], page["next_offset"]) == (4, 0, 2, 2)
    page = select(_fleet(), ConnectionQuery(limit=2, offset=2), NOW)
    assert [c["id"] for c in page["connections"]] == [2, 4]
    assert page["next_offset"] is None
    page = select(_fleet(), ConnectionQuery(offset=10), NOW)
    assert (page["connections"], page["total"], page["next_offset"]) == ([], 4, None)
    q = ConnectionQuery.from_params({"limit": "1000", "offset": "3"})
    assert (q.limit, q.offset) == (1000, 3)


def test_view_of_a_connection_with_its_identity() -> None:
    _, conn = _fleet()[0]
    assert connection_view("amqp", conn, NOW) == {
        "id": 1,
        "service": "amqp",
        "backend": "rabbit1",
        "backend_address": "127.0.0.1:5672",
        "client": "10.0.0.7:51234",
        "bytes_in": 100,
        "bytes_out": 5,
        "age": 50.0,
        "idle": 3.0,
        "protocol": "AMQP 0-9-1",
        "user": "alice",
        "vhost": "/",
        "connection_name": "Orders-1",
        "product": "aio-pika",
        "version": "9.4",
        "platform": None,
        "heartbeat": 60,
    }


def test_view_of_a_connection_still_connecting_without_handshake() -> None:
    view = connection_view("other", _Conn(9, None, started=NOW - 0.25), NOW)
    assert (view["backend"], view["backend_address"], view["idle"], view["age"]) == (None, None, None, 0.25)
    assert all(
        view[k] is None for k in ("protocol", "user", "vhost", "connection_name", "product", "version", "heartbeat")
    )
    assert connection_view("s", _Conn(1, R2), NOW)["backend_address"] == "[::1]:5673"


def test_find_by_id() -> None:
    fleet = _fleet()
    found = find(fleet, 3)
    assert found is not None and found[0] == "amqp" and found[1].id == 3
    assert find(fleet, 99) is None


def test_reason_text_is_bounded_and_one_line() -> None:
    assert reason_text(None) == DEFAULT_REASON
    assert reason_text("  ") == DEFAULT_REASON
    assert reason_text("patching rabbit2") == "patching rabbit2"
    # A newline would forge a log line or end the X-Reason header.
    assert reason_text("a\nb\r\x00c") == "a b  c"
    assert reason_text("x" * MAX_REASON) == "x" * MAX_REASON
    with pytest.raises(ValueError, match="reason: at most 200 characters, got 201"):
        reason_text("x" * (MAX_REASON + 1))

"""`rabbitproxy connections` and `connections close` without a proxy: the requests they make and what they print."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from rabbitproxy.admin.client import AdminClient, AdminError, _seconds
from rabbitproxy.cli import app

runner = CliRunner()

PAGE = {
    "total": 3,
    "offset": 0,
    "limit": 2,
    "next_offset": 2,
    "sort": "bytes_out",
    "order": "desc",
    "connections": [
        {
            "id": 7,
            "service": "amqp",
            "backend": "rabbit2",
            "backend_address": "10.0.0.11:5672",
            "client": "10.0.0.7:51234",
            "bytes_in": 2048,
            "bytes_out": 3 * 1024 * 1024,
            "age": 3725.0,
            "idle": None,
            "user": "orders",
            "vhost": "shop",
            # Text from the client: must be shown as it is, not read as rich markup.
            "connection_name": "orders [bold]7[/]",
            "product": "pika",
            "version": "1.3.2",
            "platform": None,
            "heartbeat": 60,
        },
        {
            "id": 9,
            "service": "amqp",
            "backend": None,
            "backend_address": None,
            "client": "10.0.0.8:40000",
            "bytes_in": 0,
            "bytes_out": 0,
            "age": 0.5,
            "idle": 0.1,
            "user": None,
            "vhost": None,
            "connection_name": None,
            "product": None,
            "version": None,
            "platform": None,
            "heartbeat": None,
        },
    ],
}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, float | None]]:
    seen: list[tuple[str, str, float | None]] = []

    def request(self: AdminClient, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        seen.append((method, path, timeout))
        if path.startswith("/api/connections/404"):
            raise AdminError("no open connection with id '404'", 404)
        if method == "DELETE":
            return {"id": 12, "service": "amqp", "reason": "moving you", "via": "broker", "detail": "rabbit2"}
        return PAGE

    monkeypatch.setattr(AdminClient, "request", request)
    return seen


def test_list_sends_the_filters_and_prints_a_table(calls: list[tuple[str, str, float | None]]) -> None:
    result = runner.invoke(
        app, ["connections", "--name", "orders 7", "--user", "orders", "--sort", "bytes_out", "--limit", "2"]
    )
    assert result.exit_code == 0, result.output
    [(method, path, _)] = calls
    assert method == "GET"
    assert path == "/api/connections?user=orders&name=orders+7&sort=bytes_out&order=desc&limit=2&offset=0"
    out = result.output
    assert "orders [bold]7[/]" in out
    assert "(connecting)" in out and "1h02m" in out and "3.0 MiB" in out and "pika 1.3.2" in out
    assert "1-2 of 3 connection(s), by bytes_out desc; more with --offset 2" in out


def test_list_as_json_and_ascending(calls: list[tuple[str, str, float | None]]) -> None:
    result = runner.invoke(app, ["connections", "--json", "--asc", "--offset", "2"])
    assert result.exit_code == 0, result.output
    assert calls[0][1] == "/api/connections?sort=age&order=asc&limit=100&offset=2"
    assert '"connection_name": "orders [bold]7[/]"' in result.output


def test_close_sends_the_reason_and_says_how(calls: list[tuple[str, str, float | None]]) -> None:
    result = runner.invoke(app, ["connections", "close", "12", "--reason", "moving you"])
    assert result.exit_code == 0, result.output
    [(method, path, timeout)] = calls
    assert (method, path) == ("DELETE", "/api/connections/12?reason=moving+you")
    # Closing through the broker may wait for it to learn of a young connection: longer than a plain request.
    assert timeout is not None and timeout >= 30
    assert "connection 12 of amqp closed through the broker (rabbit2)" in result.output


def test_close_of_an_unknown_id_fails_with_the_api_message(calls: list[tuple[str, str, float | None]]) -> None:
    result = runner.invoke(app, ["connections", "close", "404"])
    assert result.exit_code == 1
    assert "no open connection with id '404'" in result.output


def test_limit_is_checked_before_asking() -> None:
    result = runner.invoke(app, ["connections", "--limit", "5000"])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "-"), (0.4, "0s"), (59.9, "59s"), (61, "1m01s"), (3725, "1h02m"), (90000, "1d01h")]
)
def test_durations_for_people(seconds: float | None, text: str) -> None:
    assert _seconds(seconds) == text


def test_with_workers_the_table_says_which_worker_holds_each_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    # workers = N: the parent's listing carries each connection's worker index; one process has no such column.
    rows = [{**c, "worker": i, "worker_pid": 100 + i} for i, c in enumerate(PAGE["connections"])]
    for page, shown in (({**PAGE, "connections": rows}, True), (PAGE, False)):
        monkeypatch.setattr(AdminClient, "request", lambda self, method, path, body=None, *, timeout=None, p=page: p)
        result = runner.invoke(app, ["connections"])
        assert result.exit_code == 0, result.output
        header = next(line for line in result.output.splitlines() if " service " in line)
        assert ("worker" in header) is shown, header

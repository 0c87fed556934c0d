"""The console line renderer used when logs go to a file, a pipe or journald: logfmt, read back by a strict parser."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy import logs
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.logs import ConsoleLine
from tests.support.logfmt import LogfmtError, parse


def test_keys_are_sorted_and_values_that_need_it_are_quoted_as_logfmt() -> None:
    line = ConsoleLine()(
        None,
        "info",
        {
            "timestamp": "2026-11-26T06:00:00.000000Z",
            "level": "info",
            "event": "connection closed",
            "reason": "client closed",
            "client": "127.0.0.1:5555",
            "bytes_in": 3,
            "empty": "",
            "quote": "it's",
            "eq": "a=b",
            "none": None,
            "flag": True,
            "backend_addr": "[2001:db8::1]:5672",
            "text": 'say "hi"\\now\n\tend\x01',
        },
    )
    assert line == (
        'timestamp=2026-11-26T06:00:00.000000Z level=info event="connection closed" backend_addr=[2001:db8::1]:5672 '
        'bytes_in=3 client=127.0.0.1:5555 empty="" eq="a=b" flag=true none= quote=it\'s reason="client closed" '
        'text="say \\"hi\\"\\\\now\\n\\tend\\u0001"'
    )
    assert parse(line)["text"] == 'say "hi"\\now\n\tend\x01'
    assert parse(line)["eq"] == "a=b"


def test_a_close_reason_is_written_as_its_text() -> None:
    # Reasons are a StrEnum; the line must read reason="client closed", never the member's repr.
    line = ConsoleLine()(None, "info", {"event": "connection closed", "reason": CloseReason.CLIENT_CLOSED})
    assert line.endswith('reason="client closed"')
    assert ConsoleLine()(None, "info", {"event": "x", "reason": CloseReason.LIMIT}).endswith("reason=limit")


def test_an_event_without_fields_has_no_padding() -> None:
    assert ConsoleLine()(None, "warning", {"level": "warning", "event": "plain"}) == "level=warning event=plain"


def test_setup_writes_logfmt_lines_with_tracebacks_to_a_non_terminal_stream() -> None:
    out = io.StringIO()
    logs.setup("info", "console", out)
    try:
        log = structlog.get_logger("t")
        log.debug("hidden")
        log.info("shown", n=1)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        logs.setup("info", "console")
    lines = [parse(line) for line in out.getvalue().splitlines()]
    assert "hidden" not in out.getvalue()
    assert len(lines) == 2
    assert (lines[0]["level"], lines[0]["event"], lines[0]["n"]) == ("info", "shown", "1")
    assert (lines[1]["level"], lines[1]["event"]) == ("error", "failed")
    # The traceback is one escaped field of its own line, so that no line of the log is anything but logfmt.
    assert lines[1]["exception"].startswith("Traceback (most recent call last):\n")
    assert lines[1]["exception"].endswith("ValueError: boom")


def test_standard_library_records_are_logfmt_lines_too() -> None:
    # aiohttp and asyncio log through the logging module; their lines must parse like ours.
    out = io.StringIO()
    logs.setup("info", "console", out)
    try:
        logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "<Task x>", 0.25)
        try:
            raise OSError("gone")
        except OSError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
    finally:
        logs.setup("info", "console")
    first, second = (parse(line) for line in out.getvalue().splitlines())
    assert first["event"] == "Executing <Task x> took 0.250 seconds"
    assert (first["level"], first["logger"]) == ("warning", "asyncio")
    assert _TIMESTAMP.fullmatch(first["timestamp"])
    assert (second["level"], second["logger"]) == ("error", "aiohttp.server")
    assert second["exception"].endswith("OSError: gone")


def test_auto_is_json_unless_the_stream_is_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "auto.log"
    with path.open("w") as out:
        logs.setup("info", "auto", out)
        try:
            structlog.get_logger("t").info("shown", reason="client closed")
        finally:
            logs.setup("info", "console")
    assert json.loads(path.read_text()) == {
        "reason": "client closed",
        "event": "shown",
        "level": "info",
        "timestamp": json.loads(path.read_text())["timestamp"],
    }


_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _ANY_TEXT), _ANY_TEXT)
def test_any_text_reads_back_from_the_line(fields: dict[str, str], event: str) -> None:
    fields = {k: v for k, v in fields.items() if k not in ("timestamp", "level", "event", "exception", "stack")}
    line = ConsoleLine()(None, "info", {**fields, "event": event, "level": "info"})
    assert "\n" not in line
    assert parse(line) == {"level": "info", "event": event, **fields}


@pytest.mark.parametrize("bad", ["a=b  c=d", "a=b ", 'a="x', 'a=x"y', "a", "=b", 'a="\\q"', "a=\x01"])
def test_the_strict_reader_refuses_what_is_not_logfmt(bad: str) -> None:
    with pytest.raises(LogfmtError):
        parse(bad)


# -- the per-connection event writer ---------------------------------------------------------------------------------

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")

FIELDS: list[dict[str, Any]] = [
    {
        "client": "192.0.2.7:51234",
        "backend": "rabbit1",
        "backend_addr": "10.0.0.10:5672",
        "local": "10.0.0.2:40112",
        "bytes_in": 1234,
        "bytes_out": 0,
        "duration": 0.002,
        "reason": CloseReason.CLIENT_CLOSED.value,
    },
    {
        "client": "unknown",
        "backend": None,
        "backend_addr": None,
        "local": None,
        "bytes_in": 0,
        "bytes_out": 0,
        "duration": 12.5,
        "reason": CloseReason.HEARTBEAT_TIMEOUT.value,
        "close_timeout_expired": True,
        "user": "app user",
        "vhost": "/",
        "connection_name": 'orders "eu" = 1',
        "client_product": "ünïcode ✓",
        "heartbeat": 60,
    },
]


def _both(tmp_path: Path, fmt: str, fields: dict[str, Any]) -> tuple[str, str]:
    """The same event written by EventWriter and by structlog itself, to a real file (so it has a descriptor)."""
    path = tmp_path / f"{fmt}.log"
    with path.open("w") as out:
        logs.setup("info", fmt, out)
        try:
            writer = logs.EventWriter(structlog.get_logger("t"), "connection closed", service="amqp")
            assert writer.fd == out.fileno()
            writer.info(dict(fields))
            structlog.get_logger("t").bind(service="amqp").info("connection closed", **fields)
        finally:
            logs.setup("info", "console")
    direct, through_structlog = path.read_text().splitlines()
    return direct, through_structlog


@pytest.mark.parametrize("fields", FIELDS)
def test_the_connection_event_writes_the_console_line_structlog_writes(tmp_path: Path, fields: dict[str, Any]) -> None:
    direct, expected = _both(tmp_path, "console", fields)
    got, want = parse(direct), parse(expected)
    assert _TIMESTAMP.fullmatch(got.pop("timestamp")) and _TIMESTAMP.fullmatch(want.pop("timestamp"))
    assert direct.split(" ", 1)[1] == expected.split(" ", 1)[1]
    assert got == want


@pytest.mark.parametrize("fields", FIELDS)
def test_the_connection_event_writes_the_json_structlog_writes(tmp_path: Path, fields: dict[str, Any]) -> None:
    direct, expected = _both(tmp_path, "json", fields)
    got, want = json.loads(direct), json.loads(expected)
    assert _TIMESTAMP.fullmatch(got.pop("timestamp")) and _TIMESTAMP.fullmatch(want.pop("timestamp"))
    # Same keys in the same order, not only the same mapping: people read these lines too.
    assert list(got.items()) == list(want.items())


def test_without_a_descriptor_the_event_goes_through_structlog() -> None:
    out = io.StringIO()
    logs.setup("info", "console", out)
    try:
        writer = logs.EventWriter(structlog.get_logger("t"), "connection closed", service="amqp")
        writer.info({"client": "192.0.2.7:1", "reason": "client closed"})
    finally:
        logs.setup("info", "console")
    assert writer.fd == -1
    assert (
        out.getvalue()
        .rstrip()
        .endswith('level=info event="connection closed" client=192.0.2.7:1 reason="client closed" service=amqp')
    )


def test_context_variables_bound_before_the_writer_are_in_its_lines(tmp_path: Path) -> None:
    # A worker process binds worker=N before its services start (rabbitproxy.control.worker).
    structlog.contextvars.bind_contextvars(worker=2)
    try:
        direct, expected = _both(tmp_path, "console", FIELDS[0])
    finally:
        structlog.contextvars.unbind_contextvars("worker")
    assert " worker=2" in direct and direct.split(" ", 1)[1] == expected.split(" ", 1)[1]


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_the_timestamp_is_what_datetime_writes(now: float) -> None:
    want = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat().replace("+00:00", "Z")
    assert logs._timestamp(now) == want

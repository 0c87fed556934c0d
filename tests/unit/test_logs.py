"""The console line renderer used when logs go to a file, a pipe or journald."""

from __future__ import annotations

import io

import structlog

from rabbitproxy import logs
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.logs import ConsoleLine


def test_keys_are_sorted_and_values_that_need_it_are_quoted() -> None:
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
        },
    )
    assert line == (
        "2026-11-26T06:00:00.000000Z [info     ] connection closed              bytes_in=3 client=127.0.0.1:5555 "
        "empty='' eq='a=b' none=None quote=\"it's\" reason='client closed'"
    )


def test_a_close_reason_is_written_as_its_text() -> None:
    # Reasons are a StrEnum; the line must read reason='client closed', as the one-string constants did.
    line = ConsoleLine()(None, "info", {"event": "connection closed", "reason": CloseReason.CLIENT_CLOSED})
    assert line.endswith("reason='client closed'")
    assert ConsoleLine()(None, "info", {"event": "x", "reason": CloseReason.LIMIT}).endswith("reason=limit")


def test_an_event_without_fields_has_no_padding() -> None:
    assert ConsoleLine()(None, "warning", {"level": "warning", "event": "plain"}) == "[warning  ] plain"


def test_setup_writes_lines_with_tracebacks_to_a_non_terminal_stream() -> None:
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
    lines = out.getvalue().splitlines()
    assert "hidden" not in out.getvalue()
    assert lines[0].endswith("[info     ] shown                          n=1")
    assert lines[1].endswith("[error    ] failed")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"

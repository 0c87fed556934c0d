"""structlog setup: JSON lines for machines, a coloured layout at a terminal, logfmt lines on request.

Both go to stderr so that stdout stays free for command output (``check-config``, ``status``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Whether info events are written. The data path checks this before building a connection's log event: at
# level warning the event would be dropped anyway, and building its fields costs more than relaying a short
# connection's bytes.
info_enabled = True

# How setup() left the output, for :class:`EventWriter`: the renderer ("console" or "json") and the descriptor of a
# stream that is not a terminal; None when events must go through structlog (a terminal, or a stream without one).
_direct: tuple[str, int] | None = None


# A value printed as is: printable, no space, and none of the characters logfmt quoting gives a meaning to. Anything
# else is written as a double-quoted string with JSON's escapes (\" \\ \n \t \u0001), which logfmt parsers (Loki,
# Vector, go-logfmt) read back, so a line splits into its key=value pairs unambiguously.
_PLAIN = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+\Z').match


def _value(value: Any) -> str:
    if isinstance(value, str):
        # str() turns a StrEnum member (a close reason) into its value; a plain str comes back as it is.
        text = str(value)
    elif value is True or value is False:
        return "true" if value else "false"
    elif value is None:
        # logfmt's empty value; an empty string is written "" instead.
        return ""
    elif isinstance(value, int | float):
        return repr(value)
    else:
        text = repr(value)
    if _PLAIN(text) and text.isprintable():
        return text
    quoted = json.dumps(text, ensure_ascii=False)
    if not quoted.isprintable():
        # DEL, C1 controls, line and paragraph separators: escaped too, or a reader splitting lines the way
        # str.splitlines() does would cut the event in two. Rare enough that the ASCII-only form is fine.
        quoted = json.dumps(text).replace("\x7f", "\\u007f")
    return quoted


class ConsoleLine:
    """One logfmt line per event: ``timestamp=... level=info event="connection closed" key=value ...``.

    What the log gets when it is not a terminal and ``format = "console"``: Loki's and Vector's logfmt parsers read
    every field of it, and it stays readable with ``less``. At info level the proxy writes one event per connection,
    and structlog's ``ConsoleRenderer`` took about a fifth of a short connection's CPU (bench/perf-notes.md, attempt
    13); this renders a line in a few microseconds. The timestamp, level and event come first, then the other keys
    sorted; a traceback (from ``format_exc_info``) is the last field, escaped onto the same line, so that no line of
    the log is anything but logfmt.
    """

    def __call__(self, logger: Any, name: str, event_dict: structlog.types.EventDict) -> str:
        timestamp = event_dict.pop("timestamp", None)
        level = event_dict.pop("level", "")
        event = event_dict.pop("event", "")
        exception = event_dict.pop("exception", None)
        stack = event_dict.pop("stack", None)
        parts = [f"timestamp={_value(timestamp)} " if timestamp is not None else "", f"level={_value(level)}"]
        parts.append(f" event={_value(event)}")
        for key in sorted(event_dict):
            parts.append(f" {key}={_value(event_dict[key])}")
        if stack:
            parts.append(f" stack={_value(stack)}")
        if exception:
            parts.append(f" exception={_value(exception)}")
        return "".join(parts)


def setup(level: str = "info", fmt: str = "console", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger, for aiohttp and asyncio messages)."""
    global info_enabled, _direct
    out = stream or sys.stderr
    numeric = _LEVELS.get(level, logging.INFO)
    info_enabled = numeric <= logging.INFO
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "auto":
        # Machines read what does not go to a terminal (journald, `docker logs`, a log shipper): JSON by default.
        fmt = "console" if out.isatty() else "json"
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    elif out.isatty():
        # A person at a terminal gets structlog's coloured, aligned layout; the volume there is small.
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        # Files, pipes, journald, `docker logs` when asked for: logfmt, rendered cheaply (see ConsoleLine).
        shared.append(structlog.processors.format_exc_info)
        renderer = ConsoleLine()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # WriteLogger: one write() and flush per line, without print()'s overhead.
        logger_factory=structlog.WriteLoggerFactory(out),
        # No caching: tests and reloads reconfigure logging, and module-level loggers must follow.
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(stream, max(numeric, logging.WARNING), shared, renderer)
    _direct = None
    if not isinstance(renderer, structlog.dev.ConsoleRenderer):
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            fd = -1  # io.StringIO and friends (tests): no descriptor, so structlog writes
        if fd >= 0:
            _direct = ("json" if fmt == "json" else "console", fd)


_CONSOLE_LINE = ConsoleLine()
# The handler setup() put on the root logger, replaced (not added to) by the next setup().
_stdlib_handler: logging.Handler | None = None


class _Stderr(logging.StreamHandler[TextIO]):
    """A handler on whatever ``sys.stderr`` is when a record comes (a test's capture may have replaced it since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _route_stdlib_logging(
    out: TextIO | None, level: int, shared: list[structlog.types.Processor], renderer: structlog.types.Processor
) -> None:
    """Render the standard library's records (aiohttp, asyncio) with the same renderer, so every line of the log
    has one format: a logfmt or JSON reader must not trip over ``WARNING asyncio: ...``.

    Only this module's own handler is swapped, and the root logger's level is left alone: pytest's capture
    handlers and anyone else's stay as they are.
    """
    global _stdlib_handler
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    handler = logging.StreamHandler(out) if out is not None else _Stderr()
    handler.setLevel(level)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # merge_contextvars is already in ``shared``; the record's logger name says who wrote it.
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root.addHandler(handler)
    _stdlib_handler = handler


# -- the per-connection event --------------------------------------------------------------------------------------

# The whole-second part of the timestamp, rebuilt once a second: formatting a datetime for every event cost more
# than the rest of the line.
_second = -1
_second_text = ""


def _timestamp(now: float) -> str:
    """``now`` (time.time()) as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
    global _second, _second_text
    whole = int(now)
    # Rounded to the microsecond as datetime.fromtimestamp() rounds, carrying into the next second.
    micro = round((now - whole) * 1_000_000)
    if micro >= 1_000_000:
        whole += 1
        micro -= 1_000_000
    if whole != _second:
        _second = whole
        _second_text = datetime.datetime.fromtimestamp(whole, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    # isoformat() leaves the fraction out when it is zero; so do we.
    return f"{_second_text}.{micro:06d}Z" if micro else f"{_second_text}Z"


class EventWriter:
    """Writes one info event that the data path emits per connection, at a fraction of structlog's cost.

    The ``connection closed`` event is written for every connection, and through structlog's bound logger,
    processor chain and ``WriteLogger`` it cost the proxy about a third of a short connection's CPU at level
    ``info`` (bench/perf-notes.md, attempt 15). When :func:`setup` chose a renderer this module owns (the plain
    console line or JSON) and the stream has a descriptor, this renders the same line itself (same keys, same
    order, same quoting; tests/unit/test_logs.py compares them) and hands it to the kernel with one ``os.write``:
    nothing waits in a user-space buffer, so a crash loses no line that was written. Otherwise (a terminal, a
    stream without a descriptor) it calls structlog as before.

    Bound fields and structlog's context variables (a worker's ``worker``) are taken when the writer is made, at
    service start, after the process has bound them.
    """

    __slots__ = ("bound", "event", "fd", "format", "logger")

    def __init__(self, logger: Any, event: str, **bound: Any) -> None:
        self.event = event
        self.logger = logger.bind(**bound)
        self.bound = {**structlog.contextvars.get_contextvars(), **bound}
        direct = _direct
        self.format = direct[0] if direct is not None else ""
        self.fd = direct[1] if direct is not None else -1

    def info(self, fields: dict[str, Any]) -> None:
        if self.fd < 0:
            self.logger.info(self.event, **fields)
            return
        # Key order as structlog's processors leave it: context and bound fields, the event's own, then event,
        # level and timestamp. The console line is ConsoleLine's, the renderer setup() gave structlog.
        data = {**self.bound, **fields, "event": self.event, "level": "info", "timestamp": _timestamp(time.time())}
        line = json.dumps(data) if self.format == "json" else _CONSOLE_LINE(None, "info", data)
        self._write((line + "\n").encode("utf-8", "backslashreplace"))

    def _write(self, out: bytes) -> None:
        view = memoryview(out)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            # The log's reader is gone (a closed pipe) or the disk is full: the connection's end must still be
            # accounted, and there is nowhere to say so.
            pass

"""structlog setup: a readable console format for people, JSON lines for machines.

Both go to stderr so that stdout stays free for command output (``check-config``, ``status``).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Whether info events are written. The data path checks this before building a connection's log event: at
# level warning the event would be dropped anyway, and building its fields costs more than relaying a short
# connection's bytes.
info_enabled = True


# A value printed as is; anything else (spaces, quotes, '=', empty) is printed as its repr, so a line splits back
# into key=value pairs unambiguously.
_PLAIN = re.compile(r"[^\s'\"=\\]+\Z").match


def _value(value: Any) -> str:
    if isinstance(value, str):
        # str() turns a StrEnum member (a close reason) into its value; a plain str comes back as it is.
        text = str(value)
        return text if _PLAIN(text) else repr(text)
    return repr(value)


class ConsoleLine:
    """``timestamp [level] event key=value ...``: structlog's console layout without colours or column padding.

    At info level the proxy writes one event per connection, and structlog's ``ConsoleRenderer`` took about a
    fifth of a short connection's CPU (bench/perf-notes.md, attempt 13); this renders the same information in a
    few microseconds. Keys are sorted, as there; tracebacks (from ``format_exc_info``) follow on their own lines.
    """

    def __call__(self, logger: Any, name: str, event_dict: structlog.types.EventDict) -> str:
        timestamp = event_dict.pop("timestamp", None)
        level = event_dict.pop("level", "")
        event = event_dict.pop("event", "")
        exception = event_dict.pop("exception", None)
        stack = event_dict.pop("stack", None)
        head = f"[{level:<9}] {event!s:<30}" if event_dict else f"[{level:<9}] {event}"
        parts = [f"{timestamp} " if timestamp is not None else "", head]
        for key in sorted(event_dict):
            parts.append(f" {key}={_value(event_dict[key])}")
        if stack:
            parts.append(f"\n{stack}")
        if exception:
            parts.append(f"\n{exception}")
        return "".join(parts)


def setup(level: str = "info", fmt: str = "console", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger, for aiohttp and asyncio messages)."""
    global info_enabled
    out = stream or sys.stderr
    numeric = _LEVELS.get(level, logging.INFO)
    info_enabled = numeric <= logging.INFO
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    elif out.isatty():
        # A person at a terminal gets structlog's coloured, aligned layout; the volume there is small.
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        # Files, pipes, journald, `docker logs`: the same content, rendered cheaply (see ConsoleLine).
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
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=out, format="%(levelname)s %(name)s: %(message)s"
    )

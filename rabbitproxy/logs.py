"""structlog setup: a readable console format for people, JSON lines for machines.

Both go to stderr so that stdout stays free for command output (``check-config``, ``status``).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Whether info events are written. The data path checks this before building a connection's log event: at
# level warning the event would be dropped anyway, and building its fields costs more than relaying a short
# connection's bytes.
info_enabled = True


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
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        # No caching: tests and reloads reconfigure logging, and module-level loggers must follow.
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=out, format="%(levelname)s %(name)s: %(message)s"
    )

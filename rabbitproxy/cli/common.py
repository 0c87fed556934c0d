"""What the commands share: the config-error exit, the event loop choice, the default config path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer

from rabbitproxy.addresses import DEFAULT_CONFIG_FILE

if TYPE_CHECKING:
    from rabbitproxy.config import ConfigError

EXIT_CONFIG = 2

LoopName = Literal["uvloop", "asyncio"]


def run_loop(main: Any, loop: str) -> Any:
    """Run a coroutine on uvloop (default) or the stdlib asyncio loop."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            typer.echo("uvloop is not installed; use --loop asyncio", err=True)
            raise typer.Exit(EXIT_CONFIG) from None
        return uvloop.run(main)
    import asyncio

    return asyncio.run(main)


def fail_config(exc: ConfigError) -> None:
    typer.echo(str(exc), err=True)
    raise typer.Exit(EXIT_CONFIG)


# The container image's CMD always names this file, so one image serves both a mounted config and plain env vars.
DEFAULT_CONFIG_PATH = Path(DEFAULT_CONFIG_FILE)

"""The ``rabbitproxy`` commands (typer), assembled into one application. Options only override configuration; the
work happens elsewhere.

The console script enters through :func:`rabbitproxy.cli.main`, which answers ``healthcheck`` and ``--version``
without this module. The commands live by job in :mod:`rabbitproxy.cli.serve` (serve, check-config, demo),
:mod:`rabbitproxy.cli.admin` (healthcheck and the admin API commands), :mod:`rabbitproxy.cli.keepalived` and
:mod:`rabbitproxy.cli.agent`; they import lazily: pydantic (``rabbitproxy.config``) and asyncio load inside the
commands that use them, so ``rabbitproxy --help`` pays for typer alone.
"""

from __future__ import annotations

from typing import Annotated

import typer

from rabbitproxy import __version__
from rabbitproxy.cli.admin import (
    backend_app,
    connections_app,
    healthcheck,
    parse_duration,
    reload,
    status,
)
from rabbitproxy.cli.agent import agent
from rabbitproxy.cli.common import DEFAULT_CONFIG_PATH, EXIT_CONFIG, run_loop
from rabbitproxy.cli.keepalived import keepalived_config
from rabbitproxy.cli.migrate import convert_haproxy
from rabbitproxy.cli.serve import build_config, check_config, config_or_env, demo, serve

# Names that tests and ``rabbitproxy.cli.__getattr__`` reach through this module.
__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EXIT_CONFIG",
    "app",
    "build_config",
    "config_or_env",
    "parse_duration",
    "run_loop",
]

app = typer.Typer(
    help="rabbitproxy: a layer-7 load balancer for RabbitMQ clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rabbitproxy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """rabbitproxy: a layer-7 load balancer for RabbitMQ clusters."""


# The order here is the order of `rabbitproxy --help`.
app.command()(serve)
app.command()(healthcheck)
app.command("check-config")(check_config)
app.command("keepalived-config")(keepalived_config)
app.command("convert-haproxy")(convert_haproxy)
app.command()(demo)
app.command()(status)
app.command()(reload)
app.command()(agent)
app.add_typer(backend_app, name="backend")
app.add_typer(connections_app, name="connections")

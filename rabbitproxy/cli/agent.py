"""``agent``: run a feedback agent (Loadbalancer.org format) on a RabbitMQ host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rabbitproxy.addresses import split_host_port
from rabbitproxy.cli.common import fail_config, run_loop


def agent(
    listen: Annotated[str, typer.Option(help="Where to answer polls, host:port.")] = "0.0.0.0:3333",
    http: Annotated[
        bool, typer.Option("--http", help="Answer HTTP GET with the integer instead of a TCP line.")
    ] = False,
    metric: Annotated[str, typer.Option(help="cpu (idle CPU), memory (free RAM) or max (the busier of both).")] = "cpu",
    state_file: Annotated[
        Path | None, typer.Option(help="File holding one word, drain, maint or ready, that overrides the figure.")
    ] = None,
    rabbitmq: Annotated[
        str | None, typer.Option(help="Management API URL of the local node, e.g. http://guest:guest@127.0.0.1:15672/.")
    ] = None,
    window: Annotated[float, typer.Option(help="Seconds the CPU figure is averaged over.", min=1.0)] = 5.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    loop: Annotated[str, typer.Option(help="Event loop: uvloop or asyncio.")] = "uvloop",
) -> None:
    """Run a feedback agent (Loadbalancer.org format) on a RabbitMQ host."""
    from rabbitproxy import logs
    from rabbitproxy.agent.server import Agent, serve_agent
    from rabbitproxy.config import ConfigError

    problems = []
    if metric not in ("cpu", "memory", "max"):
        problems.append(f"--metric: {metric!r} is not one of cpu, memory, max")
    if rabbitmq is not None and not rabbitmq.startswith(("http://", "https://")):
        problems.append(f"--rabbitmq: {rabbitmq!r} must start with http:// or https://")
    try:
        split_host_port(listen)
    except ValueError as exc:
        problems.append(f"--listen: {exc}")
    if loop not in ("uvloop", "asyncio"):
        problems.append(f"--loop: {loop!r} is not one of uvloop, asyncio")
    if problems:
        fail_config(ConfigError(problems, "command line"))
    logs.setup(log_level, "console")
    the_agent = Agent(metric=metric, state_file=state_file, rabbitmq=rabbitmq, window=window, http=http)  # type: ignore[arg-type]

    async def main() -> None:
        import asyncio

        from rabbitproxy.app import install_signal_handlers

        stop = asyncio.Event()
        install_signal_handlers(asyncio.get_running_loop(), stop, None)
        await serve_agent(the_agent, listen, shutdown_trigger=stop.wait)

    try:
        run_loop(main(), loop)
    except OSError as exc:
        typer.echo(f"cannot listen on {listen}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass

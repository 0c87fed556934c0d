"""``rabbitproxy convert-haproxy``: print a rabbitproxy configuration for an HAProxy one (docs/migrating.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rabbitproxy.cli.common import EXIT_CONFIG


def convert_haproxy(
    haproxy_cfg: Annotated[Path, typer.Argument(help="The HAProxy configuration file (haproxy.cfg).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the TOML here instead of to stdout.")
    ] = None,
) -> None:
    """Convert HAProxy's TCP-mode listen and frontend+backend sections to a rabbitproxy TOML configuration.

    Unconverted directives are named on stderr as FILE:LINE; exit 2 if nothing converts or the result is invalid.
    """
    # HTTP-mode and stats sections are skipped with a warning. A result that does not validate is still written,
    # for editing: the error names the key (docs/migrating.md).
    import tomllib

    from rabbitproxy import config as config_mod
    from rabbitproxy.migrate.convert import convert

    try:
        data = haproxy_cfg.read_bytes()
    except OSError as exc:
        typer.echo(f"{haproxy_cfg}: cannot read the file: {exc.strerror or exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        typer.echo(f"{haproxy_cfg}: not UTF-8 at byte {exc.start}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    result = convert(text, str(haproxy_cfg))
    for warning in result.warnings:
        typer.echo(warning, err=True)
    if not result.services:
        typer.echo(f"{haproxy_cfg}: no TCP-mode listen or frontend+backend section to convert", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if output is None:
        typer.echo(result.toml, nl=False)
    else:
        output.write_text(result.toml)
    try:
        config_mod.validate(tomllib.loads(result.toml), str(output or "the converted configuration"))
    except config_mod.ConfigError as exc:
        typer.echo(f"{exc}\n(edit the values named above; the rest converted as shown)", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    typer.echo(f"converted {result.services} service(s); check with: rabbitproxy check-config FILE", err=True)

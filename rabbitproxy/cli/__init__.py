"""The ``rabbitproxy`` console script: a small dispatcher in front of the typer application.

``rabbitproxy healthcheck`` is what a container ``HEALTHCHECK`` and a keepalived ``track_script`` run every one to
ten seconds, so it must not pay for imports it does not use: typer, pydantic and asyncio alone cost a few hundred
milliseconds of CPU per run. ``main()`` therefore answers ``healthcheck`` (in the plain forms the typer command
accepts) and ``--version`` with the standard library only, and loads the typer application from
:mod:`rabbitproxy.cli.commands` for everything else. Anything this module does not fully understand, including
``healthcheck --help`` and every malformed command line, goes to typer, so help texts, usage errors and exit codes
stay typer's.

This module must keep importing nothing but the standard library and :mod:`rabbitproxy.admin.probe`;
tests/integration/test_probe_cost.py runs the probe in a fresh interpreter and checks ``sys.modules``.
"""

from __future__ import annotations

import os
import sys

# Not ``typing.TYPE_CHECKING``: importing typing costs the probe a few milliseconds; mypy honours the name anyway.
# collections.abc and pathlib are only annotations here, and each would cost the probe about as much as typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

# The healthcheck options the fast path understands, as the typer command in cli/admin.py declares them; a unit
# test compares the two sets, so an option added there is not silently ignored here.
_VALUE_OPTIONS = {"--admin": "admin", "--config": "config", "-c": "config", "--timeout": "timeout"}
_FLAG_OPTIONS = {"--quiet": "quiet", "-q": "quiet"}
# Typer's ``min=0.1`` on --timeout; a smaller value is refused there with a usage error.
MIN_TIMEOUT = 0.1


class HealthcheckArgs:
    """The parsed ``healthcheck`` options, after the environment defaults typer would also apply."""

    __slots__ = ("admin", "config", "quiet", "timeout")

    def __init__(self, admin: str | None, config: str | None, timeout: float, quiet: bool) -> None:
        self.admin = admin
        self.config = config
        self.timeout = timeout
        self.quiet = quiet


def parse_healthcheck(args: Sequence[str], env: Mapping[str, str]) -> HealthcheckArgs | None:
    """Parse ``healthcheck``'s options the way typer (click) would, or return None to let typer do it.

    None is the answer for anything outside the plain forms: ``--help``, unknown options, stray arguments, a
    missing value, bundled short flags (``-qc``), a timeout typer would refuse. Values are taken as click takes
    them: the next argument, whatever it looks like, or the text after ``=`` on a long option.
    """
    values: dict[str, str] = {}
    quiet = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name, eq, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _FLAG_OPTIONS and not eq:
            quiet = True
        elif name in _VALUE_OPTIONS:
            if eq:
                values[_VALUE_OPTIONS[name]] = attached
            elif i < len(args):
                values[_VALUE_OPTIONS[name]] = args[i]
                i += 1
            else:
                return None
        else:
            return None
    try:
        timeout = float(values.get("timeout", "3.0"))
    except ValueError:
        return None
    if not timeout >= MIN_TIMEOUT:
        # Typer refuses a small timeout with a usage error; NaN lands here too, and typer decides about it.
        return None
    # An empty variable counts as unset, as in click.
    admin = values.get("admin", env.get("RABBITPROXY_ADMIN") or None)
    # The path as given, not a Path: pathlib is not free to import, and probe.run takes either.
    config = values.get("config", env.get("RABBITPROXY_CONFIG") or None)
    return HealthcheckArgs(admin, config, timeout, quiet)


def healthcheck(args: HealthcheckArgs, env: Mapping[str, str]) -> int:
    """Run the probe, print its outcome as the typer command does, and return the exit status."""
    from rabbitproxy.admin.probe import run

    outcome = run(args.admin, args.config, args.timeout, args.quiet, env)
    if outcome.message:
        stream = sys.stderr if outcome.to_stderr else sys.stdout
        stream.write(outcome.message + "\n")
        stream.flush()
    return outcome.code


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args == ["--version"]:
            from rabbitproxy import __version__

            sys.stdout.write(f"rabbitproxy {__version__}\n")
            return
        if args[:1] == ["healthcheck"]:
            parsed = parse_healthcheck(args[1:], os.environ)
            if parsed is not None:
                sys.exit(healthcheck(parsed, os.environ))
        from rabbitproxy.cli.commands import app

        app(args=args)
    except KeyboardInterrupt:
        sys.exit(130)


def __getattr__(name: str) -> Any:
    # ``rabbitproxy.cli`` was one module until the dispatcher was split off; its names (``app``, ``build_config``,
    # ...) still resolve here, loading the typer application only when one of them is asked for.
    if name.startswith("__"):
        raise AttributeError(name)
    from importlib import import_module

    # import_module, not ``from rabbitproxy.cli import commands``, which would look the name up here first and recurse.
    commands = import_module("rabbitproxy.cli.commands")
    try:
        return getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module 'rabbitproxy.cli' has no attribute {name!r}") from None

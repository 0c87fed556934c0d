"""The commands that talk to a running proxy's admin API: healthcheck, status, backend, reload, connections."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from rabbitproxy.cli.common import DEFAULT_CONFIG_PATH, fail_config


def healthcheck(
    admin: Annotated[
        str | None,
        typer.Option(
            help="Admin API URL or host:port [default: the config file's admin.listen, else "
            "RABBITPROXY_ADMIN_LISTEN, else 127.0.0.1:9080].",
            envvar="RABBITPROXY_ADMIN",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help=f"Read admin.listen from this file [default: {DEFAULT_CONFIG_PATH} when it exists].",
            envvar="RABBITPROXY_CONFIG",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.", min=0.1)] = 3.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; only the exit code.")] = False,
) -> None:
    """Exit 0 when the proxy's admin /healthz answers 200 {"status": "ok"}, 1 otherwise (for probes)."""
    # rabbitproxy.cli.main answers the usual forms of this command before typer loads; this body serves the rest
    # (and CliRunner), with the same implementation.
    from rabbitproxy.admin.probe import run

    outcome = run(admin, config, timeout, quiet, os.environ)
    if outcome.message:
        typer.echo(outcome.message, err=outcome.to_stderr)
    raise typer.Exit(outcome.code)


AdminUrl = Annotated[
    str,
    typer.Option(
        "--admin",
        help="Admin API URL (http://host:port), or unix:PATH for the admin socket (\\[admin] socket).",
        envvar="RABBITPROXY_ADMIN",
        show_envvar=True,
    ),
]
ADMIN_DEFAULT = "http://127.0.0.1:9080"
AdminToken = Annotated[
    str | None,
    typer.Option("--token", help="Admin API bearer token.", envvar="RABBITPROXY_ADMIN_TOKEN", show_envvar=True),
]
EXIT_ADMIN = 1

backend_app = typer.Typer(
    help=(
        "Change a backend at runtime: drain (optionally with a deadline), maint, ready, weight. With "
        "\\[services.rabbitmq] configured, connections are closed through the broker (clients get 320 "
        "CONNECTION_FORCED with the reason) at close_rate, and drain/maint first ask the node whether it is "
        "quorum-critical (refused with HTTP 409 unless --force)."
    ),
    no_args_is_help=True,
)


def _admin_call(admin: str, token: str | None, call: Any) -> Any:
    """Run ``call(client)``; turn any admin API failure into a message on stderr and exit status 1."""
    from rabbitproxy.admin.client import AdminClient, AdminError

    try:
        return call(AdminClient(admin, token))
    except AdminError as exc:
        typer.echo(f"error: {exc}", err=True)
        for line in exc.errors:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(EXIT_ADMIN) from None


def status(admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """Show every service and backend of a running proxy: state, weights, agent, connections, traffic."""
    from rabbitproxy.admin.client import print_status

    data = _admin_call(admin, token, lambda c: c.services())
    print_status(data)


def parse_duration(text: str) -> float:
    """Seconds from ``300``, ``90s``, ``5m``, ``1.5h`` (the config file's grammar), above 0; else ValueError."""
    from rabbitproxy.durations import parse_duration as parse

    seconds = parse(text)
    if not seconds > 0:
        raise ValueError(f"{text!r}: the duration must be more than 0")
    return seconds


def _set_state(
    state: str,
    service: str,
    backend: str,
    admin: str,
    token: str | None,
    *,
    deadline: float | None = None,
    force: bool = False,
) -> None:
    result = _admin_call(
        admin, token, lambda c: c.set_backend(service, backend, state=state, deadline=deadline, force=force)
    )
    closed = result.get("closed_connections", 0)
    extra = f", {closed} connection(s) closed" if closed else ""
    closing = result.get("closing_through_broker")
    if closing:
        extra += f", closing {closing} connection(s) through the broker"
    if result.get("deadline") is not None:
        extra += f", the rest closed through the broker in {result['deadline']:g} s"
    typer.echo(
        f"{service}/{backend}: {result['status']} (operator state {result['operator_state']}, "
        f"{result['connections']['active']} active connection(s){extra})"
    )


Force = Annotated[
    bool, typer.Option("--force", help="Go ahead even if the node is quorum-critical (or cannot be asked).")
]


@backend_app.command("drain")
def backend_drain(
    service: str,
    backend: str,
    deadline: Annotated[
        str | None,
        typer.Option(
            help="Close the connections still open after this long (300, 90s, 5m, 1h), through the broker "
            "when \\[services.rabbitmq] is configured, else by TCP."
        ),
    ] = None,
    force: Force = False,
    admin: AdminUrl = ADMIN_DEFAULT,
    token: AdminToken = None,
) -> None:
    """No new connections to BACKEND; the open ones stay until their clients leave (or the deadline passes)."""
    from rabbitproxy.config import ConfigError

    seconds = None
    if deadline is not None:
        try:
            seconds = parse_duration(deadline)
        except ValueError as exc:
            fail_config(ConfigError([f"--deadline: {exc}"], "command line"))
    _set_state("drain", service, backend, admin, token, deadline=seconds, force=force)


@backend_app.command("maint")
def backend_maint(
    service: str, backend: str, force: Force = False, admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None
) -> None:
    """Halt BACKEND: no new connections; its open connections are closed now (through the broker, at close_rate,
    when \\[services.rabbitmq] is configured)."""
    _set_state("maint", service, backend, admin, token, force=force)


@backend_app.command("ready")
def backend_ready(service: str, backend: str, admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """Bring BACKEND back online (it still has to pass its health check)."""
    _set_state("ready", service, backend, admin, token)


@backend_app.command("weight")
def backend_weight(
    service: str,
    backend: str,
    weight: Annotated[int, typer.Argument(help="New weight, 0 to 1000.", min=0, max=1000)],
    admin: AdminUrl = ADMIN_DEFAULT,
    token: AdminToken = None,
) -> None:
    """Set BACKEND's weight; it survives reloads (and restarts, with \\[admin] state_file) until `backend reset`,
    or until the file's weight for BACKEND is edited."""
    result = _admin_call(admin, token, lambda c: c.set_backend(service, backend, weight=weight))
    typer.echo(f"{service}/{backend}: weight {result['weight']}, effective {result['effective_weight']}")


@backend_app.command("reset")
def backend_reset(service: str, backend: str, admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """Drop BACKEND's runtime weight: the configuration file's weight applies again."""
    result = _admin_call(admin, token, lambda c: c.reset_backend(service, backend))
    weights = f"weight {result['weight']} from the configuration, effective {result['effective_weight']}"
    typer.echo(f"{service}/{backend}: {weights}")


def reload(admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """Make the running proxy re-read its configuration file and wait for the outcome (like SIGHUP, but with it shown).

    Exits 1 with the reasons when the proxy refused the file (a bad key, a port taken, a bad certificate) or a
    worker kept the old configuration: what systemd's ExecReload needs to fail a "systemctl reload"."""
    result = _admin_call(admin, token, lambda c: c.reload())
    typer.echo("reloaded:")
    for key in ("added", "removed", "changed", "unchanged"):
        names = result.get(key) or []
        typer.echo(f"  {key}: {', '.join(names) if names else '-'}")


connections_app = typer.Typer(invoke_without_command=True)


@connections_app.callback()
def connections_list(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Option(help="Only this service's connections.")] = None,
    backend: Annotated[str | None, typer.Option(help="Only connections to this backend (its name).")] = None,
    user: Annotated[str | None, typer.Option(help="Only this AMQP user.")] = None,
    vhost: Annotated[str | None, typer.Option(help="Only this vhost.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Only connections whose connection_name contains this (any case).")
    ] = None,
    sort: Annotated[str, typer.Option(help="age, bytes_in, bytes_out or idle.")] = "age",
    asc: Annotated[bool, typer.Option("--asc", help="Youngest, smallest, least idle first.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many (1 to 1000).", min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many (the next page).", min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    admin: AdminUrl = ADMIN_DEFAULT,
    token: AdminToken = None,
) -> None:
    """List the open connections of a running proxy, or close one with `connections close ID`.

    Each with its client, backend, AMQP user, vhost and connection name, age, idle time and bytes both ways;
    the oldest first unless --sort says otherwise (bytes_in or bytes_out finds the busiest clients).
    """
    if ctx.invoked_subcommand is not None:
        return
    import json

    from rabbitproxy.admin.client import print_connections

    data = _admin_call(
        admin,
        token,
        lambda c: c.connections(
            service=service,
            backend=backend,
            user=user,
            vhost=vhost,
            name=name,
            sort=sort,
            order="asc" if asc else "desc",
            limit=limit,
            offset=offset,
        ),
    )
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        print_connections(data)


@connections_app.command("close")
def connections_close(
    conn_id: Annotated[int, typer.Argument(metavar="ID", help="The connection's id (from `rabbitproxy connections`).")],
    reason: Annotated[
        str | None,
        typer.Option(help="Why, at most 200 characters: logged, and shown to the client when closed by the broker."),
    ] = None,
    admin: AdminUrl = ADMIN_DEFAULT,
    token: AdminToken = None,
) -> None:
    """Close one connection by its ID, through the broker when the service has a rabbitmq table.

    Through the broker the client gets connection.close 320 CONNECTION_FORCED with the reason, which client
    libraries log and answer with a clean reconnect; without it (or if the broker does not know the connection)
    it is closed by TCP.
    """
    result = _admin_call(admin, token, lambda c: c.close_connection(conn_id, reason))
    how = {
        "broker": f"through the broker ({result['detail']}): the client got 320 CONNECTION_FORCED",
        "tcp": f"by TCP ({result['detail']})",
        "ended": "it ended by itself meanwhile",
    }.get(result["via"], result["via"])
    typer.echo(f"connection {result['id']} of {result['service']} closed {how}; reason: {result['reason']}")

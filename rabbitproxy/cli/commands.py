"""The ``rabbitproxy`` commands (typer). Options only override configuration; the work happens elsewhere.

The console script enters through :func:`rabbitproxy.cli.main`, which answers ``healthcheck`` and ``--version``
without this module. What is left here still imports lazily: pydantic (``rabbitproxy.config``) and asyncio load
inside the commands that use them, so ``rabbitproxy --help`` pays for typer alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from rabbitproxy import __version__
from rabbitproxy.addresses import DEFAULT_CONFIG_FILE, format_host_port, split_host_port

if TYPE_CHECKING:
    from rabbitproxy.config import Config, ConfigError

app = typer.Typer(
    help="rabbitproxy: a layer-7 load balancer for RabbitMQ clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_CONFIG = 2

LoopName = Literal["uvloop", "asyncio"]


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


def build_config(
    config_file: Path | None,
    listen: str | None,
    backends: list[str] | None,
    overrides: dict[str, Any],
    env: dict[str, str] | None = None,
    service_overrides: dict[str, Any] | None = None,
) -> Config:
    """Combine a config file (or the environment, or flags alone) with the flags actually given."""
    from rabbitproxy import config as config_mod
    from rabbitproxy.config import ConfigError

    data: dict[str, Any]
    source = str(config_file) if config_file else "command line"
    if config_file is not None:
        base = config_mod.load(config_file)
        data = base.model_dump(exclude_unset=True)
    else:
        try:
            data = config_mod.from_env(env if env is not None else dict(os.environ)) or {}
        except ValueError as exc:
            raise ConfigError([f"RABBITPROXY_BACKENDS: {exc}"], "environment") from None
        if not data and not backends:
            raise ConfigError(
                ["give --config FILE, or --backend (and --listen), or RABBITPROXY_BACKENDS"], source
            )
        data.setdefault("services", [{"name": "amqp", "backends": []}])
    if listen is not None or backends:
        services = data.get("services", [])
        if len(services) != 1:
            raise ConfigError(["--listen/--backend need a configuration with exactly one service"], source)
        service = dict(services[0])
        if listen is not None:
            service["listen"] = listen
        if backends:
            try:
                service["backends"] = [config_mod.parse_backend_spec(s, i) for i, s in enumerate(backends)]
            except ValueError as exc:
                raise ConfigError([f"--backend: {exc}"], source) from None
        data["services"] = [service]
    if service_overrides:
        data["services"] = [dict(s) | service_overrides for s in data.get("services", [])]
    data = config_mod.with_overrides(data, overrides)
    return config_mod.validate(data, source)


def _fail_config(exc: ConfigError) -> None:
    typer.echo(str(exc), err=True)
    raise typer.Exit(EXIT_CONFIG)


# The container image's CMD always names this file, so one image serves both a mounted config and plain env vars.
DEFAULT_CONFIG_PATH = Path(DEFAULT_CONFIG_FILE)


def config_or_env(config: Path | None, env: dict[str, str]) -> Path | None:
    """The config file to load, or None to build the configuration from the environment.

    Only the default path may be missing, and only when ``RABBITPROXY_BACKENDS`` is set: any other missing file is
    an error, so a typo in ``--config`` is never papered over by stray environment variables.
    """
    if config == DEFAULT_CONFIG_PATH and not config.exists() and env.get("RABBITPROXY_BACKENDS", "").strip():
        return None
    return config


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML configuration file.", envvar="RABBITPROXY_CONFIG"),
    ] = None,
    listen: Annotated[str | None, typer.Option(help="Listen address of the one service, host:port.")] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(help="Backend as host[:port][=weight]; repeat for each. Replaces the file's backends."),
    ] = None,
    health_check: Annotated[
        str | None, typer.Option(help="Health check type for the one service: amqp, tcp, http or none.")
    ] = None,
    admin_listen: Annotated[str | None, typer.Option(help="Admin API address, host:port.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="console or json.")] = None,
    loop: Annotated[str, typer.Option(help="Event loop: uvloop or asyncio.")] = "uvloop",
) -> None:
    """Run the load balancer."""
    from rabbitproxy import logs
    from rabbitproxy.app import serve as serve_main
    from rabbitproxy.config import ConfigError

    overrides: dict[str, Any] = {}
    if admin_listen is not None:
        overrides["admin.listen"] = admin_listen
    if log_level is not None:
        overrides["log.level"] = log_level
    if log_format is not None:
        overrides["log.format"] = log_format
    if loop not in ("uvloop", "asyncio"):
        _fail_config(ConfigError([f"--loop: {loop!r} is not one of uvloop, asyncio"]))
    config = config_or_env(config, dict(os.environ))
    try:
        per_service = {"health_check": {"type": health_check}} if health_check is not None else None
        cfg = build_config(config, listen, backend, overrides, service_overrides=per_service)
    except ConfigError as exc:
        _fail_config(exc)
        return
    logs.setup(cfg.log.level, cfg.log.format)
    try:
        run_loop(serve_main(cfg, config_path=config.resolve() if config else None), loop)
    except ConfigError as exc:
        _fail_config(exc)
    except KeyboardInterrupt:
        pass


@app.command()
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


@app.command("check-config")
def check_config(config: Annotated[Path, typer.Argument(help="TOML configuration file.")]) -> None:
    """Validate a configuration file: exit 0 with a summary, or 2 naming each bad key and why."""
    from rabbitproxy import config as config_mod
    from rabbitproxy.config import ConfigError

    try:
        cfg = config_mod.load(config)
    except ConfigError as exc:
        _fail_config(exc)
        return
    typer.echo(f"{config}: OK")
    typer.echo(f"admin: {cfg.admin.listen if cfg.admin.enabled else 'disabled'}")
    for s in cfg.services:
        typer.echo(
            f"service {s.name}: listen {s.listen}, {s.balance}, health check {s.health_check.type}, "
            f"feedback {s.feedback.type}, {len(s.backends)} backend(s)"
        )
        for b in s.backends:
            extra = " backup" if b.backup else ""
            typer.echo(
                f"  {b.name}: {format_host_port(b.address, s.backend_port(b))} weight {b.weight}{extra}"
            )


def _default_rabbitproxy() -> str:
    """This executable: its path when run as ``rabbitproxy``, else the one beside this Python (a venv), else PATH's."""
    import shutil
    import sys

    argv0 = Path(sys.argv[0])
    if argv0.name == "rabbitproxy" and argv0.exists():
        return str(argv0.absolute())
    beside = Path(sys.executable).parent / "rabbitproxy"
    if beside.exists():
        return str(beside)
    found = shutil.which("rabbitproxy")
    return str(Path(found).absolute()) if found else "/usr/local/bin/rabbitproxy"


@app.command("keepalived-config")
def keepalived_config(
    vip: Annotated[str, typer.Option(help="The floating address with its prefix, e.g. 10.0.0.100/24.")],
    interface: Annotated[str, typer.Option(help="The interface that carries the VIP and the VRRP adverts.")],
    peer: Annotated[list[str], typer.Option(help="The other proxy's own address (repeat for more).")],
    priority: Annotated[int, typer.Option(help="1..254; the higher side wins the first election.")],
    router_id: Annotated[
        int, typer.Option(help="virtual_router_id, 1..255: the same on both sides, unique per LAN.")
    ] = 51,
    password: Annotated[str | None, typer.Option(help="VRRP PASS authentication, up to 8 characters.")] = None,
    preempt: Annotated[
        bool, typer.Option("--preempt", help="Let the higher priority take the VIP back when it returns.")
    ] = False,
    source: Annotated[
        str | None, typer.Option(help="unicast_src_ip: this host's address [default: the interface's].")
    ] = None,
    instance: Annotated[str, typer.Option(help="vrrp_instance name.")] = "rabbitproxy",
    check_interval: Annotated[int, typer.Option(help="Seconds between health probes.")] = 1,
    check_timeout: Annotated[
        int, typer.Option(help="Seconds before keepalived kills a probe (long: a slow probe is not a dead proxy).")
    ] = 30,
    probe_timeout: Annotated[float, typer.Option(help="Seconds the probe waits for /healthz.")] = 2.0,
    fall: Annotated[int, typer.Option(help="Failed probes in a row that give up the VIP.")] = 1,
    rise: Annotated[int, typer.Option(help="Good probes in a row before this side may hold the VIP again.")] = 2,
    advert_interval: Annotated[int, typer.Option(help="Seconds between VRRP adverts.")] = 1,
    rabbitproxy: Annotated[
        str | None, typer.Option(help="Absolute path of the rabbitproxy executable [default: this one].")
    ] = None,
    admin: Annotated[str | None, typer.Option(help="Admin address for the probe (healthcheck --admin).")] = None,
    config: Annotated[str | None, typer.Option(help="Config file for the probe (healthcheck --config).")] = None,
    script_user: Annotated[str, typer.Option(help="User keepalived runs the probe and notify as.")] = "root",
    health_file: Annotated[
        str | None,
        typer.Option(help="The proxy's [admin] health_file: give up the VIP the moment it says 1 (track_file)."),
    ] = None,
    notify: Annotated[
        str, typer.Option(help='Command run on each transition (keepalived appends the state); "" for none.')
    ] = "/usr/bin/logger -t rabbitproxy-vrrp",
) -> None:
    """Print a keepalived.conf for one side of a highly available pair (VRRP, unicast, no preemption by default)."""
    from rabbitproxy.admin.keepalived import KeepalivedSide, render
    from rabbitproxy.config import ConfigError

    side = KeepalivedSide(
        vip=vip,
        interface=interface,
        peers=peer,
        priority=priority,
        router_id=router_id,
        password=password,
        preempt=preempt,
        source=source,
        instance=instance,
        advert_interval=advert_interval,
        check_interval=check_interval,
        check_timeout=check_timeout,
        probe_timeout=probe_timeout,
        fall=fall,
        rise=rise,
        rabbitproxy=rabbitproxy if rabbitproxy is not None else _default_rabbitproxy(),
        admin=admin,
        config=config,
        script_user=script_user,
        health_file=health_file,
        notify=notify or None,
    )
    try:
        text = render(side)
    except ValueError as exc:
        _fail_config(ConfigError(str(exc).splitlines(), "command line"))
        return
    if not os.access(side.rabbitproxy, os.X_OK):
        # keepalived would only log "Disabling track script ... not found" and then hold the VIP whatever the proxy's
        # health: refuse rather than print a configuration that checks nothing.
        _fail_config(
            ConfigError(
                [f"--rabbitproxy: {side.rabbitproxy} is not an executable here; give the path of rabbitproxy"],
                "command line",
            )
        )
        return
    typer.echo(text, nl=False)


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(help="Number of RabbitMQ nodes.", min=1, max=9)] = 3,
    listen: Annotated[str, typer.Option(help="Where the proxy listens.")] = "127.0.0.1:5673",
    admin_listen: Annotated[str, typer.Option(help="Admin API address.")] = "127.0.0.1:9080",
    loop: Annotated[str, typer.Option(help="Event loop: uvloop or asyncio.")] = "uvloop",
    rabbitmq: Annotated[
        str,
        typer.Option(
            help="RabbitMQ release: 'system' (this host's rabbitmq-server package) or '4.0' (Debian 13's, run from"
            " a cached chroot that is built on first use; needs root and debootstrap)."
        ),
    ] = "system",
) -> None:
    """Start a local RabbitMQ cluster and a proxy in front of it; Ctrl-C stops both."""
    from rabbitproxy import config as config_mod
    from rabbitproxy import logs
    from rabbitproxy.app import serve as serve_main
    from rabbitproxy.config import ConfigError
    from rabbitproxy.dev.cluster import RELEASES, DevCluster, RabbitMQNotInstalled

    if rabbitmq not in RELEASES:
        typer.echo(f"--rabbitmq: {rabbitmq!r} is not one of {', '.join(RELEASES)}", err=True)
        raise typer.Exit(2)
    logs.setup("info", "console")
    cluster = DevCluster(nodes, release=rabbitmq, log=lambda line: typer.echo(f"[cluster] {line}", err=True))
    try:
        cluster.start()
    except RabbitMQNotInstalled as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    try:
        data = {
            "admin": {"listen": admin_listen},
            "services": [
                {
                    "name": "amqp",
                    "listen": listen,
                    "backends": [
                        {"name": f"rabbit{i + 1}", "address": "127.0.0.1", "port": n.amqp_port}
                        for i, n in enumerate(cluster.nodes)
                    ],
                }
            ],
        }
        try:
            cfg = config_mod.validate(data, "demo")
        except ConfigError as exc:
            _fail_config(exc)
            return
        host, port = split_host_port(listen)
        typer.echo("", err=True)
        typer.echo(f"rabbitproxy demo: {nodes} RabbitMQ node(s) behind the proxy", err=True)
        typer.echo(f"  AMQP through the proxy:  amqp://guest:guest@{host}:{port}/", err=True)
        typer.echo(f"  admin API and overview:  http://{admin_listen}/", err=True)
        for n in cluster.nodes:
            typer.echo(f"  {n.name}: amqp {n.amqp_port}, management http://127.0.0.1:{n.management_port}/", err=True)
        typer.echo("Press Ctrl-C to stop the proxy and the cluster.", err=True)
        try:
            run_loop(serve_main(cfg), loop)
        except KeyboardInterrupt:
            pass
        except ConfigError as exc:
            _fail_config(exc)
    finally:
        typer.echo("stopping the cluster...", err=True)
        cluster.stop()


# -- admin API commands: status, backend, reload, connections ------------------------------------------------------

AdminUrl = Annotated[str, typer.Option("--admin", help="Admin API URL.", envvar="RABBITPROXY_ADMIN", show_envvar=True)]
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
app.add_typer(backend_app, name="backend")


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


@app.command()
def status(admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """Show every service and backend of a running proxy: state, weights, agent, connections, traffic."""
    from rabbitproxy.admin.client import print_status

    data = _admin_call(admin, token, lambda c: c.services())
    print_status(data)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``300``, ``90s``, ``5m``, ``1.5h``; ValueError naming the problem otherwise."""
    value = text.strip().lower()
    factor = 1.0
    if value and value[-1] in _UNITS:
        factor = _UNITS[value[-1]]
        value = value[:-1]
    try:
        seconds = float(value) * factor
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 300, 90s, 5m or 1h") from None
    if not seconds > 0 or seconds == float("inf"):
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
            _fail_config(ConfigError([f"--deadline: {exc}"], "command line"))
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
    """Set BACKEND's weight; it survives reloads until the proxy restarts."""
    result = _admin_call(admin, token, lambda c: c.set_backend(service, backend, weight=weight))
    typer.echo(f"{service}/{backend}: weight {result['weight']}, effective {result['effective_weight']}")


@app.command()
def reload(admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """Make the running proxy re-read its configuration file (like SIGHUP, but with the outcome shown)."""
    result = _admin_call(admin, token, lambda c: c.reload())
    typer.echo("reloaded:")
    for key in ("added", "removed", "changed", "unchanged"):
        names = result.get(key) or []
        typer.echo(f"  {key}: {', '.join(names) if names else '-'}")


connections_app = typer.Typer(invoke_without_command=True)
app.add_typer(connections_app, name="connections")


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


@app.command()
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
        _fail_config(ConfigError(problems, "command line"))
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

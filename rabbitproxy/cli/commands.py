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
            typer.echo(
                f"  {n.name}: amqp {n.amqp_port}, management http://127.0.0.1:{n.management_port}/", err=True
            )
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


# -- admin API commands: status, backend, reload ----------------------------------------------------------------------

AdminUrl = Annotated[
    str, typer.Option("--admin", help="Admin API URL.", envvar="RABBITPROXY_ADMIN", show_envvar=True)
]
ADMIN_DEFAULT = "http://127.0.0.1:9080"
AdminToken = Annotated[
    str | None,
    typer.Option("--token", help="Admin API bearer token.", envvar="RABBITPROXY_ADMIN_TOKEN", show_envvar=True),
]
EXIT_ADMIN = 1

backend_app = typer.Typer(help="Change a backend at runtime: drain, maint, ready, weight.", no_args_is_help=True)
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


def _set_state(state: str, service: str, backend: str, admin: str, token: str | None) -> None:
    result = _admin_call(admin, token, lambda c: c.set_backend(service, backend, state=state))
    closed = result.get("closed_connections", 0)
    extra = f", {closed} connection(s) closed" if closed else ""
    typer.echo(
        f"{service}/{backend}: {result['status']} (operator state {result['operator_state']}, "
        f"{result['connections']['active']} active connection(s){extra})"
    )


@backend_app.command("drain")
def backend_drain(service: str, backend: str, admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """No new connections to BACKEND; the open ones stay until their clients leave."""
    _set_state("drain", service, backend, admin, token)


@backend_app.command("maint")
def backend_maint(service: str, backend: str, admin: AdminUrl = ADMIN_DEFAULT, token: AdminToken = None) -> None:
    """Halt BACKEND: no new connections and its open connections are closed now."""
    _set_state("maint", service, backend, admin, token)


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

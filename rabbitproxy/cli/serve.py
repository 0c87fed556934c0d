"""``serve``, ``check-config`` and ``demo``: the commands that load a configuration and run (or check) a proxy.

pydantic (``rabbitproxy.config``) and asyncio load inside the commands that use them, so ``rabbitproxy --help``
pays for typer alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rabbitproxy.addresses import format_host_port, split_host_port
from rabbitproxy.cli.common import DEFAULT_CONFIG_PATH, fail_config, run_loop

if TYPE_CHECKING:
    from rabbitproxy.config import Config


def build_config(
    config_file: Path | None,
    listen: str | None,
    backends: list[str] | None,
    overrides: dict[str, Any],
    env: dict[str, str] | None = None,
    service_overrides: dict[str, Any] | None = None,
) -> Config:
    """Combine a config file (or the environment, or flags alone) with the flags actually given, and validate it.

    ``serve`` and ``check-config`` both come here, so the file is judged the same way by both: every error at
    once, with the same environment (``RABBITPROXY_ADMIN_TOKEN`` among it).
    """
    from rabbitproxy import config as config_mod
    from rabbitproxy.config import ConfigError

    data: dict[str, Any]
    environ = env if env is not None else dict(os.environ)
    source = str(config_file) if config_file else "command line"
    if config_file is not None:
        # The file as written, flags applied on top, validated once: its errors all come in one report.
        data = config_mod.read_toml(config_file)
    else:
        try:
            data = config_mod.from_env(environ) or {}
        except ValueError as exc:
            raise ConfigError([f"RABBITPROXY_BACKENDS: {exc}"], "environment") from None
        if not data and not backends:
            raise ConfigError(["give --config FILE, or --backend (and --listen), or RABBITPROXY_BACKENDS"], source)
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
    return config_mod.validate(data, source, environ)


def config_or_env(config: Path | None, env: dict[str, str]) -> Path | None:
    """The config file to load, or None to build the configuration from the environment.

    Only the default path may be missing, and only when ``RABBITPROXY_BACKENDS`` is set: any other missing file is
    an error, so a typo in ``--config`` is never papered over by stray environment variables.
    """
    if config == DEFAULT_CONFIG_PATH and not config.exists() and env.get("RABBITPROXY_BACKENDS", "").strip():
        return None
    return config


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
    log_format: Annotated[
        str | None, typer.Option(help="auto (JSON unless stderr is a terminal), console (logfmt) or json.")
    ] = None,
    loop: Annotated[str, typer.Option(help="Event loop: uvloop or asyncio.")] = "uvloop",
    workers: Annotated[
        str | None,
        typer.Option(help='Data-path processes sharing each listener: a number, or "auto" (one per core).'),
    ] = None,
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
    if workers is not None:
        overrides["workers"] = int(workers) if workers.isdigit() else workers
    if loop not in ("uvloop", "asyncio"):
        fail_config(ConfigError([f"--loop: {loop!r} is not one of uvloop, asyncio"]))
    config = config_or_env(config, dict(os.environ))
    try:
        per_service = {"health_check": {"type": health_check}} if health_check is not None else None
        cfg = build_config(config, listen, backend, overrides, service_overrides=per_service)
    except ConfigError as exc:
        fail_config(exc)
        return
    logs.setup(cfg.log.level, cfg.log.format)
    import structlog

    from rabbitproxy.config import warnings

    for warning in warnings(cfg):
        structlog.get_logger("rabbitproxy.config").warning("configuration warning", warning=warning)
    try:
        run_loop(serve_main(cfg, config_path=config.resolve() if config else None), loop)
    except ConfigError as exc:
        fail_config(exc)
    except KeyboardInterrupt:
        pass


def check_config(config: Annotated[Path, typer.Argument(help="TOML configuration file.")]) -> None:
    """Validate a configuration file as serve does: exit 0 with a summary (and warnings), or 2 naming every error."""
    from rabbitproxy.config import ConfigError, warnings

    try:
        # serve's own path, with no flags: the same reading, validation, files and environment.
        cfg = build_config(config, None, None, {})
    except ConfigError as exc:
        fail_config(exc)
        return
    for warning in warnings(cfg):
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{config}: OK")
    typer.echo(f"admin: {cfg.admin.listen if cfg.admin.enabled else 'disabled'}")
    for s in cfg.services:
        typer.echo(
            f"service {s.name}: listen {s.listen}, {s.balance}, health check {s.health_check.type}, "
            f"feedback {s.feedback.type}, {len(s.backends)} backend(s)"
        )
        for b in s.backends:
            extra = " backup" if b.backup else ""
            typer.echo(f"  {b.name}: {format_host_port(b.address, s.backend_port(b))} weight {b.weight}{extra}")


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
    from rabbitproxy.dev.demo_guide import demo_config, what_to_try

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
        names = [f"rabbit{i + 1}" for i in range(len(cluster.nodes))]
        data = demo_config(cluster.nodes, names, listen, admin_listen)
        try:
            cfg = config_mod.validate(data, "demo")
        except ConfigError as exc:
            fail_config(exc)
            return
        host, port = split_host_port(listen)
        typer.echo("", err=True)
        typer.echo(f"rabbitproxy demo: {nodes} RabbitMQ node(s) behind the proxy", err=True)
        typer.echo(f"  AMQP through the proxy:  amqp://guest:guest@{host}:{port}/", err=True)
        typer.echo(f"  admin API and overview:  http://{admin_listen}/", err=True)
        for name, n in zip(names, cluster.nodes, strict=True):
            typer.echo(
                f"  {name} = {n.name}: amqp {n.amqp_port}, management http://127.0.0.1:{n.management_port}/", err=True
            )
        typer.echo("", err=True)
        for line in what_to_try(cluster, cluster.nodes, names, admin_listen):
            typer.echo(line, err=True)
        typer.echo("", err=True)
        typer.echo("Press Ctrl-C to stop the proxy and the cluster.", err=True)
        try:
            run_loop(serve_main(cfg), loop)
        except KeyboardInterrupt:
            pass
        except ConfigError as exc:
            fail_config(exc)
    finally:
        typer.echo("stopping the cluster...", err=True)
        cluster.stop()

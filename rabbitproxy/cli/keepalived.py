"""``keepalived-config``: print a keepalived.conf for one side of a highly available pair."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from rabbitproxy.cli.common import fail_config


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
    script_user: Annotated[
        str, typer.Option(help="User keepalived runs the probe and notify as (unprivileged; the probe needs none).")
    ] = "nobody",
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
        fail_config(ConfigError(str(exc).splitlines(), "command line"))
        return
    if not os.access(side.rabbitproxy, os.X_OK):
        # keepalived would only log "Disabling track script ... not found" and then hold the VIP whatever the proxy's
        # health: refuse rather than print a configuration that checks nothing.
        fail_config(
            ConfigError(
                [f"--rabbitproxy: {side.rabbitproxy} is not an executable here; give the path of rabbitproxy"],
                "command line",
            )
        )
        return
    typer.echo(text, nl=False)

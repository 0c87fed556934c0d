"""The composition root: :func:`serve` builds the supervisor, the admin API and the signal handling, and runs them.

``serve`` takes an injectable ``shutdown_trigger`` (hypercorn's pattern) so tests and embedders decide when to
stop; the CLI passes none, and then SIGTERM/SIGINT stop it. Shutdown order: close every listener at once (new
connects are refused), let open connections finish for up to each service's ``shutdown_timeout``, then close what
is left. A second signal exits at once.

systemd's readiness protocol lives here too: when ``NOTIFY_SOCKET`` names a datagram socket, ``READY=1`` is sent
once every listener is bound and the admin API is up, and ``STOPPING=1`` when shutdown begins; in between,
``STATUS=`` and (under ``WatchdogSec``) ``WATCHDOG=1`` (:mod:`rabbitproxy.control.systemd_notify`). The test
harness uses the same signal instead of probing the port, which would itself open a proxied connection.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from rabbitproxy.config import Config, ConfigError
from rabbitproxy.control.reload import ReloadRefusedError
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.control.systemd_notify import keep_systemd_informed
from rabbitproxy.tasks import run_restarting

log = structlog.get_logger("rabbitproxy.app")


def sd_notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the notify socket; False when there is none or it is gone."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    # A leading "@" names a socket in Linux's abstract namespace.
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        # The supervisor went away or never listened; readiness is advisory, never a reason to fail.
        return False
    return True


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    shutdown: asyncio.Event,
    reload: Callable[[], None] | None,
    force: Callable[[], None] | None = None,
) -> None:
    """SIGTERM/SIGINT set the shutdown event; a second one exits at once (``force`` first). SIGHUP reloads."""

    def on_stop(signame: str) -> None:
        if shutdown.is_set():
            log.warning("second signal: exiting now", signal=signame)
            if force is not None:
                force()
            raise SystemExit(1)
        log.info("signal received, shutting down", signal=signame)
        shutdown.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)


async def serve(
    config: Config,
    *,
    config_path: Path | None = None,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    ready: Callable[[Supervisor], None] | None = None,
) -> None:
    """Run the proxy until ``shutdown_trigger`` returns (default: SIGTERM or SIGINT), then shut down gracefully."""
    # workers > 1: this process supervises and N worker processes serve (rabbitproxy.control.workers).
    proxy = Supervisor(config, config_path=config_path, role="parent" if config.worker_count > 1 else "single")
    admin_runner = None
    health_file = None
    if config.admin.health_file:
        from rabbitproxy.admin.readiness import HealthFile, keep_health_file

        # "Not healthy" from the first moment: a restarted proxy must not look ready before its listeners are.
        health_file = HealthFile(config.admin.health_file)
        health_file.update("starting")
    if config.admin.enabled:
        from rabbitproxy.admin.access import admin_token
        from rabbitproxy.admin.api import start_admin

        # A missing token on a non-loopback admin address is a config error: refuse before binding anything.
        admin_token(config.admin)
    await proxy.start()
    try:
        if config.admin.enabled:
            admin_runner = await start_admin(proxy)
    except BaseException:
        # The admin port is taken (or worse): the listeners already bound must not outlive the failed start.
        await proxy.shutdown()
        raise
    if shutdown_trigger is None:
        # Signal handlers go in before readiness is announced, so a SIGTERM right after READY drains gracefully.
        stop = asyncio.Event()

        def on_hup() -> None:
            if proxy.state == "stopping":
                # The shutdown closed the listeners; a reload now would open them again.
                log.warning("SIGHUP ignored: shutting down")
                return
            proxy.spawn(_reload_from_signal(proxy), name="reload")

        install_signal_handlers(asyncio.get_running_loop(), stop, on_hup, proxy.kill_workers)
        shutdown_trigger = stop.wait
    if health_file is not None:
        # A dead updater would freeze the file at its last value, which keepalived would go on believing.
        hf = health_file
        proxy.spawn(run_restarting(lambda: keep_health_file(proxy, hf), "health-file"), name="health-file")
    # Everything allocated so far lives for the whole run; freezing it keeps the collector from rescanning it.
    gc.freeze()
    if ready is not None:
        ready(proxy)
    sd_notify("READY=1")
    # STATUS= for "systemctl status", WATCHDOG=1 under WatchdogSec, from this loop; restarted if it ever dies, or a
    # watchdog would kill a healthy proxy.
    if os.environ.get("NOTIFY_SOCKET"):
        proxy.spawn(
            run_restarting(lambda: keep_systemd_informed(proxy.services, sd_notify, os.environ), "systemd-notify"),
            name="systemd-notify",
        )
    try:
        await shutdown_trigger()
    finally:
        sd_notify("STOPPING=1")
        if health_file is not None:
            # At once, not at the next poll: keepalived hands the VIP to the peer while this proxy drains.
            health_file.update("stopping")
        await proxy.shutdown()
        if admin_runner is not None:
            await admin_runner.cleanup()


async def _reload_from_signal(proxy: Supervisor) -> None:
    try:
        await proxy.reload()
    except ReloadRefusedError as exc:
        # Shutdown began while this reload waited for the lock or for first checks.
        log.warning("reload refused", reason="; ".join(exc.errors))
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays", errors=exc.errors)

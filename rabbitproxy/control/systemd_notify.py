"""What the proxy tells systemd while it runs: a ``STATUS=`` line and, under ``WatchdogSec``, ``WATCHDOG=1``.

``systemctl status`` shows the last ``STATUS=`` text (services, backends up, open connections). With
``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` and restarts the service when no ``WATCHDOG=1`` arrives within
that time; the keep-alive is sent from the event loop that runs the services, at half the interval as
sd_watchdog_enabled(3) advises, so a loop that is stuck (a busy loop, a blocking call) stops it and systemd restarts
the proxy.
With ``workers = N`` the parent's loop sends both, and its counts are the workers' sums.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rabbitproxy.relay.service import Service

# How often STATUS= is refreshed without a watchdog: often enough for "systemctl status", and one datagram.
STATUS_INTERVAL = 5.0


def status_line(services: Mapping[str, Service]) -> str:
    """One line for ``systemctl status``: services, usable backends of all, open connections."""
    backends = [b for s in services.values() for b in s.pool.backends]
    up = sum(1 for b in backends if b.usable)
    conns = sum(s.active for s in services.values())
    return f"{len(services)} service(s), {up}/{len(backends)} backend(s) up, {conns} connection(s)"


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``), or None when the watchdog is not for us."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    # systemd names the process it watches; a child that inherited the variables (a worker) is not it.
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def keep_systemd_informed(
    services: Mapping[str, Service], notify: Callable[[str], bool], env: Mapping[str, str]
) -> None:
    """Send STATUS= (and WATCHDOG=1 when asked for) until cancelled."""
    watchdog = watchdog_interval(env)
    tick = min(STATUS_INTERVAL, watchdog) if watchdog is not None else STATUS_INTERVAL
    while True:
        message = f"STATUS={status_line(services)}"
        if watchdog is not None:
            message = "WATCHDOG=1\n" + message
        notify(message)
        await asyncio.sleep(tick)

"""Whether this proxy should get new clients: the answer behind ``/healthz`` and the optional health file.

The health file (``[admin] health_file``) carries the same verdict as one number, ``0`` for ok and ``1`` for
anything else, for keepalived's ``track_file``. keepalived watches it with inotify, so a proxy that starts shutting
down gives up its VIP at once instead of at the next run of the ``rabbitproxy healthcheck`` track script (which
still catches what a file cannot report: a proxy that was killed or hangs).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor

log = structlog.get_logger("rabbitproxy.admin")

# How often the file is brought up to date with backend health. Shutdown does not wait for it: serve() writes the
# file itself the moment the shutdown begins.
POLL_INTERVAL = 0.2


def health_status(proxy: Supervisor) -> str:
    """``ok``, or why this proxy should not get new clients: starting, stopping, degraded or no-healthy-backend.

    ``degraded``: with ``workers = N``, fewer workers than configured are serving (one died, hung or is being
    started again). The kernel hands a hung worker its share of new clients until the parent has replaced it, so
    a peer proxy with every worker serving is the better place for them meanwhile.

    keepalived, Kubernetes readiness and container health checks act on it, so a proxy that is up but cannot reach
    any RabbitMQ node (all backends failing their health checks or reported down by their agents, in every service)
    hands its clients to one that can. Operator states do not count: draining or halting every backend is a
    deliberate act on the nodes, and moving the VIP for it would cut the open connections a drain means to keep.
    """
    if proxy.state != "running" or not proxy.listeners_ready.is_set():
        return proxy.state
    workers = proxy.workers
    if workers is not None and workers.serving() < workers.count:
        return "degraded"
    for service in proxy.services.values():
        for backend in service.pool.backends:
            if backend.healthy and backend.agent_down is None:
                return "ok"
    return "no-healthy-backend"


class HealthFile:
    """Writes ``0`` or ``1`` to a file when the verdict changes, replacing it whole so no reader sees half a write."""

    __slots__ = ("_failing", "_written", "path")

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._written: str | None = None
        # Set while writes fail, so a missing directory is reported once, not five times a second.
        self._failing = False

    def update(self, status: str) -> None:
        value = "0\n" if status == "ok" else "1\n"
        if value == self._written:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(value)
            # rename() is atomic, and keepalived sees it (IN_MOVED_TO on the directory it watches).
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self._failing:
                log.error("cannot write the health file", path=str(self.path), error=exc.strerror or str(exc))
                self._failing = True
            return
        if self._failing:
            log.info("health file written again", path=str(self.path))
            self._failing = False
        self._written = value
        log.info("health file updated", path=str(self.path), status=status, value=value.strip())


async def keep_health_file(proxy: Supervisor, health_file: HealthFile) -> None:
    """Keep ``health_file`` in step with :func:`health_status` until cancelled."""
    while True:
        health_file.update(health_status(proxy))
        await asyncio.sleep(POLL_INTERVAL)

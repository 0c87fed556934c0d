"""Noticing a worker of ``workers = N`` that hangs, or never comes up.

A worker whose loop is wedged (a busy loop, a SIGSTOP, a deadlock in an extension) keeps its ``SO_REUSEPORT``
socket, so the kernel keeps handing it its share of new clients, who would wait forever. Its process is alive and
its channel open: what stops is the figures it sends every ``STATS_INTERVAL`` (0.5 s). The parent looks every
:data:`WATCH_EVERY` seconds at when it last heard from each worker and kills one silent for :data:`HUNG_AFTER`
seconds, or one that is not listening :data:`START_TIMEOUT` seconds after its start; the supervision loop then starts
a new one and counts the restart under that cause.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from rabbitproxy.control.workers import WorkerSet

log = structlog.get_logger("rabbitproxy.workers")

# Seconds a starting worker has to bind its listeners and say it is ready.
START_TIMEOUT = 30.0
# A listening worker that sent nothing for this long is hung: ten of its figures missed.
HUNG_AFTER = 5.0
WATCH_EVERY = 0.5


def verdict(*, ready: bool, now: float, last_seen: float, launched: float) -> str | None:
    """``hung``, ``start-timeout``, or None for a worker that is fine (times are the parent's loop time)."""
    if ready and now - last_seen > HUNG_AFTER:
        return "hung"
    if not ready and now - launched > START_TIMEOUT:
        return "start-timeout"
    return None


def stalled(last_tick: float, now: float) -> bool:
    """Whether the parent's own loop stalled since its last look: it has not read the workers' figures either,
    which is no verdict on them."""
    return now - last_tick > WATCH_EVERY + HUNG_AFTER / 2


async def watch_loop(ws: WorkerSet) -> None:
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(WATCH_EVERY)
        now = loop.time()
        parent_stalled = stalled(last, now)
        last = now
        try:
            watch(ws, now, parent_stalled=parent_stalled)
        except Exception:
            log.exception("watching the workers failed")


def watch(ws: WorkerSet, now: float, *, parent_stalled: bool = False) -> None:
    """Kill every worker :func:`verdict` condemns (none after a stall of the parent's own loop, nor while the
    workers drain for the shutdown)."""
    if ws.stopping:
        return
    for slot in ws.slots:
        proc = slot.process
        if proc is None or proc.returncode is not None or slot.channel is None or slot.kill_cause is not None:
            continue
        if parent_stalled:
            slot.last_seen = max(slot.last_seen, now)
            continue
        cause = verdict(ready=slot.ready, now=now, last_seen=slot.last_seen, launched=slot.launched)
        if cause == "hung":
            log.error("worker hung, killed", worker=slot.index, pid=slot.pid, silent_for=round(now - slot.last_seen, 1))
        elif cause is not None:
            log.error("worker not listening in time, killed", worker=slot.index, pid=slot.pid, waited=START_TIMEOUT)
        if cause is not None:
            ws.kill(slot, cause)

"""Reloading ``workers = N``: each configuration has a generation, and every worker gets the current one.

The parent applies a reload itself, adds one to :attr:`WorkerSet.generation` and sends the configuration to every
listening worker. A worker that was being started meanwhile got the configuration before in its start message; when
it says it is ready with an older generation it is sent the current one (:func:`catch_up`), and the reload's
answer waits for that, so "reloaded" means every worker runs the new configuration. A worker that is not running
(waiting to be started again) needs nothing: it starts on the current configuration.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from rabbitproxy.config import Config
from rabbitproxy.control.channel import ChannelError

if TYPE_CHECKING:
    from rabbitproxy.control.workers import WorkerSet, WorkerSlot

log = structlog.get_logger("rabbitproxy.workers")

# Seconds a reload waits for a worker that was starting to take the new configuration.
SETTLE_TIMEOUT = 60.0


async def reload_workers(ws: WorkerSet, config: Config) -> list[str]:
    """Send ``config`` to every worker (the parent has applied it); return what went wrong where.

    An empty list means every worker serves the new configuration (or, one being restarted, will start on it).
    Otherwise each entry names a worker that failed or refused it and still serves the one before: the reload
    is incomplete, and the admin API says so instead of "reloaded".
    """
    ws.generation += 1
    target = ws.generation
    data = config.model_dump(mode="json", exclude_unset=True)
    live = [s for s in ws.slots if s.channel is not None and s.ready]
    message = {"t": "reload", "config": data, "generation": target}
    answers = await asyncio.gather(*(ws.request(s, message, deadline=60.0) for s in live), return_exceptions=True)
    problems: list[str] = []
    for slot, answer in zip(live, answers, strict=True):
        if isinstance(answer, BaseException):
            why = str(answer) or type(answer).__name__
            log.error("worker reload failed", worker=slot.index, error=why)
            problems.append(f"worker {slot.index}: {why}")
        elif answer.get("error") or answer.get("errors"):
            errors = answer.get("errors") or [answer["error"]]
            log.error("worker reload refused", worker=slot.index, errors=errors)
            problems.extend(f"worker {slot.index}: {e}" for e in errors)
        else:
            slot.generation = max(slot.generation, target)
    # A worker that was starting when the reload came runs the configuration before; it catches up once it
    # listens (catch_up). The answer waits for it, so "reloaded" is true.
    problems += await settle(ws, target, [s for s in ws.slots if s not in live])
    return problems


async def settle(ws: WorkerSet, target: int, slots: list[WorkerSlot]) -> list[str]:
    """Wait until each of ``slots`` runs generation ``target``, refused it, or is not running (then it starts
    on the current configuration); what is left after the deadline is a problem."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT

    def waiting(slot: WorkerSlot) -> bool:
        return slot.channel is not None and slot.generation < target and target not in slot.refused

    while any(waiting(s) for s in slots):
        try:
            async with asyncio.timeout_at(deadline):
                await ws.moved.wait()
        except TimeoutError:
            break
    problems: list[str] = []
    for slot in slots:
        if target in slot.refused:
            problems.extend(f"worker {slot.index}: {e}" for e in slot.refused[target])
        elif waiting(slot):
            problems.append(f"worker {slot.index}: still starting, not on the new configuration yet")
    return problems


async def catch_up(ws: WorkerSet, slot: WorkerSlot) -> None:
    """Give a worker that came up on an older configuration the current one."""
    target = ws.generation
    message = {"t": "reload", "config": ws.sup.config.model_dump(mode="json", exclude_unset=True), "generation": target}
    try:
        answer = await ws.request(slot, message, deadline=SETTLE_TIMEOUT)
    except ChannelError:
        return  # it died meanwhile: its successor starts on the current configuration
    except TimeoutError:
        log.error("worker did not take the current configuration in time", worker=slot.index)
        slot.refused[target] = [f"did not take the configuration within {SETTLE_TIMEOUT:g} s"]
        return
    finally:
        ws.moved_on()
    errors = answer.get("errors") or ([answer["error"]] if answer.get("error") else [])
    if errors:
        log.error("worker refused the current configuration", worker=slot.index, errors=errors)
        slot.refused[target] = [str(e) for e in errors]
    else:
        slot.generation = max(slot.generation, int(answer.get("generation", target)))
        log.info("worker caught up with a reload made while it started", worker=slot.index, generation=target)
    ws.moved_on()

"""Owned background tasks: every task has an owner that cancels it on stop, and a failure is logged, never lost.

House rule 4 (hypercorn's task group): no fire-and-forget. The proxy owns its drains and reloads, each service its
connect attempts, and the per-backend monitors are cancelled through :func:`cancel_and_wait` when a reload or the
shutdown replaces them. A task that must run for as long as its owner does (a backend's health checks, its agent)
runs under :func:`run_restarting`, which starts it again with back-off if it ever ends (house rule 12).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import structlog

log = structlog.get_logger("rabbitproxy.tasks")


def log_failure(task: asyncio.Task[Any], **fields: Any) -> None:
    """Done-callback body: a task that raised is our bug, so it is logged with its traceback."""
    if not task.cancelled() and task.exception() is not None:
        log.error("task failed", task=task.get_name(), exc_info=task.exception(), **fields)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has finished (their errors are not re-raised)."""
    pending = list(tasks)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


class OwnedTasks:
    """A set of running tasks that an object owns; ``cancel_all()`` ends whatever is still running."""

    __slots__ = ("_fields", "_tasks")

    def __init__(self, **log_fields: Any) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        # Extra fields for the failure log (e.g. service=...), so a traceback says whose task it was.
        self._fields = log_fields

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        log_failure(task, **self._fields)

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        await cancel_and_wait(self._tasks)


class Backoff:
    """Delays between restarts: ``first``, doubling up to ``most``; back to ``first`` after a run of ``reset_after``."""

    __slots__ = ("delay", "first", "most", "reset_after")

    def __init__(self, first: float = 1.0, most: float = 30.0, reset_after: float = 60.0) -> None:
        self.first = first
        self.most = most
        self.reset_after = reset_after
        self.delay = first

    def next(self, ran_for: float) -> float:
        """The delay before the next start, given how long the last run lasted."""
        if ran_for >= self.reset_after:
            # It ran fine for a while: this is a new failure, not the same one again.
            self.delay = self.first
        delay = self.delay
        self.delay = min(self.delay * 2, self.most)
        return delay


async def run_restarting(
    factory: Callable[[], Awaitable[None]], name: str, backoff: Backoff | None = None, **fields: Any
) -> None:
    """Run ``factory()`` until cancelled; start it again, after a back-off delay, whenever it ends or raises.

    Only a cancellation of the task running this ends it, so a reload or the shutdown stops it promptly (also during
    the back-off sleep); a ``CancelledError`` that was not aimed at this task is a death like any other.
    """
    backoff = backoff or Backoff()
    loop = asyncio.get_running_loop()
    while True:
        began = loop.time()
        error: BaseException | None = None
        try:
            await factory()
        except asyncio.CancelledError as exc:
            me = asyncio.current_task()
            if me is None or me.cancelling():
                raise
            error = exc
        except Exception as exc:  # noqa: BLE001 - logged with its traceback below, then restarted
            error = exc
        delay = backoff.next(loop.time() - began)
        log.error(
            "task died, restarting" if error is not None else "task ended, restarting",
            task=name,
            restart_in=delay,
            exc_info=error,
            **fields,
        )
        await asyncio.sleep(delay)

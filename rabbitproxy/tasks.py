"""Owned background tasks: every task has an owner that cancels it on stop, and a failure is logged, never lost.

House rule 4 (hypercorn's task group): no fire-and-forget. The proxy owns its drains and reloads, each service its
connect attempts, and the per-backend monitors are cancelled through :func:`cancel_and_wait` when a reload or the
shutdown replaces them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
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

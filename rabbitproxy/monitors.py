"""Which background monitors watch a backend: its health check and its feedback agent."""

from __future__ import annotations

from collections.abc import Awaitable

from rabbitproxy.feedback import feedback_task
from rabbitproxy.health import health_task
from rabbitproxy.pool import Backend
from rabbitproxy.service import Service


def monitors_for(service: Service, backend: Backend) -> list[Awaitable[None]]:
    """The coroutines to run for ``backend`` (none when neither checks nor agents are configured).

    Called again for every backend after a reload, so a task only ever reads the configuration it was started with.
    """
    out: list[Awaitable[None]] = []
    if service.config.health_check.type != "none":
        out.append(health_task(service, backend))
    if service.config.feedback.type != "none":
        out.append(feedback_task(service, backend))
    return out

"""Which background monitors watch a backend: its health check and its feedback agent."""

from __future__ import annotations

from collections.abc import Awaitable

from rabbitproxy.pool import Backend
from rabbitproxy.service import Service


def monitors_for(service: Service, backend: Backend) -> list[Awaitable[None]]:
    """The coroutines to run for ``backend`` (none when neither checks nor agents are configured)."""
    out: list[Awaitable[None]] = []
    return out

"""Admin API placeholder (filled in by the admin issue)."""

from __future__ import annotations

from typing import Any


async def start_admin(proxy: Any) -> Any:
    return None

"""Test-wide setup: every async test runs on both uvloop and the stdlib asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # asyncpg's Makefile runs its suite on both loops; we parametrize instead so the broker cluster starts once.
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}

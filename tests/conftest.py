"""Test-wide setup: async tests run on uvloop and on asyncio; hypothesis judges outcomes, never timings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop
from hypothesis import HealthCheck, settings

# Hypothesis' deadline and its "input generation is slow" health check are timings. On a busy 2-core CI machine
# one stalled draw (1.1 s once, in a clean-clone run) fails a test whose every assertion held, so both are off:
# property tests assert outcomes, and the number of examples stays as each test sets it.
settings.register_profile("rabbitproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("rabbitproxy")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # asyncpg's Makefile runs its suite on both loops; we parametrize instead so the broker cluster starts once.
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}

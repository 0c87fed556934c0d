"""Test-wide setup: tier markers by directory; async tests run on uvloop and on asyncio; hypothesis judges outcomes.

Each test gets the marker of the directory it sits in (``unit``, ``protocol`` or ``integration``, registered in
pyproject.toml), so ``pytest -m "not integration"`` runs the fast tiers alone. tests/README.md says what belongs where.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

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


TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "protocol", "integration")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier, taken from its directory; a test outside the three tiers is a usage error."""
    for item in items:
        try:
            tier = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue  # collected from outside tests/ (an explicit path elsewhere): not ours to mark
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/protocol or tests/integration")
        item.add_marker(getattr(pytest.mark, tier))

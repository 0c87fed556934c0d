"""The unit tier's promise, kept by the tier itself: no sockets, no processes, no event loop."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest's collection hook sees the whole session's items, so check only those under this directory.
    for item in items:
        if item.path.is_relative_to(UNIT) and item.get_closest_marker("asyncio") is not None:
            raise pytest.UsageError(f"{item.nodeid}: an async test runs a loop; it belongs in tests/protocol")


@pytest.fixture(autouse=True)
def _no_sockets_or_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a unit test that opens a socket or starts a process, naming the tier it belongs in."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            "a unit test opens no socket and starts no process: move it to tests/protocol or tests/integration"
        )

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    yield

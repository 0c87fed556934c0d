"""Unit tests for applying feedback-agent replies to a backend (the poller: tests/protocol/test_feedback_poller.py)."""

from __future__ import annotations

import pytest

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.control.feedback import apply_reply
from rabbitproxy.protocols.agent_reply import parse_agent_reply
from tests.support.proxy import agent_service


def _apply(backend: Backend, line: str) -> None:
    apply_reply(backend, parse_agent_reply(line), line)


@pytest.mark.parametrize(
    ("weight", "line", "effective"),
    [(100, "87%", 87), (100, "87", 87), (200, "up ready 25%", 50), (10, "weight:50", 5), (100, "100%", 100)],
)
def test_percent_scales_the_configured_weight(weight: int, line: str, effective: int) -> None:
    backend = agent_service(weight).pool.backends[0]
    _apply(backend, line)
    assert backend.effective_weight == effective
    assert backend.status == "up"


def test_effective_weight_is_capped_at_the_config_maximum() -> None:
    backend = agent_service(800).pool.backends[0]
    _apply(backend, "1000%")
    assert backend.effective_weight == 1000


def test_zero_percent_is_drain_not_down() -> None:
    backend = agent_service().pool.backends[0]
    _apply(backend, "0%")
    assert backend.weight == 0
    assert backend.healthy
    assert backend.status == "drain"
    _apply(backend, "40%")
    assert backend.status == "up"


def test_words_leave_unsent_fields_alone() -> None:
    backend = agent_service().pool.backends[0]
    _apply(backend, "30%")
    _apply(backend, "drain")
    assert backend.agent_percent == 30
    assert backend.admin_state == "drain"
    _apply(backend, "up ready 60%")
    assert (backend.agent_percent, backend.admin_state) == (60, "ready")


def test_agent_cannot_undo_an_operators_maint() -> None:
    backend = agent_service().pool.backends[0]
    backend.operator_state = "maint"
    _apply(backend, "up ready 100%")
    assert backend.admin_state == "maint"


def test_agent_down_and_up() -> None:
    backend = agent_service().pool.backends[0]
    _apply(backend, "down #disk full")
    assert backend.agent_down == "disk full"
    assert backend.status == "down"
    assert backend.weight == 0
    _apply(backend, "up")
    assert backend.agent_down is None
    assert backend.status == "up"

"""Unit tests for the feedback agent's figures and replies (no sockets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rabbitproxy.agent.server import (
    Agent,
    IdleWindow,
    RabbitView,
    format_reply,
    parse_state_word,
    rabbit_headroom,
)
from rabbitproxy.protocols.agent_reply import parse_agent_reply


class FakeCpu:
    """Cumulative (total, idle) CPU seconds and a clock, advanced by the test."""

    def __init__(self) -> None:
        self.now = 0.0
        self.total = 0.0
        self.idle = 0.0

    def run(self, seconds: float, idle_fraction: float) -> None:
        self.now += seconds
        self.total += seconds
        self.idle += seconds * idle_fraction

    def snapshot(self) -> tuple[float, float]:
        return self.total, self.idle

    def clock(self) -> float:
        return self.now


def test_idle_is_averaged_over_the_window_not_sampled_once() -> None:
    cpu = FakeCpu()
    window = IdleWindow(5.0, cpu.snapshot, cpu.clock)
    assert window.percent() == 100
    for _ in range(4):
        cpu.run(1.0, 0.9)
        window.sample()
    # One busy second after four idle ones moves the average, it does not replace it.
    cpu.run(1.0, 0.0)
    assert window.percent() == 72
    for _ in range(5):
        cpu.run(1.0, 0.0)
        window.sample()
    # Once the window has passed, the old idle seconds no longer count.
    assert window.percent() == 0


def test_rabbit_headroom_takes_the_tightest_resource() -> None:
    node = {"mem_used": 600, "mem_limit": 1000, "fd_used": 900, "fd_total": 1000}
    assert rabbit_headroom(node) == RabbitView(10, None)
    assert rabbit_headroom({"mem_used": 100, "mem_limit": 1000}) == RabbitView(90, None)
    assert rabbit_headroom({}) == RabbitView(100, None)


def test_rabbit_alarms() -> None:
    assert rabbit_headroom({"mem_alarm": True}).alarm == "memory alarm"
    assert rabbit_headroom({"disk_free_alarm": True}).alarm == "disk alarm"
    assert rabbit_headroom({"mem_alarm": True, "disk_free_alarm": True}).alarm == "memory and disk alarm"
    assert rabbit_headroom({"mem_alarm": False, "disk_free_alarm": False}).alarm is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["mem_used", "mem_limit", "fd_used", "fd_total", "mem_alarm"]), json_values))
# Found by hypothesis: a subnormal limit makes used/limit overflow to infinity.
@example(node={"fd_total": 1.1125369292536007e-308, "fd_used": 1})
@example(node={"mem_used": 1e308, "mem_limit": 1e-308})
def test_rabbit_headroom_never_raises_on_odd_json(node: dict[str, Any]) -> None:
    view = rabbit_headroom(node)
    assert 0 <= view.headroom <= 100


@pytest.mark.parametrize(
    ("text", "state"),
    [("", "ready"), ("\n", "ready"), ("drain\n", "drain"), ("MAINT", "maint"), ("  ready  ", "ready")],
)
def test_state_words(text: str, state: str) -> None:
    assert parse_state_word(text) == state


@pytest.mark.parametrize("text", ["halt", "drain now", "up ready", "ready!"])
def test_bad_state_words_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(ValueError, match="expected one of ready, drain, maint"):
        parse_state_word(text)


@given(st.text(max_size=50))
def test_state_word_garbage_raises_only_value_error(text: str) -> None:
    try:
        assert parse_state_word(text) in ("ready", "drain", "maint")
    except ValueError:
        pass


@pytest.mark.parametrize(
    ("percent", "state", "announce", "http", "line"),
    [
        (87, "ready", False, False, "87%\n"),
        (87, "ready", False, True, "87\n"),
        (87, "ready", True, False, "up ready 87%\n"),
        (87, "drain", True, False, "drain\n"),
        (87, "maint", False, True, "maint\n"),
    ],
)
def test_replies_parse_in_the_loadbalancer_org_format(
    percent: int, state: str, announce: bool, http: bool, line: str
) -> None:
    got = format_reply(percent, state, announce_ready=announce, http=http)  # type: ignore[arg-type]
    assert got == line
    reply = parse_agent_reply(got)
    if state == "ready":
        assert reply.percent == percent
    else:
        assert reply.admin == state


def test_state_file_overrides_and_bad_content_keeps_the_last_state(tmp_path: Path) -> None:
    path = tmp_path / "state"
    agent = Agent(state_file=path)
    # A missing file means nothing was forced.
    assert parse_agent_reply(agent.reply()).admin == "ready"
    path.write_text("drain\n")
    assert agent.reply() == "drain\n"
    path.write_text("halt\n")
    assert agent.reply() == "drain\n"
    path.write_text("ready\n")
    reply = parse_agent_reply(agent.reply())
    assert reply.admin == "ready" and reply.health == "up" and reply.percent is not None


def test_rabbitmq_alarm_makes_the_agent_drain() -> None:
    agent = Agent(rabbitmq="http://guest:guest@127.0.0.1:1/")
    assert agent.rabbit is not None
    agent.rabbit.view = RabbitView(headroom=3, alarm=None)
    reply = parse_agent_reply(agent.reply())
    assert reply.admin == "ready" and reply.percent is not None and reply.percent <= 3
    agent.rabbit.view = RabbitView(headroom=50, alarm="memory alarm")
    assert agent.reply() == "drain\n"

"""The idle/heartbeat timeout wheel: checks run once due and never before, replace, discard, survive a failing
check, catch up after a stalled loop, the timer stops when nothing is watched, and one timer runs at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

import pytest

from rabbitproxy.relay.idle_watch import IdleWatch
from tests.support.waiting import wait_for


class Conn:
    """Anything with an ``idle_slot`` can be watched."""

    __slots__ = ("idle_slot", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.idle_slot = 0

    def __repr__(self) -> str:
        return self.name


@pytest.mark.asyncio
async def test_a_check_runs_once_due_and_never_before() -> None:
    seen: list[tuple[str, float]] = []
    w: IdleWatch[Conn] = IdleWatch(asyncio.get_running_loop(), lambda c: seen.append((c.name, time.monotonic())))
    a, b = Conn("a"), Conn("b")
    # More than a slot (TICK) apart: checks in one slot run in the order they were set.
    due_a = time.monotonic() + 0.6
    due_b = time.monotonic() + 0.1
    w.at(a, due_a)
    w.at(b, due_b)
    assert len(w) == 2 and a.idle_slot and b.idle_slot
    await wait_for(lambda: len(seen) == 2, what="both checks")
    assert [n for n, _ in seen] == ["b", "a"]
    assert seen[0][1] >= due_b and seen[1][1] >= due_a
    assert (a.idle_slot, b.idle_slot, len(w)) == (0, 0, 0)
    await wait_for(lambda: w._timer is None, what="the timer stops once nothing is watched")


@pytest.mark.asyncio
async def test_a_new_due_time_replaces_the_pending_check() -> None:
    seen: list[float] = []
    w: IdleWatch[Conn] = IdleWatch(asyncio.get_running_loop(), lambda c: seen.append(time.monotonic()))
    c = Conn("c")
    w.at(c, time.monotonic() + 0.1)
    later = time.monotonic() + 0.6
    w.at(c, later)
    assert len(w) == 1
    await wait_for(lambda: seen, what="the check")
    assert len(seen) == 1 and seen[0] >= later


@pytest.mark.asyncio
async def test_a_discarded_connection_is_never_checked() -> None:
    seen: list[str] = []
    w: IdleWatch[Conn] = IdleWatch(asyncio.get_running_loop(), lambda c: seen.append(c.name))
    gone, kept = Conn("gone"), Conn("kept")
    w.at(gone, time.monotonic() + 0.1)
    w.at(kept, time.monotonic() + 0.2)
    w.discard(gone)
    w.discard(Conn("never watched"))
    assert gone.idle_slot == 0 and len(w) == 1
    await wait_for(lambda: seen, what="the other check")
    await asyncio.sleep(0.3)  # a bounded look for a check that must not come, not a wait for a condition
    assert seen == ["kept"]


@pytest.mark.asyncio
async def test_a_check_that_rewatches_is_called_again_and_a_failing_one_stops_nothing() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    calls: dict[str, int] = {"again": 0, "bad": 0, "other": 0}
    w: IdleWatch[Conn]

    def check(c: Conn) -> None:
        calls[c.name] += 1
        if c.name == "bad":
            raise ValueError("boom")
        if c.name == "again" and calls["again"] < 3:
            w.at(c, time.monotonic() + 0.05)

    w = IdleWatch(loop, check)
    now = time.monotonic()
    for name in ("bad", "again", "other"):
        w.at(Conn(name), now + 0.05)
    await wait_for(lambda: calls["again"] == 3 and calls["other"] == 1, what="three checks of one, one of the other")
    assert calls["bad"] == 1
    assert len(errors) == 1 and isinstance(errors[0]["exception"], ValueError)
    await wait_for(lambda: len(w) == 0 and w._timer is None, what="nothing left to watch")


@pytest.mark.asyncio
async def test_a_due_time_in_the_past_is_checked_at_the_next_tick() -> None:
    seen: list[str] = []
    w: IdleWatch[Conn] = IdleWatch(asyncio.get_running_loop(), lambda c: seen.append(c.name))
    w.at(Conn("late"), time.monotonic() - 60)
    await wait_for(lambda: seen == ["late"], what="the overdue check")


@pytest.mark.asyncio
async def test_after_a_stalled_loop_every_overdue_check_runs_in_due_order() -> None:
    seen: list[str] = []
    w: IdleWatch[Conn] = IdleWatch(asyncio.get_running_loop(), lambda c: seen.append(c.name))
    # As if the loop had not ticked for 1,000 slots: the tick must look at the filled slots, not walk every one.
    w._done -= 1000
    now = time.monotonic()
    w.at(Conn("second"), now - 100)
    w.at(Conn("first"), now - 200)
    w.at(Conn("third"), now + 0.05)
    await wait_for(lambda: len(seen) == 3, what="all three checks")
    assert seen == ["first", "second", "third"]


class CountingLoop:
    """The loop as the watch sees it, counting its timers that have not fired yet."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending = 0
        self.most = 0

    def call_later(self, delay: float, callback: Callable[[], object]) -> asyncio.TimerHandle:
        self.pending += 1
        self.most = max(self.most, self.pending)

        def fired() -> None:
            self.pending -= 1
            callback()

        return self.loop.call_later(delay, fired)

    def call_exception_handler(self, context: dict[str, object]) -> None:
        self.loop.call_exception_handler(context)


@pytest.mark.asyncio
async def test_one_timer_at_a_time_while_checks_watch_again() -> None:
    # Every heartbeating connection's check watches it again; a tick that then armed a second timer left one more
    # timer running after every such tick, and the ticks (and their CPU) grew for as long as the process ran.
    loop = CountingLoop(asyncio.get_running_loop())
    checks = [0]
    w: IdleWatch[Conn]

    def check(c: Conn) -> None:
        checks[0] += 1
        if checks[0] < 8:
            w.at(c, time.monotonic() + 0.01)

    w = IdleWatch(cast(asyncio.AbstractEventLoop, loop), check)
    w.at(Conn("busy"), time.monotonic())
    await wait_for(lambda: checks[0] == 8, what="eight checks")
    await wait_for(lambda: loop.pending == 0, what="the last tick ran and armed nothing")
    assert loop.most == 1

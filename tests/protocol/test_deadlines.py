"""The shared-delay deadline queue: expiry order, discard, re-add, a delay changed on the way, and close."""

from __future__ import annotations

import asyncio

import pytest

from rabbitproxy.relay.deadlines import Deadlines
from tests.support.waiting import wait_for


@pytest.mark.asyncio
async def test_keys_expire_in_order_and_discarded_ones_never() -> None:
    expired: list[str] = []
    d: Deadlines[str] = Deadlines(asyncio.get_running_loop(), 0.05, expired.append)
    for key in ("a", "b", "c", "d"):
        d.add(key)
    d.discard("b")
    d.discard("never added")
    await wait_for(lambda: len(expired) == 3, what="three expiries")
    assert expired == ["a", "c", "d"]
    assert len(d) == 0


@pytest.mark.asyncio
async def test_keys_added_while_the_timer_waits_for_an_older_one_still_expire() -> None:
    loop = asyncio.get_running_loop()
    expired: list[int] = []
    d: Deadlines[int] = Deadlines(loop, 0.1, expired.append)
    d.add(1)
    # The timer is armed for key 1 only; 2 and 3 must get their turn after it fires.
    await asyncio.sleep(0)  # one loop turn, not a wait for time
    d.add(2)
    d.add(3)
    await wait_for(lambda: expired == [1, 2, 3], what="all three expired")


@pytest.mark.asyncio
async def test_adding_a_waiting_key_again_restarts_it_behind_the_others() -> None:
    expired: list[str] = []
    d: Deadlines[str] = Deadlines(asyncio.get_running_loop(), 0.05, expired.append)
    d.add("retry")
    d.add("other")
    d.add("retry")
    assert list(d._waiting) == ["other", "retry"]
    await wait_for(lambda: len(expired) == 2, what="both expired")
    assert expired == ["other", "retry"]


@pytest.mark.asyncio
async def test_a_failing_callback_does_not_stop_the_other_expiries() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    expired: list[str] = []

    def on_expired(key: str) -> None:
        if key == "bad":
            raise ValueError("boom")
        expired.append(key)

    try:
        d: Deadlines[str] = Deadlines(loop, 0.02, on_expired)
        for key in ("bad", "good"):
            d.add(key)
        await wait_for(lambda: expired == ["good"], what="the good key expired")
        assert len(errors) == 1 and isinstance(errors[0]["exception"], ValueError)
    finally:
        loop.set_exception_handler(None)


@pytest.mark.asyncio
async def test_close_drops_everything() -> None:
    loop = asyncio.get_running_loop()
    expired: list[str] = []
    d: Deadlines[str] = Deadlines(loop, 0.02, expired.append)
    d.add("x")
    d.close()
    assert len(d) == 0 and d._timer is None
    # A later key still works: close() is also how an owner resets the queue.
    d.add("y")
    await wait_for(lambda: expired == ["y"], what="y expired")

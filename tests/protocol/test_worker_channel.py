"""The parent-worker channel on a real socketpair: requests and answers, deadlines, and the bound on a peer that
stops reading (house rule 11)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from rabbitproxy.control.channel import Channel, ChannelError, ChannelFullError, Message
from rabbitproxy.tasks import cancel_and_wait


@contextlib.asynccontextmanager
async def channels() -> AsyncIterator[tuple[Channel, Channel]]:
    """Two ends of a socketpair; the left one may buffer only 64 KiB for its peer."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left = await Channel.open(a, max_buffered=64 * 1024)
    right = await Channel.open(b)
    yield left, right
    left.close()
    right.close()


@pytest.mark.asyncio
async def test_requests_are_answered_and_notifications_arrive_in_order() -> None:
    async with channels() as pair:
        left, right = pair
        seen: list[Message] = []

        async def answer(message: Message) -> Message:
            return {"double": message["n"] * 2}

        serving = [asyncio.ensure_future(right.serve(seen.append, answer))]
        serving.append(asyncio.ensure_future(left.serve(seen.append, answer)))
        try:
            for i in range(5):
                left.send({"t": "state", "i": i})
            assert (await left.request({"t": "x", "n": 21}))["double"] == 42
            assert [m["i"] for m in seen] == [0, 1, 2, 3, 4]
        finally:
            await cancel_and_wait(serving)


async def never(message: Message) -> Message:
    """A request handler that never answers (a stuck worker)."""
    await asyncio.Event().wait()
    return {}


@pytest.mark.asyncio
async def test_a_peer_that_does_not_answer_runs_into_the_deadline() -> None:
    async with channels() as pair:
        left, right = pair

        serving = [asyncio.ensure_future(right.serve(lambda m: None, never))]
        serving.append(asyncio.ensure_future(left.serve(lambda m: None, never)))
        try:
            with pytest.raises(TimeoutError):
                await left.request({"t": "connections"}, deadline=0.2)
        finally:
            await cancel_and_wait(serving)


@pytest.mark.asyncio
async def test_a_peer_that_stops_reading_makes_send_fail_instead_of_buffering_without_end() -> None:
    async with channels() as pair:
        left, _ = pair  # nobody reads the right end
        chunk = {"t": "state", "pad": "x" * 16384}
        with pytest.raises(ChannelFullError):
            for _ in range(10_000):
                left.send(chunk)
                await asyncio.sleep(0)
        # What waits stays near the bound: one message over it at most.
        assert left.writer.transport.get_write_buffer_size() < 64 * 1024 + 20_000


@pytest.mark.asyncio
async def test_a_closed_peer_fails_the_requests_waiting_for_it() -> None:
    async with channels() as pair:
        left, right = pair

        serving = asyncio.ensure_future(left.serve(lambda m: None, never))
        pending = asyncio.ensure_future(left.request({"t": "connections"}))
        await asyncio.sleep(0.05)
        right.close()
        with pytest.raises(ChannelError):
            await pending
        await serving

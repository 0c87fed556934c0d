"""The parent-worker channel on a real socketpair: requests and answers, deadlines, the bound on a peer that
stops reading (house rule 11), and what a worker answers on it about its connections."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from unittest.mock import ANY

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.balancing import listing
from rabbitproxy.control.channel import Channel, ChannelError, ChannelFullError, Message
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.control.worker import Worker
from rabbitproxy.relay.legs import ClientLeg
from rabbitproxy.relay.service import Service
from rabbitproxy.tasks import cancel_and_wait
from tests.support.proxy import make_service, proxy_config, service_config


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
        # The request is on its way (its frame reached the peer) before the peer closes: a fixed sleep raced this.
        await asyncio.wait_for(right.reader.readexactly(4), 10)
        assert not pending.done()
        right.close()
        with pytest.raises(ChannelError):
            await pending
        await serving


def listed(n: int) -> tuple[Supervisor, Service, list[ClientLeg]]:
    """A worker's supervisor (never started) whose one service has ``n`` connections with different byte counts."""
    service = make_service([{"name": "b1", "address": "127.0.0.1"}])
    sup = Supervisor(
        config_mod.validate(proxy_config(service_config([{"name": "b1", "address": "127.0.0.1"}]))), role="worker"
    )
    sup.services[service.name] = service
    legs = []
    for i in range(n):
        leg = ClientLeg(service)
        leg.bytes_in = (i * 37) % 101
        service.connections.add(leg)
        legs.append(leg)
    return sup, service, legs


@pytest.mark.asyncio
async def test_a_worker_answers_a_listing_with_its_page_and_one_connection_by_id() -> None:
    # Issue 25, item 5: a worker serialised every connection it had for every listing (17.8 MiB per 50,000).
    async with channels() as pair:
        parent, child = pair
        worker = Worker(0, child)
        sup, service, legs = listed(60)
        worker.sup = sup
        serving = [asyncio.ensure_future(child.serve(worker.notified, worker.answer))]
        serving.append(asyncio.ensure_future(parent.serve(lambda m: None, never)))
        try:
            query = listing.ConnectionQuery(sort="bytes_in", limit=3, offset=2)
            now = time.monotonic()
            answer = await parent.request({"t": "connections", "query": dataclasses.asdict(query), "now": now})
            expected = listing.select([(service.name, leg) for leg in legs], query, now)
            assert answer["total"] == 60
            # Only what the page can reach crosses the channel: offset + limit rows, in the page's order.
            assert [view["id"] for _, view in answer["rows"]][2:] == [c["id"] for c in expected["connections"]]
            assert len(answer["rows"]) == 5
            one = await parent.request({"t": "connection", "conn": legs[7].id})
            assert one["view"]["id"] == legs[7].id and one["view"]["bytes_in"] == legs[7].bytes_in
            assert (await parent.request({"t": "connection", "conn": -1})) == {"missing": True, "re": ANY}
        finally:
            await cancel_and_wait(serving)

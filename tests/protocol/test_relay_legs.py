"""The relay legs driven call by call over fake transports: buffering, splicing, half-close, flow control."""

from __future__ import annotations

import asyncio

import pytest

from rabbitproxy.balancing.reasons import CloseReason
from tests.support.fakes import FakeService, FakeTransport, HandClientLeg, make_pair


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_bytes_before_connect_are_kept_and_sent_first() -> None:
    svc, client, ct, leg, bt = make_pair()
    client.data_received(b"AMQP\x00\x00\x09\x01")
    client.data_received(b"more")
    assert bt.buffer == b""
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    assert bt.buffer == b"AMQP\x00\x00\x09\x01more"
    client.data_received(b"after")
    assert bt.buffer.endswith(b"after")
    leg.data_received(b"reply")
    assert ct.buffer == b"reply"
    assert (client.bytes_in, client.bytes_out) == (17, 5)


@pytest.mark.asyncio
async def test_client_half_close_before_connect_is_forwarded_after_the_buffer() -> None:
    svc, client, ct, leg, bt = make_pair()
    client.data_received(b"request")
    assert client.eof_received() is True
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    assert bt.buffer == b"request" and bt.eof_written
    # The reply still flows back while the client's direction is closed.
    leg.data_received(b"reply")
    assert ct.buffer == b"reply"
    assert not ct.closing


@pytest.mark.asyncio
async def test_both_eofs_close_both_transports() -> None:
    # Keeping both legs open after both EOFs is the uvloop abort; the second EOF must close the pair.
    svc, client, ct, leg, bt = make_pair()
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    assert client.eof_received() is True
    assert bt.eof_written
    assert leg.eof_received() is False
    assert ct.closing and bt.closing
    await settle()
    assert svc.closed == [client]
    assert client.reason == CloseReason.CLIENT_CLOSED


@pytest.mark.asyncio
async def test_backend_eof_first_is_reported_as_backend_closed() -> None:
    svc, client, ct, leg, bt = make_pair()
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    assert leg.eof_received() is True
    assert ct.eof_written and not ct.closing
    assert client.eof_received() is False
    assert ct.closing and bt.closing
    await settle()
    assert client.reason == CloseReason.BACKEND_CLOSED
    assert svc.pool.backends[0].active == 0


@pytest.mark.asyncio
async def test_backpressure_pauses_the_other_side_only_on_state_change() -> None:
    svc, client, ct, leg, bt = make_pair()
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    # Backend's write buffer is full: stop reading from the client.
    leg.pause_writing()
    assert not ct.reading
    leg.resume_writing()
    assert ct.reading
    # Client's write buffer is full: stop reading from the backend.
    client.pause_writing()
    assert not bt.reading
    client.resume_writing()
    assert bt.reading


@pytest.mark.asyncio
async def test_a_talkative_client_is_paused_while_connecting() -> None:
    svc, client, ct, leg, bt = make_pair(high_water=1024, low_water=0)
    client.data_received(b"x" * 2000)
    assert not ct.reading
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    assert ct.reading and len(bt.buffer) == 2000


@pytest.mark.asyncio
async def test_reset_on_one_side_closes_the_other() -> None:
    svc, client, ct, leg, bt = make_pair()
    client._attach(svc.pool.backends[0], leg, bt)  # type: ignore[arg-type]
    ct.closing = True
    client.connection_lost(ConnectionResetError())
    assert bt.closing
    await settle()
    assert client.reason == CloseReason.CLIENT_RESET
    assert svc.closed == [client]


@pytest.mark.asyncio
async def test_limit_closes_new_client_at_once() -> None:
    svc = FakeService(max_connections=1)
    first = HandClientLeg(svc)  # type: ignore[arg-type]
    t1 = FakeTransport()
    t1.protocol = first
    first.connection_made(t1)  # type: ignore[arg-type]
    second = HandClientLeg(svc)  # type: ignore[arg-type]
    t2 = FakeTransport()
    t2.protocol = second
    second.connection_made(t2)  # type: ignore[arg-type]
    assert t2.closing and not t1.closing
    await settle()
    assert svc.ended[CloseReason.LIMIT] == 1

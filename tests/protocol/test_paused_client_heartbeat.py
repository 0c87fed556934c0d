"""A publisher the broker has blocked is not cut for heartbeat timeout (issue 25, item 1).

During a memory or disk alarm RabbitMQ stops reading a publishing connection. The proxy's leg towards it fills past
``high_water``, the proxy stops reading the client, and the client's heartbeats wait unread in its socket: that
silence is the proxy's doing, not the client's, and must not count. A client that is silent while the proxy reads
it is still cut. Real loopback sockets: a small AMQP-speaking backend that stops reading after the handshake.
"""

from __future__ import annotations

import asyncio

import pytest

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.relay import leg_state
from tests.support.net import tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for
from tests.unit.test_amqp_handshake import client_steps, server_steps

# More than the kernel's socket buffers on both sides of the proxy hold, so the proxy must pause the client.
PAYLOAD = 64 * 1024 * 1024
HIGH_WATER = 64 * 1024


@pytest.mark.asyncio
async def test_a_paused_client_is_not_cut_for_heartbeat_and_a_silent_one_still_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 1 s heartbeat watched at 1 x (2.5 x in production): the hold below is four timeouts long.
    monkeypatch.setattr(leg_state, "HEARTBEAT_FACTOR", 1.0)
    timeout = 1.0
    cs, ss = client_steps(heartbeat=1), server_steps()
    release = asyncio.Event()
    received = [0]

    async def blocking_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The handshake, turn by turn; then, like a broker under an alarm, read nothing until released.
        for client_turn, answer in zip(cs, ss, strict=True):
            await reader.readexactly(len(client_turn))
            writer.write(answer)
        await release.wait()
        while data := await reader.read(1 << 20):
            received[0] += len(data)

    async with (
        tcp_server(blocking_broker) as port,
        run_proxy(
            service_config(
                [{"name": "b", "address": "127.0.0.1", "port": port}], high_water=HIGH_WATER, low_water=HIGH_WATER // 4
            )
        ) as p,
    ):
        service = p.services["amqp"]
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        try:
            for turn, answer in zip(cs, ss, strict=True):
                writer.write(turn)
                await reader.readexactly(len(answer))
            conn = await wait_for(lambda: next(iter(service.connections), None), what="the connection")
            await wait_for(lambda: conn.idle_slot != 0, what="the heartbeat watch")

            async def publish() -> None:
                chunk = b"p" * (1 << 20)
                for _ in range(PAYLOAD // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()

            publisher = asyncio.create_task(publish())
            await wait_for(lambda: conn.reading_paused, what="the proxy pausing the client")
            # A bounded look for a close that must not come: four heartbeat timeouts while the client is paused.
            await asyncio.sleep(4 * timeout)
            assert not conn.closed and conn.reason is None, conn.reason
            assert conn.reading_paused, "the backend was released too early: the test proves nothing"
            release.set()
            await asyncio.wait_for(publisher, 60)
            await wait_for(lambda: received[0] == PAYLOAD, what="every byte at the backend")
            assert not conn.closed and service.ended[CloseReason.HEARTBEAT_TIMEOUT] == 0
            # Read again and silent from here on: the heartbeat timeout still cuts it.
            assert await asyncio.wait_for(reader.read(), 30) == b""
            await wait_for(lambda: service.ended[CloseReason.HEARTBEAT_TIMEOUT] == 1, what="the heartbeat timeout")
        finally:
            release.set()
            writer.close()

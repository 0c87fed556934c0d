"""A broker that stops reading (frozen with SIGSTOP) while data is in flight towards it (issue 12, defect 1)."""

from __future__ import annotations

import asyncio

import pytest
from pamqp.header import ProtocolHeader

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.net import push
from tests.support.process import open_fds
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_maint_on_a_frozen_broker_with_data_in_flight_ends_within_close_timeout(cluster: DevCluster) -> None:
    # The broker is frozen and the proxy's buffer towards it is full, so the flushing close that maint starts can
    # never finish: it used to keep the connection, both descriptors and the buffers for good.
    high = 64 * 1024
    close_timeout = 2.0
    node = cluster.nodes[2]
    async with run_proxy(
        service_config(backends_for(cluster)[2:], close_timeout=close_timeout, high_water=high, low_water=high // 4)
    ) as p:
        service = p.services["amqp"]
        backend = service.pool.by_name["rabbit3"]
        baseline = open_fds()
        reader, writer = await asyncio.open_connection(*listen_addr(p))
        pusher: asyncio.Task[None] | None = None
        try:
            writer.write(ProtocolHeader().marshal())
            # The broker's Connection.Start (a method frame) proves the path works before the node is frozen.
            start = await asyncio.wait_for(reader.read(65536), 30)
            assert start[:1] == b"\x01", start[:16]
            conn = next(iter(service.connections))
            cluster.pause(node)
            try:
                # Bytes the frozen broker will never read: the kernel's buffers fill, then the proxy's.
                pusher = asyncio.create_task(push(writer, 512 * 1024 * 1024))
                bt = conn.backend_transport
                assert bt is not None
                await wait_for(
                    lambda: conn.backend_full and bt.get_write_buffer_size() > 0, what="the buffer towards rabbit3 full"
                )
                assert backend.set_operator_state("maint", CloseReason.BACKEND_MAINT) == 1
                await wait_for(lambda: service.active == 0, timeout=close_timeout + 10, what="the connection ended")
            finally:
                cluster.resume(node)
            assert service.ended == {CloseReason.BACKEND_MAINT: 1}
            assert service.close_timeouts == 1
            assert backend.active == 0
            await asyncio.wait_for(pusher, 30)
        finally:
            if pusher is not None:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
            writer.close()
        await wait_for(lambda: open_fds() <= baseline, what=f"descriptors back to {baseline}")

"""SIGTERM on a real process, in one process and with workers: connections still open after ``shutdown_timeout``
are closed as every close is, flushing for up to ``close_timeout`` (issue 25, item 12).

The docs and the systemd unit size the stop on ``shutdown_timeout + close_timeout``; the code aborted the closes
after a fixed 2 s, and the parent killed its workers after ``shutdown_timeout + 5`` s, whatever ``close_timeout``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.net import free_port, tcp_server
from tests.support.process import ProxyProcess
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_factories=["asyncio"])]

BLOB = 32 * 1024 * 1024  # more than the kernel buffers hold between the proxy and a client that does not read
HIGH_WATER = 64 * 1024
SHUTDOWN_TIMEOUT = 0.5
CLOSE_TIMEOUT = 30.0
# Longer than both old limits (2 s for the flush, shutdown_timeout + 5 s before the parent killed a worker), far
# shorter than close_timeout.
SLOW_READER = 8.0


async def talker(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"b" * BLOB)
    await writer.drain()
    await asyncio.Event().wait()  # stays open: only the proxy's close ends this connection


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_flushes_to_a_slow_client_for_close_timeout(tmp_path: Path, workers: int) -> None:
    async with tcp_server(talker) as port:
        service = service_config(
            [{"name": "talker", "address": "127.0.0.1", "port": port}],
            protocol="tcp",
            high_water=HIGH_WATER,
            low_water=HIGH_WATER // 4,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
        )
        data = proxy_config(service, admin={"listen": f"127.0.0.1:{free_port()}"})
        data["workers"] = workers
        proxy = await asyncio.to_thread(ProxyProcess(data, tmp_path, log_level="info").start)
        try:
            # A client that reads nothing yet: the proxy's buffer towards it fills and stays full.
            reader, writer = await asyncio.open_connection(*proxy.addr)
            first = await asyncio.wait_for(reader.readexactly(1), 10)
            assert proxy.proc is not None
            proxy.proc.terminate()
            await wait_for(
                lambda: "shutting down" in proxy.log(), timeout=10, what="the shutdown to begin", interval=0.1
            )
            # A bounded look for an abort or a kill that must not come while the client is slow.
            await asyncio.sleep(SLOW_READER)
            assert proxy.proc.poll() is None, "the proxy gave up on the flush before close_timeout"
            received = len(first)
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
                received += len(chunk)
            writer.close()
            # A clean end (a reset would have raised above), after a prefix of what the backend sent.
            assert 0 < received <= BLOB
            assert await asyncio.to_thread(proxy.proc.wait, 30) == 0
            log = proxy.log()
            assert "reason=shutdown" in log and "close_timeout_expired" not in log
            assert "did not stop in time" not in log
        finally:
            await asyncio.to_thread(proxy.stop)

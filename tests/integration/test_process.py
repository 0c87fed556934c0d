"""``rabbitproxy serve`` as a real process: graceful SIGTERM, and connection churn without leaks or aborts."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import aio_pika
import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.logfmt import parse
from tests.support.net import tcp_server
from tests.support.process import ProxyProcess, fd_targets, open_fds
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for

LOOPS = ["uvloop", "asyncio"]


def refused(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_sigterm_refuses_new_connections_and_lets_open_ones_finish(
    cluster: DevCluster, tmp_path: Path, loop: str
) -> None:
    with ProxyProcess(
        proxy_config(service_config(backends_for(cluster), shutdown_timeout=120)), tmp_path, loop, "info"
    ) as proxy:
        host, port = proxy.addr
        conn = await aio_pika.connect(f"amqp://guest:guest@{host}:{port}/", timeout=30)
        try:
            ch = await conn.channel()
            queue = await ch.declare_queue("", exclusive=True)
            assert proxy.proc is not None
            proxy.proc.terminate()
            await wait_for(lambda: refused(proxy.addr), timeout=10, what="listener closed after SIGTERM")
            assert proxy.proc.poll() is None, "the proxy must wait for the open connection"
            # The open connection keeps working while the proxy drains.
            for i in range(100):
                await ch.default_exchange.publish(aio_pika.Message(b"%d" % i), routing_key=queue.name)
            for i in range(100):
                message = await wait_for(lambda: queue.get(fail=False), timeout=30, what="message")
                assert message.body == b"%d" % i
                await message.ack()
        finally:
            await conn.close()
        rc = await asyncio.to_thread(proxy.proc.wait, 60)
        assert rc == 0
        log = proxy.log()
        assert 'reason="client closed"' in log
        # Every line a real proxy wrote, from start to exit, reads back as logfmt.
        assert all(parse(line) for line in log.splitlines())


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_second_signal_exits_at_once(cluster: DevCluster, tmp_path: Path) -> None:
    with ProxyProcess(
        proxy_config(service_config(backends_for(cluster), shutdown_timeout=300)), tmp_path, "uvloop", "info"
    ) as proxy:
        host, port = proxy.addr
        conn = await aio_pika.connect(f"amqp://guest:guest@{host}:{port}/", timeout=30)
        try:
            assert proxy.proc is not None
            proxy.proc.terminate()
            await wait_for(lambda: refused(proxy.addr), timeout=10, what="listener closed after SIGTERM")
            assert proxy.proc.poll() is None, "still draining the open connection"
            proxy.proc.terminate()
            # Well before the 300 s grace period: the operator asked twice.
            rc = await asyncio.to_thread(proxy.proc.wait, 30)
            assert rc == 1
            assert "second signal" in proxy.log()
        finally:
            await conn.close()


async def churn_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # First byte says who ends the connection: b"b" the backend (after its reply), b"c" the client, b"r" the
    # client with a reset.
    cmd = await reader.readexactly(1)
    writer.write(b"ok")
    await writer.drain()
    if cmd == b"b":
        return  # the helper closes the writer: the backend ends it
    await reader.read()  # wait for the client's EOF (or reset)


async def one_connection(addr: tuple[str, int], cmd: bytes) -> None:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(cmd)
        assert await reader.readexactly(2) == b"ok"
        if cmd == b"b":
            assert await reader.read() == b""
        elif cmd == b"r":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_churn_twenty_thousand_short_connections(tmp_path: Path, loop: str) -> None:
    total = 20_000
    async with tcp_server(churn_backend) as port:
        config = proxy_config(
            service_config(
                [{"name": "sink", "address": "127.0.0.1", "port": port}], backlog=4096, shutdown_timeout=30.0
            )
        )
        with ProxyProcess(config, tmp_path, loop, "warning") as proxy:
            # Descriptors of an idle proxy (listener, loop internals); a warm-up connection must give them back.
            baseline = open_fds(proxy.pid)
            before = fd_targets(proxy.pid)
            await one_connection(proxy.addr, b"b")
            try:
                # "<=": the proxy closes the socket it announced READY=1 through just after sending, so the first
                # count may include it. The idle count measured after the warm-up is the baseline from then on.
                await wait_for(lambda: open_fds(proxy.pid) <= baseline, timeout=30, what="warm-up connection released")
            except AssertionError as exc:
                # Say which descriptors differ, so a failure on a busy CI machine explains itself.
                raise AssertionError(f"{exc}\nbefore: {before}\nafter: {fd_targets(proxy.pid)}") from None
            baseline = open_fds(proxy.pid)
            sem = asyncio.Semaphore(64)
            errors: list[BaseException] = []

            async def limited(i: int) -> None:
                # Half closed by the backend, half by the client, and every tenth client one resets instead.
                cmd = b"b" if i % 2 else (b"r" if i % 10 == 0 else b"c")
                async with sem:
                    try:
                        await one_connection(proxy.addr, cmd)
                    except (OSError, asyncio.IncompleteReadError, AssertionError) as exc:
                        errors.append(exc)

            for start in range(0, total, 2000):
                await asyncio.gather(*(limited(i) for i in range(start, start + 2000)))
                assert proxy.proc is not None and proxy.proc.poll() is None, proxy.log()[-3000:]
            assert errors == []
            assert proxy.proc is not None and proxy.proc.poll() is None
            await wait_for(lambda: open_fds(proxy.pid) == baseline, timeout=30, what="descriptors back to baseline")
            # Still serving after the churn.
            await one_connection(proxy.addr, b"b")
            assert proxy.stop() == 0

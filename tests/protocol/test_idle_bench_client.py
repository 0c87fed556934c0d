"""The idle bench's minimal AMQP client, against a fake broker in this loop: handshake, heartbeats, polite close."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pamqp import commands, frame, heartbeat

from tests.support.bench import idle_bench
from tests.support.waiting import wait_for


class Counter:
    """What ``multiprocessing.Value`` offers the worker: ``value`` and ``get_lock()``."""

    def __init__(self) -> None:
        self.value = 0

    @contextlib.contextmanager
    def get_lock(self) -> Iterator[None]:
        yield


class FakeBroker:
    """Answers the AMQP handshake as RabbitMQ does and records what each client sent afterwards."""

    def __init__(self) -> None:
        self.start_oks: list[commands.Connection.StartOk] = []
        self.tune_oks: list[commands.Connection.TuneOk] = []
        self.heartbeats = 0
        self.closes = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(8)
        assert header == b"AMQP\x00\x00\x09\x01"
        writer.write(frame.marshal(commands.Connection.Start(), 0))
        buf = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
            while buf:
                try:
                    used, _channel, value = frame.unmarshal(buf)
                except Exception:  # noqa: BLE001 - pamqp says "need more bytes" with an exception
                    break
                buf = buf[used:]
                if isinstance(value, commands.Connection.StartOk):
                    self.start_oks.append(value)
                    tune = commands.Connection.Tune(channel_max=2047, frame_max=131072, heartbeat=60)
                    writer.write(frame.marshal(tune, 0))
                elif isinstance(value, commands.Connection.TuneOk):
                    self.tune_oks.append(value)
                elif isinstance(value, commands.Connection.Open):
                    writer.write(frame.marshal(commands.Connection.OpenOk(), 0))
                elif isinstance(value, heartbeat.Heartbeat):
                    self.heartbeats += 1
                    # Brokers heartbeat too; the idle client must ignore these once open.
                    writer.write(frame.marshal(heartbeat.Heartbeat(), 0))
                elif isinstance(value, commands.Connection.Close):
                    self.closes += 1
                    writer.write(frame.marshal(commands.Connection.CloseOk(), 0))
        writer.close()


@pytest.mark.asyncio
async def test_idle_clients_open_with_the_heartbeat_asked_for_heartbeat_and_close_politely() -> None:
    broker = FakeBroker()
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = idle_bench.Settings(connections=6, heartbeat=1, user="u", password="p")
    job = idle_bench.Job(urls=(("127.0.0.1", port),), first=0, count=6, settings=settings)
    opened, failed, stop = Counter(), Counter(), threading.Event()
    try:
        hold = asyncio.create_task(idle_bench._hold(job, opened, failed, stop))
        await wait_for(lambda: opened.value == 6, timeout=30)
        # With a 1 s heartbeat every client sends one each half second: several per client well within the deadline.
        await wait_for(lambda: broker.heartbeats >= 3 * 6, timeout=30)
        stop.set()
        result: dict[str, Any] = await asyncio.wait_for(hold, 30)
    finally:
        server.close()
        await server.wait_closed()
    assert result == {"opened": 6, "lost": 0, "error_kinds": {}}
    assert failed.value == 0
    assert [t.heartbeat for t in broker.tune_oks] == [1] * 6
    assert {s.response for s in broker.start_oks} == {"\0u\0p"}
    assert broker.closes == 6


@pytest.mark.asyncio
async def test_a_refused_connection_counts_as_failed_not_as_held() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = idle_bench.Settings(connections=3, heartbeat=1)
    job = idle_bench.Job(urls=(("127.0.0.1", port),), first=0, count=3, settings=settings)
    opened, failed, stop = Counter(), Counter(), threading.Event()
    stop.set()
    try:
        result = await asyncio.wait_for(idle_bench._hold(job, opened, failed, stop), 60)
    finally:
        server.close()
        await server.wait_closed()
    assert result["opened"] == 0
    assert failed.value == 3
    assert sum(result["error_kinds"].values()) == 3

"""``rabbitproxy demo``: a local cluster with the proxy in front, usable by an AMQP client, gone after Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest

from tests.support.net import free_port
from tests.support.waiting import wait_for, wait_for_sync


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_demo_serves_amqp_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    listen, admin = free_port(), free_port()
    notify_path = tmp_path / "notify"
    log_path = tmp_path / "demo.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log_path.open("wb") as log:
        notify.bind(str(notify_path))
        notify.settimeout(0.5)
        # One node keeps this test quick; clustering itself is covered by the devcluster tests.
        proc = subprocess.Popen(
            [sys.executable, "-m", "rabbitproxy", "demo", "--nodes", "1",
             "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)),
        )  # fmt: skip
        try:

            def ready() -> bool:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    return notify.recv(64) == b"READY=1"
                except TimeoutError:
                    return False

            await asyncio.to_thread(wait_for_sync, ready, 180, 0.0, "demo ready")
            text = log_path.read_text()
            assert f"amqp://guest:guest@127.0.0.1:{listen}/" in text
            node_ports = [int(p) for p in re.findall(r": amqp (\d+), management", text)]
            assert len(node_ports) == 1

            conn = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{listen}/", timeout=30)
            try:
                ch = await conn.channel()
                queue = await ch.declare_queue("", exclusive=True)
                await ch.default_exchange.publish(aio_pika.Message(b"hello through the demo"), routing_key=queue.name)
                message = await wait_for(lambda: queue.get(fail=False), what="message")
                assert message.body == b"hello through the demo"
                await message.ack()
            finally:
                await conn.close()

            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            rc = await asyncio.to_thread(proc.wait, 120)
            assert rc == 0, log_path.read_text()[-3000:]
            assert not port_open(listen)
            assert not any(port_open(p) for p in node_ports), "the demo's RabbitMQ node outlived it"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

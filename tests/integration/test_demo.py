"""``rabbitproxy demo``: a local cluster with the proxy in front, usable by an AMQP client, gone after Ctrl-C.

The demo runs with ``[services.rabbitmq]`` on and prints what to try; the commands it prints are run here as
printed (from a shell) and must do what the demo says: list the connection, raise and clear a memory alarm the
proxy sees, and put the node in maintenance mode and back.
"""

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
import aiohttp
import pytest

from tests.support.metrics import metric
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
        # Two nodes: on 3.10 a node in maintenance mode is told apart from a dead one only by a peer that reports
        # it running. Clustering itself is covered by the devcluster tests.
        proc = subprocess.Popen(
            [sys.executable, "-m", "rabbitproxy", "demo", "--nodes", "2",
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
            assert len(node_ports) == 2

            conn = await aio_pika.connect(
                f"amqp://guest:guest@127.0.0.1:{listen}/", timeout=30, client_properties={"connection_name": "demo-1"}
            )
            try:
                ch = await conn.channel()
                queue = await ch.declare_queue("", exclusive=True)
                await ch.default_exchange.publish(aio_pika.Message(b"hello through the demo"), routing_key=queue.name)
                message = await wait_for(lambda: queue.get(fail=False), what="message")
                assert message.body == b"hello through the demo"
                await message.ack()
                await try_what_the_demo_prints(text, admin)
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


def printed(text: str, *words: str) -> str:
    """The one command line of the demo's "what to try" that contains every one of ``words``."""
    lines = [line.strip() for line in text.splitlines() if line.startswith("    ") and all(w in line for w in words)]
    assert len(lines) == 1, (words, lines)
    return lines[0]


async def run_printed(line: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run, line, shell=True, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done.stdout


async def try_what_the_demo_prints(text: str, admin: int) -> None:
    assert "What to try" in text
    async with aiohttp.ClientSession() as http:

        async def sample(name: str, **labels: str) -> float | None:
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
                body = await r.text()
            try:
                return metric(body, name, service="amqp", **labels)
            except AssertionError:
                return None

        async def becomes(value: float, name: str, **labels: str) -> None:
            async def reached() -> bool:
                return await sample(name, **labels) == value

            await wait_for(reached, timeout=120, what=f"{name}{labels} == {value}")

        # [services.rabbitmq] is on: the node monitor reads each node's own management API. The demo raises the
        # alarm on rabbit1 and puts the last node, rabbit2, in maintenance.
        for backend in ("rabbit1", "rabbit2"):
            await becomes(1, "rabbitproxy_backend_rabbitmq_management_up", backend=backend)
        listing = await run_printed(printed(text, " connections --admin "))
        assert "demo-1" in listing and "guest" in listing

        await run_printed(printed(text, "rabbitmqctl", "set_vm_memory_high_watermark 0.0000001"))
        await becomes(1, "rabbitproxy_backend_rabbitmq_alarm", backend="rabbit1", kind="memory")
        await run_printed(printed(text, "rabbitmqctl", "set_vm_memory_high_watermark absolute"))
        await becomes(0, "rabbitproxy_backend_rabbitmq_alarm", backend="rabbit1", kind="memory")

        await run_printed(printed(text, "rabbitmq-upgrade", "drain"))
        await becomes(1, "rabbitproxy_backend_status", backend="rabbit2", status="maintenance")
        await run_printed(printed(text, "rabbitmq-upgrade", "revive"))
        await becomes(1, "rabbitproxy_backend_status", backend="rabbit2", status="up")

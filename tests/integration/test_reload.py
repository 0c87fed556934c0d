"""Hitless reload: clients keep publishing through a real ``rabbitproxy serve`` process while its configuration file
is rewritten and reloaded again and again, by SIGHUP and through the admin API."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.net import free_port
from tests.support.process import ProxyProcess, running_loop_name, to_toml
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for

PUBLISHERS = 4


class Publisher:
    """One AMQP connection publishing numbered messages with publisher confirms until told to stop."""

    def __init__(self, url: str, queue: str, index: int) -> None:
        self.url = url
        self.queue = queue
        self.index = index
        self.confirmed: list[str] = []
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.stop = asyncio.Event()

    async def run(self) -> None:
        self.connection = await aio_pika.connect(self.url)
        channel = await self.connection.channel(publisher_confirms=True)
        n = 0
        while not self.stop.is_set():
            body = f"{self.index}-{n}"
            await channel.default_exchange.publish(aio_pika.Message(body.encode()), routing_key=self.queue)
            self.confirmed.append(body)
            n += 1


@pytest.mark.asyncio
async def test_reload_under_traffic_loses_no_connection_and_no_message(broker: DevCluster, tmp_path: Path) -> None:
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    amqp_port, spare_port, spare_port2, extra_port = (free_port() for _ in range(4))
    nodes = backends_for(broker)

    def service(name: str, port: int, backends: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return service_config(backends, name=name, listen=f"127.0.0.1:{port}", shutdown_timeout=60.0, **extra)

    def config(*services: dict[str, Any]) -> dict[str, Any]:
        return proxy_config(*services, admin={"listen": f"127.0.0.1:{admin_port}"})

    base = config(service("amqp", amqp_port, nodes), service("spare", spare_port, nodes[:1]))
    proc = ProxyProcess(base, tmp_path, loop=running_loop_name()).start()
    queue = f"reload-{uuid.uuid4().hex[:8]}"
    publishers = [Publisher(f"amqp://guest:guest@127.0.0.1:{amqp_port}/", queue, i) for i in range(PUBLISHERS)]
    tasks: list[asyncio.Task[None]] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def services() -> dict[str, Any]:
                async with http.get(f"{admin}/api/services") as resp:
                    return {s["name"]: s for s in (await resp.json())["services"]}

            async def api_reload(expect: int = 200) -> dict[str, Any]:
                async with http.post(f"{admin}/api/reload", json={}) as resp:
                    assert resp.status == expect, await resp.text()
                    result: dict[str, Any] = await resp.json()
                    return result

            def write(cfg: dict[str, Any]) -> None:
                proc.config_path.write_text(to_toml(cfg))

            async def traffic_flows() -> None:
                # Between two reloads every publisher gets a number of confirms: the reloads happen under load.
                marks = [len(p.confirmed) for p in publishers]
                await wait_for(
                    lambda: all(len(p.confirmed) >= m + 20 for p, m in zip(publishers, marks, strict=True)),
                    timeout=60,
                    what="every publisher making progress",
                )

            setup = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{amqp_port}/")
            setup_channel = await setup.channel()
            await setup_channel.declare_queue(queue, durable=False, auto_delete=False)
            # A client on the service whose listen address will move: it must survive the move.
            spare_client = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{spare_port}/")
            tasks = [asyncio.create_task(p.run()) for p in publishers]
            await traffic_flows()

            # 1. API: re-weight a backend.
            write(config(service("amqp", amqp_port, [{**nodes[0], "weight": 50}, *nodes[1:]]), base["services"][1]))
            assert (await api_reload())["changed"] == ["amqp"]
            assert (await services())["amqp"]["backends"][0]["weight"] == 50
            await traffic_flows()

            # 2. SIGHUP: remove a backend that has publishers on it; they stay connected.
            write(config(service("amqp", amqp_port, nodes[:2]), base["services"][1]))
            proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            await wait_for(lambda: _len_backends(services(), "amqp", 2), what="rabbit3 removed by SIGHUP")
            await traffic_flows()

            # 3. An operator drains rabbit2; a reload that brings rabbit3 back keeps that drain.
            async with http.patch(f"{admin}/api/services/amqp/backends/rabbit2", json={"state": "drain"}) as resp:
                assert resp.status == 200
            write(config(service("amqp", amqp_port, nodes), base["services"][1]))
            await api_reload()
            amqp_now = (await services())["amqp"]
            assert [b["status"] for b in amqp_now["backends"]] == ["up", "drain", "up"]
            await traffic_flows()

            # 4. SIGHUP: add a service and a client on it; move spare's listener.
            extra = service("extra", extra_port, nodes[1:])
            moved_spare = service("spare", spare_port2, nodes[:1])
            write(config(service("amqp", amqp_port, nodes), moved_spare, extra))
            proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            await wait_for(lambda: _has(services(), "extra"), what="service extra added by SIGHUP")
            extra_client = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{extra_port}/")
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", spare_port)
            moved_client = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{spare_port2}/")
            await traffic_flows()

            # 5. Invalid files, by API and by SIGHUP: refused, logged, nothing changes.
            before = await services()
            proc.config_path.write_text('[[services]]\nname = "amqp"\nlisten = "127.0.0.1:1"\nbackends = []\n')
            refused = await api_reload(expect=400)
            assert any(e.startswith("services['amqp'].backends:") for e in refused["errors"])
            proc.config_path.write_text("this is not toml [")
            proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            await wait_for(lambda: "TOML syntax" in proc.log(), what="the refused SIGHUP reload in the log")
            after = await services()
            assert set(after) == set(before) == {"amqp", "spare", "extra"}
            assert [b["status"] for b in after["amqp"]["backends"]] == ["up", "drain", "up"]
            await traffic_flows()

            # 6. API: remove the extra service; its open client stays until it leaves by itself.
            write(config(service("amqp", amqp_port, nodes), moved_spare))
            assert (await api_reload())["removed"] == ["extra"]
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", extra_port)
            extra_channel = await extra_client.channel()
            await extra_channel.declare_queue(exclusive=True)
            await traffic_flows()

            for p in publishers:
                p.stop.set()
            await asyncio.gather(*tasks)
            # No connection was lost: every client is still connected after all six reloads.
            assert all(p.connection is not None and p.connection.connected.is_set() for p in publishers)
            for c in (spare_client, moved_client, extra_client, setup):
                assert c.connected.is_set()
            for c in (spare_client, moved_client, extra_client):
                await c.close()

            # No message was lost: every confirmed message is in the queue, once.
            published = {body for p in publishers for body in p.confirmed}
            assert len(published) == sum(len(p.confirmed) for p in publishers)
            received: list[str] = []
            q = await setup_channel.get_queue(queue)
            async with q.iterator() as it:
                async for message in it:
                    async with message.process():
                        received.append(message.body.decode())
                    if len(received) == len(published):
                        break
            assert sorted(received) == sorted(published)
            await setup_channel.queue_delete(queue)
            await setup.close()
            for p in publishers:
                assert p.connection is not None
                await p.connection.close()
            assert "Traceback" not in proc.log()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert proc.stop() == 0


async def _len_backends(services: Any, name: str, n: int) -> bool:
    return len((await services)[name]["backends"]) == n


async def _has(services: Any, name: str) -> bool:
    return name in await services


def test_reload_command_without_a_running_proxy_fails_clearly() -> None:
    # The CLI half of `rabbitproxy reload`: unreachable admin API -> non-zero exit and a message, no traceback.
    from typer.testing import CliRunner

    from rabbitproxy.cli import app

    res = CliRunner().invoke(app, ["reload", "--admin", f"127.0.0.1:{free_port()}"])
    assert res.exit_code == 1
    assert res.output.startswith("error: cannot reach the admin API")

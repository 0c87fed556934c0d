"""``rabbitproxy agent`` as a real process, polled by a real ``rabbitproxy serve`` in front of the cluster."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.protocols.agent_reply import parse_agent_reply
from tests.support.cluster import backends_for
from tests.support.net import free_port
from tests.support.process import ProxyProcess
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for, wait_for_sync

POLL = 0.5
POLL_TIMEOUT = 1.0
# What the issue promises (a state-file change shows within one agent interval), plus the time a busy machine
# may take to run the poll.
STATE_WITHIN = POLL + POLL_TIMEOUT
SCHEDULING_SLACK = 2.0


@contextmanager
def agent_process(tmp_path: Path, *args: str) -> Iterator[tuple[str, int]]:
    """Run ``rabbitproxy agent`` on a free port until the block ends; yields its address."""
    port = free_port()
    log_path = tmp_path / f"agent-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rabbitproxy", "agent", "--listen", f"127.0.0.1:{port}", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_sync(lambda: _listening(proc, port, log_path), timeout=30, what="agent listening")
            yield "127.0.0.1", port
        finally:
            proc.terminate()
            try:
                assert proc.wait(30) == 0, log_path.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()


def _listening(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"agent exited with {proc.returncode}:\n{log_path.read_text()}")
    return f"127.0.0.1:{port}" in log_path.read_text()


async def _tcp_reply(addr: tuple[str, int]) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _proxy_config(cluster: DevCluster, agent_port: int, feedback_type: str) -> dict[str, Any]:
    backend = backends_for(cluster)[0] | {"agent_port": agent_port}
    service = service_config(
        [backend],
        health_check={"type": "amqp", "interval": 0.5, "timeout": 2.0, "rise": 1},
        feedback={"type": feedback_type, "interval": POLL, "timeout": POLL_TIMEOUT},
        shutdown_timeout=30.0,
    )
    return proxy_config(service, admin={"listen": f"127.0.0.1:{free_port()}"})


async def _backend_view(http: aiohttp.ClientSession, config: dict[str, Any]) -> dict[str, Any]:
    url = f"http://{config['admin']['listen']}/api/services/amqp/backends/rabbit1"
    async with http.get(url) as resp:
        assert resp.status == 200
        view: dict[str, Any] = await resp.json()
        return view


@pytest.mark.asyncio
async def test_plain_agent_answers_in_the_loadbalancer_org_format(tmp_path: Path) -> None:
    with agent_process(tmp_path, "--loop", "asyncio") as addr:
        line = await _tcp_reply(addr)
        assert re.fullmatch(rb"(100|[1-9]?[0-9])%\n", line), line
        reply = parse_agent_reply(line)
        assert reply.percent is not None and reply.admin is None and reply.health is None


@pytest.mark.asyncio
async def test_agent_is_polled_by_serve_and_the_state_file_drains_within_one_interval(
    cluster: DevCluster, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with agent_process(tmp_path, "--state-file", str(state)) as (_, port):
        config = _proxy_config(cluster, port, "agent")
        async with aiohttp.ClientSession() as http:
            with ProxyProcess(config, tmp_path, "uvloop", "info") as proxy:
                view = await wait_for(
                    lambda: _ready_with_figure(http, config), timeout=30, what="agent figure applied by serve"
                )
                assert re.fullmatch(r"up ready (100|[1-9]?[0-9])%", view["agent"]["reply"])
                assert view["effective_weight"] == view["weight"] * view["agent"]["percent"] // 100

                state.write_text("drain\n")
                began = time.monotonic()
                await wait_for(
                    lambda: _admin_state_is(http, config, "drain"),
                    timeout=STATE_WITHIN + SCHEDULING_SLACK,
                    interval=0.05,
                    what="drain from the state file",
                )
                print(f"state-file drain applied after {time.monotonic() - began:.2f}s (poll interval {POLL}s)")
                state.write_text("ready\n")
                await wait_for(lambda: _admin_state_is(http, config, "ready"), timeout=10, what="ready again")
                assert "backend admin state changed" in proxy.log()


async def _ready_with_figure(http: aiohttp.ClientSession, config: dict[str, Any]) -> dict[str, Any] | None:
    try:
        view = await _backend_view(http, config)
    except aiohttp.ClientConnectorError:
        # The admin API starts listening just after the proxy's own listener.
        return None
    ok = view["health"]["status"] == "up" and view["agent"]["status"] == "ok" and view["agent"]["percent"] is not None
    return view if ok else None


async def _admin_state_is(http: aiohttp.ClientSession, config: dict[str, Any], state: str) -> bool:
    return (await _backend_view(http, config))["admin_state"] == state


@pytest.mark.asyncio
async def test_http_agent_is_polled_by_serve(cluster: DevCluster, tmp_path: Path) -> None:
    with agent_process(tmp_path, "--http", "--metric", "max") as (host, port):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}:{port}/") as resp:
                assert resp.status == 200
                body = await resp.text()
            assert re.fullmatch(r"(100|[1-9]?[0-9])\n", body), body
            config = _proxy_config(cluster, port, "http")
            with ProxyProcess(config, tmp_path, "asyncio", "info"):
                view = await wait_for(lambda: _ready_with_figure(http, config), timeout=30, what="HTTP agent figure")
                assert view["agent"]["reply"] == str(view["agent"]["percent"])


@pytest.mark.asyncio
async def test_rabbitmq_aware_agent_drains_during_a_disk_alarm(cluster: DevCluster, tmp_path: Path) -> None:
    node = cluster.nodes[2]
    url = f"http://guest:guest@127.0.0.1:{node.management_port}/"
    with agent_process(tmp_path, "--rabbitmq", url) as addr:
        line = await _tcp_reply(addr)
        assert re.fullmatch(rb"up ready (100|[1-9]?[0-9])%\n", line), line
        # A disk limit far above the free space raises the alarm on this node only; it is put back at once.
        await asyncio.to_thread(cluster.rabbitmqctl, node, "set_disk_free_limit", "100000GB")
        try:
            await wait_for(lambda: _reply_is(addr, b"drain\n"), timeout=30, interval=0.5, what="drain during the alarm")
        finally:
            await asyncio.to_thread(cluster.rabbitmqctl, node, "set_disk_free_limit", "50MB")
        await wait_for(
            lambda: _reply_matches(addr, rb"up ready (100|[1-9]?[0-9])%\n"),
            timeout=30,
            interval=0.5,
            what="ready after the alarm cleared",
        )


async def _reply_is(addr: tuple[str, int], expected: bytes) -> bool:
    return await _tcp_reply(addr) == expected


async def _reply_matches(addr: tuple[str, int], pattern: bytes) -> bool:
    return re.fullmatch(pattern, await _tcp_reply(addr)) is not None

"""Who is connected, failed logins and the heartbeat timeout, with real clients through a real proxy process.

pika and aio-pika clients log in as a user made for the test, in a vhost made for the test, with a connection name;
the proxy's ``connection closed`` events, its warnings and /metrics must show them, and the password nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pika
import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.amqp import client_dead
from tests.support.cluster import backends_for
from tests.support.net import free_port
from tests.support.process import ProxyProcess
from tests.support.proxy import service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

USER = "orders-app"
SECRET = "Pw-9c1f2e-never-logged"
VHOST = "orders-vh"


@contextlib.contextmanager
def _tenant_on(cluster: DevCluster) -> Iterator[None]:
    """The test's vhost and user on ``cluster``, removed afterwards."""
    node = cluster.nodes[0]
    cluster.rabbitmqctl(node, "add_vhost", VHOST)
    cluster.rabbitmqctl(node, "add_user", USER, SECRET)
    cluster.rabbitmqctl(node, "set_permissions", "-p", VHOST, USER, ".*", ".*", ".*")
    try:
        yield
    finally:
        cluster.rabbitmqctl(node, "delete_user", USER)
        cluster.rabbitmqctl(node, "delete_vhost", VHOST)


@pytest.fixture
def tenant(broker: DevCluster) -> Iterator[None]:
    # Per test: broker is a per-test parameter (3.10, then 4.0).
    with _tenant_on(broker):
        yield


@pytest.fixture(scope="module")
def tenant_310(cluster: DevCluster) -> Iterator[None]:
    with _tenant_on(cluster):
        yield


def loop_name() -> str:
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def start_proxy(cluster: DevCluster, tmp_path: Path) -> tuple[ProxyProcess, str]:
    admin = f"127.0.0.1:{free_port()}"
    config = {
        "admin": {"listen": admin},
        "log": {"format": "json"},
        "services": [service_config(backends_for(cluster))],
    }
    return ProxyProcess(config, tmp_path, loop_name(), "info").start(), f"http://{admin}/metrics"


def events(proxy: ProxyProcess, event: str) -> list[dict[str, Any]]:
    out = []
    for line in proxy.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


def closed_named(proxy: ProxyProcess, name: str) -> dict[str, Any] | None:
    return next((e for e in events(proxy, "connection closed") if e.get("connection_name") == name), None)


def metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def pika_params(
    proxy: ProxyProcess, name: str, password: str = SECRET, heartbeat: int = 30
) -> pika.ConnectionParameters:
    host, port = proxy.addr
    return pika.ConnectionParameters(
        host=host,
        port=port,
        virtual_host=VHOST,
        credentials=pika.PlainCredentials(USER, password),
        client_properties={"connection_name": name},
        heartbeat=heartbeat,
        connection_attempts=1,
        socket_timeout=30,
    )


def pika_round_trip(params: pika.ConnectionParameters) -> None:
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.queue_declare("", exclusive=True)
    finally:
        conn.close()


async def test_identity_is_in_the_log_and_metrics_and_the_password_nowhere(
    broker: DevCluster, tenant: None, tmp_path: Path
) -> None:
    # On 3.10 and 4.0 (the broker fixture): the handshake the reader follows is the broker's as much as the client's.
    proxy, metrics_url = start_proxy(broker, tmp_path)
    try:
        host, port = proxy.addr
        aconn = await aio_pika.connect(
            f"amqp://{USER}:{SECRET}@{host}:{port}/{VHOST}",
            client_properties={"connection_name": "aio-writer"},
            timeout=30,
        )
        try:
            page = await wait_for(
                lambda: (lambda m: m if f'vhost="{VHOST}"}} 1.0' in m else None)(metrics(metrics_url)),
                what="the vhost's open connection in /metrics",
            )
            assert SECRET not in page
        finally:
            await aconn.close()
        await asyncio.to_thread(pika_round_trip, pika_params(proxy, "pika-reader"))
        aio_event = await wait_for(lambda: closed_named(proxy, "aio-writer"), what="aio-pika's connection closed")
        pika_event = await wait_for(lambda: closed_named(proxy, "pika-reader"), what="pika's connection closed")
        for event, product in ((aio_event, "aiormq"), (pika_event, "Pika Python Client Library")):
            assert (event["user"], event["vhost"], event["reason"]) == (USER, VHOST, "client closed")
            assert event["client_product"] == product and event["client_version"]
            assert isinstance(event["heartbeat"], int)
            assert event["client"].startswith("127.0.0.1:")
        assert pika_event["heartbeat"] == 30
        assert SECRET not in proxy.log()
        assert SECRET not in metrics(metrics_url)
    finally:
        proxy.stop()
    assert SECRET not in proxy.log()


async def test_a_wrong_password_is_a_failed_login_with_the_clients_address(
    broker: DevCluster, tenant: None, tmp_path: Path
) -> None:
    proxy, metrics_url = start_proxy(broker, tmp_path)
    wrong = "Wrong-7f3a-password"
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            await asyncio.to_thread(pika_round_trip, pika_params(proxy, "bad-login", password=wrong))
        warning = (await wait_for(lambda: events(proxy, "login refused by the broker"), what="the warning"))[0]
        assert (warning["user"], warning["code"], warning["level"]) == (USER, 403, "warning")
        assert warning["client"].startswith("127.0.0.1:") and warning["backend"].startswith("rabbit")
        event = await wait_for(lambda: closed_named(proxy, "bad-login"), what="the refused connection closed")
        assert (event["refused_code"], event["user"]) == (403, USER)
        assert event["client"] == warning["client"]
        assert 'rabbitproxy_service_failed_logins_total{service="amqp"} 1.0' in metrics(metrics_url)
        assert wrong not in proxy.log() and SECRET not in proxy.log()
    finally:
        proxy.stop()


# A pika client with heartbeat 2 that says "ready" once connected and then only sleeps (pika's sleep heartbeats).
FROZEN_CLIENT = """
import sys, pika
params = pika.ConnectionParameters(host=sys.argv[1], port=int(sys.argv[2]), virtual_host=sys.argv[3],
    credentials=pika.PlainCredentials(sys.argv[4], sys.argv[5]), heartbeat=2,
    client_properties={"connection_name": "frozen"}, connection_attempts=1, socket_timeout=30)
conn = pika.BlockingConnection(params)
print("ready", flush=True)
while True:
    conn.sleep(0.5)
"""


async def test_a_frozen_client_is_closed_by_heartbeat_and_a_heartbeating_one_lives_on(
    cluster: DevCluster, tenant_310: None, tmp_path: Path
) -> None:
    # Timing is the proxy's alone here (the broker only has to answer heartbeats), so 3.10 suffices: 22 s a run.
    proxy, _ = start_proxy(cluster, tmp_path)
    host, port = proxy.addr
    frozen = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CLIENT, host, str(port), VHOST, USER, SECRET],
        stdout=subprocess.PIPE,
        env=dict(os.environ),
    )
    idle: aio_pika.abc.AbstractConnection | None = None
    try:
        assert frozen.stdout is not None
        ready = await asyncio.wait_for(asyncio.to_thread(frozen.stdout.readline), 60)
        assert ready.strip() == b"ready"
        idle = await aio_pika.connect(
            f"amqp://{USER}:{SECRET}@{host}:{port}/{VHOST}?heartbeat=2",
            client_properties={"connection_name": "idle-but-alive"},
            timeout=30,
        )
        idle_since = time.monotonic()
        frozen.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        event = await wait_for(lambda: closed_named(proxy, "frozen"), timeout=60, what="the frozen client closed")
        waited = time.monotonic() - stopped
        assert event["reason"] == "heartbeat timeout", event
        assert event["heartbeat"] == 2
        # 2.5 x 2 s after its last heartbeat, which it sent at most a second before it froze; the upper bound
        # only says "not by some other, much later mechanism" (TCP keepalive would take minutes).
        assert waited < 30, waited
        # The idle client heartbeats on its own; 20 s and more later it is still there and still works.
        remaining = 22 - (time.monotonic() - idle_since)
        if remaining > 0:
            await asyncio.sleep(remaining)
        assert not client_dead(idle)
        channel = await idle.channel()
        await channel.declare_queue("", exclusive=True)
        assert closed_named(proxy, "idle-but-alive") is None
    finally:
        if idle is not None and not client_dead(idle):
            await idle.close()
        frozen.kill()
        frozen.wait()
        if frozen.stdout is not None:
            frozen.stdout.close()
        proxy.stop()
    assert SECRET not in proxy.log()

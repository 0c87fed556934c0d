"""DevCluster against the real Debian RabbitMQ: clustering, connection counting and failure injection."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import aio_pika
import psutil
import pytest

from rabbitproxy.dev import cluster as devcluster
from rabbitproxy.dev.cluster import DevCluster, Node, RabbitMQNotInstalled, rabbitmq_installed
from tests.support.waiting import wait_for

needs_rabbitmq = pytest.mark.skipif(not rabbitmq_installed(), reason="rabbitmq-server is not installed")


# The `cluster` fixture is the session-wide three-node cluster from tests/integration/conftest.py. Tests here
# pause, kill and restart its nodes and must leave all of them running.


def running_nodes(cluster: DevCluster, node: Node) -> set[str]:
    status = json.loads(cluster.rabbitmqctl(node, "cluster_status", "--formatter", "json"))
    return set(status["running_nodes"])


@needs_rabbitmq
def test_every_node_sees_all_members(cluster: DevCluster) -> None:
    names = {node.name for node in cluster.nodes}
    assert len(names) == 3
    for node in cluster.nodes:
        status = json.loads(cluster.rabbitmqctl(node, "cluster_status", "--formatter", "json"))
        assert set(status["disk_nodes"]) == names
        assert set(status["running_nodes"]) == names
    ports = [port for node in cluster.nodes for port in (node.amqp_port, node.management_port, node.dist_port)]
    assert len(set(ports)) == len(ports)
    assert not {5672, 15672, 25672} & set(ports)


@needs_rabbitmq
def test_management_api_answers_on_every_node(cluster: DevCluster) -> None:
    credentials = base64.b64encode(b"guest:guest").decode()
    for node in cluster.nodes:
        request = urllib.request.Request(
            cluster.management_url(node) + "api/nodes", headers={"Authorization": f"Basic {credentials}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            listed = json.load(response)
        assert {entry["name"] for entry in listed} == {n.name for n in cluster.nodes}


@needs_rabbitmq
@pytest.mark.asyncio
async def test_queue_declared_on_one_node_is_usable_through_the_others(cluster: DevCluster) -> None:
    first, second, third = cluster.nodes
    declarer = await aio_pika.connect(cluster.amqp_url(first))
    publisher = await aio_pika.connect(cluster.amqp_url(second))
    consumer = await aio_pika.connect(cluster.amqp_url(third))
    try:
        queue_name = "devcluster-test-roundtrip"
        await (await declarer.channel()).declare_queue(queue_name, auto_delete=False)
        await (await publisher.channel()).default_exchange.publish(
            aio_pika.Message(b"hello across the cluster"), routing_key=queue_name
        )
        queue = await (await consumer.channel()).get_queue(queue_name)
        message = None
        deadline = time.monotonic() + 10
        while message is None and time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
        assert message is not None
        assert message.body == b"hello across the cluster"
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        for connection in (declarer, publisher, consumer):
            await connection.close()


@needs_rabbitmq
@pytest.mark.asyncio
async def test_connection_counts_attribute_connections_to_their_node(cluster: DevCluster) -> None:
    target = cluster.nodes[1]
    before = await asyncio.to_thread(cluster.connection_counts)
    assert set(before) == {node.name for node in cluster.nodes}
    connections = [await aio_pika.connect(cluster.amqp_url(target)) for _ in range(2)]
    try:
        expected = {**before, target.name: before[target.name] + 2}
        await wait_for(
            lambda: asyncio.to_thread(lambda: cluster.connection_counts() == expected),
            interval=0.2,
            what=f"broker-side counts {expected}",
        )
        rows = await asyncio.to_thread(cluster.list_connections, "port", "user")
        assert sum(row["port"] == str(target.amqp_port) for row in rows) == expected[target.name]
        assert all(row["user"] == "guest" for row in rows)
    finally:
        for connection in connections:
            await connection.close()
    await wait_for(
        lambda: asyncio.to_thread(lambda: cluster.connection_counts() == before),
        interval=0.2,
        what=f"broker-side counts back to {before}",
    )


AMQP_0_9_1_HEADER = b"AMQP\x00\x00\x09\x01"


async def broker_greets(node: Node, timeout: float) -> bool:
    """Whether the node answers an AMQP protocol header with a frame (connection.start) in time.

    A raw socket instead of aio-pika: a failed aio-pika connect leaves a Connection whose __del__
    schedules close() on whatever loop is around, which filterwarnings=error turns into a failure.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", node.amqp_port)
    try:
        writer.write(AMQP_0_9_1_HEADER)
        await writer.drain()
        try:
            first = await asyncio.wait_for(reader.readexactly(1), timeout)
        except TimeoutError:
            return False
        return first == b"\x01"  # frame type 1: a method frame
    finally:
        writer.close()
        await writer.wait_closed()


@needs_rabbitmq
@pytest.mark.asyncio
async def test_pause_freezes_the_node_and_resume_thaws_it(cluster: DevCluster) -> None:
    node = cluster.nodes[2]
    pid = cluster.beam_pid(node)
    assert pid is not None
    assert psutil.Process(pid).name().startswith("beam")
    assert await broker_greets(node, timeout=10)
    cluster.pause(node)
    try:
        assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
        # The kernel still completes the TCP handshake, but the frozen broker never speaks.
        assert not await broker_greets(node, timeout=2)
        assert node.name not in await asyncio.to_thread(cluster.connection_counts)
    finally:
        cluster.resume(node)
    assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
    assert await broker_greets(node, timeout=30)


@needs_rabbitmq
@pytest.mark.asyncio
async def test_killed_node_restarts_on_same_ports_and_rejoins(cluster: DevCluster) -> None:
    node = cluster.nodes[1]
    old_pid = cluster.beam_pid(node)
    assert old_pid is not None
    cluster.kill(node)
    try:
        assert cluster.beam_pid(node) is None
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", node.amqp_port)
        counts = await asyncio.to_thread(cluster.connection_counts)
        assert counts[node.name] == 0
    finally:
        await asyncio.to_thread(cluster.restart, node)
    assert cluster.beam_pid(node) not in (None, old_pid)
    names = {n.name for n in cluster.nodes}
    assert await asyncio.to_thread(running_nodes, cluster, node) == names
    assert await asyncio.to_thread(running_nodes, cluster, cluster.nodes[0]) == names
    connection = await aio_pika.connect(cluster.amqp_url(node), timeout=30)
    try:
        queue = await (await connection.channel()).declare_queue("devcluster-test-after-restart", auto_delete=True)
        assert queue.name == "devcluster-test-after-restart"
    finally:
        await connection.close()


@needs_rabbitmq
def test_restart_recovers_a_node_whose_data_is_broken(cluster: DevCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not async: the recovery does not involve an event loop, so running it once instead of per loop is enough.
    node = cluster.nodes[2]
    lines: list[str] = []
    monkeypatch.setattr(cluster, "_log", lines.append)
    cluster.kill(node)
    # A node whose Mnesia directory is unusable fails to boot, like one that crashed while joining; restart()
    # has to wipe the data and let the node join the cluster afresh.
    (data_dir,) = (node.dir / "mnesia").glob("*@localhost")
    shutil.rmtree(data_dir)
    data_dir.write_text("not a directory")
    cluster.restart(node)
    assert any("wiping its data and booting it again (attempt 2 of 3)" in line for line in lines)
    assert data_dir.is_dir()
    names = {n.name for n in cluster.nodes}
    for member in cluster.nodes:
        assert running_nodes(cluster, member) == names
    with socket.create_connection(("127.0.0.1", node.amqp_port), timeout=30) as sock:
        sock.sendall(AMQP_0_9_1_HEADER)
        assert sock.recv(1) == b"\x01"  # connection.start: the broker answers again


@needs_rabbitmq
def test_stop_leaves_no_process_and_removes_its_temp_dir() -> None:
    lines: list[str] = []
    cluster = DevCluster(1, management=False, log=lines.append)
    cluster.start()
    base_dir = cluster.base_dir
    assert base_dir is not None and base_dir.is_dir()
    wrapper = psutil.Process(cluster.wrapper_pid(cluster.nodes[0]))
    tree = [wrapper, *wrapper.children(recursive=True)]
    assert any(p.name().startswith("beam") for p in tree)
    cluster.stop()
    cluster.stop()  # idempotent
    survivors = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    assert not base_dir.exists()
    assert any("ready" in line for line in lines)


@needs_rabbitmq
def test_a_node_that_never_boots_fails_start_after_three_attempts_with_its_log() -> None:
    # A setting RabbitMQ does not know makes every boot exit at once, so wiping the data cannot help.
    cluster = DevCluster(1, management=False, extra_config=["no_such_setting.anywhere = 1"])
    try:
        with pytest.raises(devcluster.DevClusterError) as failure:
            cluster.start()
    finally:
        cluster.stop()  # a no-op after the failed start(), but a start() that wrongly succeeded leaves nodes
    message = str(failure.value)
    assert "failed to start 3 times" in message
    assert message.count("exited with status") == 3
    assert "failed_to_prepare_configuration" in message  # the tail of the node's own output says why
    assert cluster.base_dir is None  # start() stopped the cluster and removed its directory
    assert not any(cluster._alive(node) for node in cluster.nodes)


def test_missing_installation_names_the_apt_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(devcluster, "RABBITMQ_BIN_DIR", tmp_path)
    with pytest.raises(RabbitMQNotInstalled, match="sudo apt-get install -y rabbitmq-server"):
        DevCluster(1).start()

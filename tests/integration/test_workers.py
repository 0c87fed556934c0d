"""``workers = N``: a parent process that steers and N worker processes that serve, as real processes.

TCP echo backends in the test's loop stand in for RabbitMQ, except in the one AMQP test. Each backend greets a new
connection with its one-letter tag before echoing, so a client knows where it landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import aiormq
import psutil
import pytest

from rabbitproxy.dev.cluster import DevCluster
from tests.support.cluster import backends_for
from tests.support.metrics import metric
from tests.support.net import free_port, tcp_server
from tests.support.process import ProxyProcess, to_toml
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_factories=["asyncio"])]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def tagged(tag: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(tag)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    return handler


@contextlib.asynccontextmanager
async def backends(*tags: bytes) -> AsyncIterator[list[dict[str, Any]]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for tag in tags:
            port = await stack.enter_async_context(tcp_server(tagged(tag)))
            out.append({"name": tag.decode(), "address": "127.0.0.1", "port": port})
        yield out


def config(entries: list[dict[str, Any]], workers: int = 2, **extra: Any) -> tuple[dict[str, Any], str]:
    port = free_port()
    service = service_config(entries, protocol="tcp", **extra)
    data = proxy_config(service, admin={"listen": f"127.0.0.1:{port}"})
    data["workers"] = workers
    return data, f"http://127.0.0.1:{port}"


class Client:
    """One client connection through the proxy: which backend took it, and an echo to prove it still works."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes) -> None:
        self.reader, self.writer, self.tag = reader, writer, tag

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> Client:
        reader, writer = await asyncio.open_connection(*addr)
        tag = await asyncio.wait_for(reader.readexactly(1), 10)
        return cls(reader, writer, tag)

    async def echoes(self) -> bool:
        self.writer.write(b"ping")
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(4), 10) == b"ping"

    async def ended(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 10) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


async def get(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json() if resp.content_type == "application/json" else await resp.text()


async def patch(url: str, body: dict[str, Any]) -> Any:
    async with aiohttp.ClientSession() as http, http.patch(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def start(proxy: ProxyProcess) -> ProxyProcess:
    # ProxyProcess.start blocks until READY=1, and the backends it checks answer from this loop.
    return await asyncio.to_thread(proxy.start)


@contextlib.asynccontextmanager
async def running(proxy: ProxyProcess) -> AsyncIterator[ProxyProcess]:
    """The proxy started and ready; stopped on the way out, which must end with exit code 0."""
    await start(proxy)
    try:
        yield proxy
    finally:
        assert await stop(proxy) == 0


async def stop(proxy: ProxyProcess) -> int:
    return await asyncio.to_thread(proxy.stop)


async def workers(admin: str) -> list[dict[str, Any]]:
    return list((await get(f"{admin}/api/workers"))["workers"])


async def spread(addr: tuple[str, int], admin: str, n: int = 40, already: int = 0) -> list[Client]:
    """``n`` more clients, and a wait until the connection list shows them all, with both workers holding some."""
    clients = [await Client.open(addr) for _ in range(n)]
    ports = {c.writer.get_extra_info("sockname")[1] for c in clients}

    async def both() -> bool:
        listing = await get(f"{admin}/api/connections?limit=1000")
        mine = [c for c in listing["connections"] if int(c["client"].rsplit(":", 1)[1]) in ports]
        return {c["worker"] for c in mine} == {0, 1} and listing["total"] == n + already

    await wait_for(both, timeout=10, what="connections on both workers")
    return clients


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_connections_land_on_every_worker_and_the_admin_api_adds_them_up(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries, health_check={"type": "tcp", "interval": 1.0})
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            pids = {w["pid"] for w in await workers(admin)}
            assert len(pids) == 2 and proxy.pid not in pids
            clients = await spread(proxy.addr, admin)
            listing = await get(f"{admin}/api/connections?limit=1000")
            assert {c["worker_pid"] for c in listing["connections"]} == pids
            assert len({c["id"] for c in listing["connections"]}) == 40, "ids are unique over the workers"

            async def counted() -> bool:
                service = await get(f"{admin}/api/services/amqp")
                text = await get(f"{admin}/metrics")
                return (
                    service["connections"] == {"active": 40, "total": 40}
                    and service["backends"][0]["connections"]["active"] == 40
                    and metric(text, "rabbitproxy_service_active_connections", service="amqp") == 40
                    and metric(text, "rabbitproxy_backend_connections_total", service="amqp", backend="A") == 40
                )

            await wait_for(counted, timeout=10, what="the workers' counts summed in /api/services and /metrics")
            # One connection closed by id, from the parent's API, in whichever worker has it.
            victim = listing["connections"][0]
            async with aiohttp.ClientSession() as http, http.delete(f"{admin}/api/connections/{victim['id']}") as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["via"] == "tcp"
            port = int(victim["client"].rsplit(":", 1)[1])
            [closed] = [c for c in clients if c.writer.get_extra_info("sockname")[1] == port]
            assert await closed.ended()
            for c in clients:
                c.close()


async def test_drain_and_maint_apply_to_every_worker(tmp_path: Path) -> None:
    async with backends(b"A", b"B") as entries:
        data, admin = config(entries)
        async with running(ProxyProcess(data, tmp_path)) as proxy:
            clients = await spread(proxy.addr, admin)
            assert {c.tag for c in clients} == {b"A", b"B"}
            await patch(f"{admin}/api/services/amqp/backends/A", {"state": "drain"})
            # Drain: every new connection, whichever worker takes it, goes to B; those on A stay.
            fresh = [await Client.open(proxy.addr) for _ in range(30)]
            assert {c.tag for c in fresh} == {b"B"}
            on_a = [c for c in clients if c.tag == b"A"]
            assert all([await c.echoes() for c in on_a])
            # Maint: the connections on A end, in every worker.
            await patch(f"{admin}/api/services/amqp/backends/A", {"state": "maint"})
            assert all([await c.ended() for c in on_a])
            assert all([await c.echoes() for c in clients if c.tag == b"B"])
            for c in clients + fresh:
                c.close()


async def test_a_drain_deadline_closes_what_is_left_in_every_worker(tmp_path: Path) -> None:
    async with backends(b"A", b"B") as entries:
        data, admin = config(entries)
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            clients = await spread(proxy.addr, admin)
            on_a = [c for c in clients if c.tag == b"A"]
            listing = await get(f"{admin}/api/connections?limit=1000&backend=A")
            assert {c["worker"] for c in listing["connections"]} == {0, 1}, "A has clients in both workers"
            await patch(f"{admin}/api/services/amqp/backends/A", {"state": "drain", "deadline": 1.0})
            # The deadline runs in the parent; each worker closes its own connections to A when it passes.
            assert all([await c.ended() for c in on_a])
            # A client sees its end before the worker has written that connection's line: wait for the last one.
            await wait_for(
                lambda: proxy.log().count('reason="drain deadline"') == len(on_a), what="a drain deadline line for each"
            )
            assert all([await c.echoes() for c in clients if c.tag == b"B"])
            for c in clients:
                c.close()


async def test_a_port_another_program_holds_fails_the_start(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, _ = config(entries)
        host, port = data["services"][0]["listen"].rsplit(":", 1)
        with socket.socket() as squatter:
            squatter.bind((host, int(port)))
            squatter.listen()
            proxy = ProxyProcess(data, tmp_path)
            with pytest.raises(AssertionError, match="cannot listen on"):
                await start(proxy)
            # Exit status 2, a configuration error, as with one process.
            assert await stop(proxy) == 2


async def test_a_killed_worker_is_restarted_and_the_others_keep_serving(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries)
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            clients = await spread(proxy.addr, admin)
            listing = await get(f"{admin}/api/connections?limit=1000")
            worker_of = {int(c["client"].split(":")[1]): c["worker"] for c in listing["connections"]}
            [victim] = [w for w in await workers(admin) if w["index"] == 0]
            os.kill(victim["pid"], signal.SIGKILL)
            await wait_for(lambda: not alive(victim["pid"]), timeout=10, what="the worker gone")
            survivors = [c for c in clients if worker_of[c.writer.get_extra_info("sockname")[1]] == 1]
            assert survivors and all([await c.echoes() for c in survivors])

            async def restarted() -> bool:
                w0 = next(w for w in await workers(admin) if w["index"] == 0)
                return bool(w0["ready"] and w0["pid"] != victim["pid"] and w0["restarts"] == 1)

            await wait_for(restarted, timeout=30, what="worker 0 restarted")
            assert "worker died, restarting" in proxy.log() and "SIGKILL" in proxy.log()
            # The new worker takes connections again.
            more = await spread(proxy.addr, admin, 40, already=len(survivors))
            for c in clients + more:
                c.close()


async def test_sighup_reload_keeps_connections_on_every_worker_and_applies_the_new_backends(tmp_path: Path) -> None:
    async with backends(b"A", b"B") as entries:
        data, admin = config(entries[:1])
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            clients = await spread(proxy.addr, admin)
            data["services"][0]["backends"] = entries[1:]
            proxy.config_path.write_text(to_toml(data))
            os.kill(proxy.pid, signal.SIGHUP)

            async def reloaded() -> bool:
                service = await get(f"{admin}/api/services/amqp")
                return [b["name"] for b in service["backends"]] == ["B"]

            started = metric(await get(f"{admin}/metrics"), "rabbitproxy_config_last_reload_success_timestamp_seconds")
            await wait_for(reloaded, timeout=20, what="the parent reloaded")
            # The parent reloads first, then each worker; each logs it (with worker=N).
            await wait_for(
                lambda: proxy.log().count("configuration reloaded") == 3, timeout=20, what="both workers reloaded"
            )

            async def recorded() -> bool:
                text = await get(f"{admin}/metrics")
                when = metric(text, "rabbitproxy_config_last_reload_success_timestamp_seconds")
                return metric(text, "rabbitproxy_config_last_reload_successful") == 1 and when > started

            await wait_for(recorded, timeout=20, what="the reload's success in the parent's /metrics")
            # Both workers apply it: 30 new connections (spread over both) all reach B.
            fresh = [await Client.open(proxy.addr) for _ in range(30)]
            assert {c.tag for c in fresh} == {b"B"}
            listing = await get(f"{admin}/api/connections?limit=1000&backend=B")
            assert {c["worker"] for c in listing["connections"]} == {0, 1}
            # Connections to A from before the reload still work in both workers.
            assert all([await c.echoes() for c in clients])
            for c in clients + fresh:
                c.close()


async def test_a_bad_reload_and_a_change_of_workers_keep_the_running_configuration(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries)
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            proxy.config_path.write_text(to_toml({**data, "workers": 3}))
            os.kill(proxy.pid, signal.SIGHUP)
            await wait_for(lambda: "cannot change by reload" in proxy.log(), timeout=10, what="refusal logged")
            proxy.config_path.write_text("this is [not toml")
            os.kill(proxy.pid, signal.SIGHUP)
            await wait_for(lambda: proxy.log().count("reload refused") >= 2, timeout=10, what="refusal logged")
            assert metric(await get(f"{admin}/metrics"), "rabbitproxy_config_last_reload_successful") == 0
            assert len(await workers(admin)) == 2
            clients = await spread(proxy.addr, admin)
            assert all([await c.echoes() for c in clients])
            for c in clients:
                c.close()


async def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries, shutdown_timeout=60.0)
        proxy = await start(ProxyProcess(data, tmp_path, log_level="info"))
        clients = await spread(proxy.addr, admin)
        pids = [w["pid"] for w in await workers(admin)]
        assert proxy.proc is not None
        proxy.proc.terminate()

        def refused() -> bool:
            try:
                with socket.create_connection(proxy.addr, timeout=2):
                    return False
            except ConnectionRefusedError:
                return True

        await wait_for(lambda: asyncio.to_thread(refused), timeout=10, what="every worker stopped accepting")
        # Open connections on both workers keep working while they drain; the processes wait for them.
        assert all([await c.echoes() for c in clients])
        assert proxy.proc.poll() is None and all(alive(p) for p in pids)
        for c in clients:
            c.close()
        assert await asyncio.to_thread(proxy.proc.wait, 30) == 0
        await wait_for(lambda: not any(alive(p) for p in pids), timeout=10, what="workers exited")
        # (The probe above may have got through once before the listeners closed: at least 40.)
        assert proxy.log().count('reason="client closed"') >= 40
        assert "reason=shutdown" not in proxy.log()
        await stop(proxy)


async def healthz(admin: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/healthz") as resp:
        return resp.status, (await resp.json())["status"]


async def post_reload(admin: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.post(f"{admin}/api/reload", json={}) as resp:
        return resp.status, await resp.json()


async def health_is(admin: str, want: tuple[int, str]) -> bool:
    return await healthz(admin) == want


async def worker(admin: str, index: int) -> dict[str, Any]:
    return next(w for w in await workers(admin) if w["index"] == index)


def resume_or_kill(pid: int, sig: signal.Signals) -> None:
    """Clean-up for a test that stopped a worker: the signal, unless the process is gone already."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def test_a_hung_worker_is_killed_and_replaced_and_health_says_degraded_meanwhile(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries)
        health = tmp_path / "health"
        data["admin"]["health_file"] = str(health)
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            await wait_for(lambda: health.exists() and health.read_text() == "0\n", timeout=20, what="health ok")
            assert await healthz(admin) == (200, "ok")
            victim = (await worker(admin, 0))["pid"]
            # A wedged loop: the process lives and keeps its SO_REUSEPORT socket, but answers nothing.
            os.kill(victim, signal.SIGSTOP)
            try:
                await wait_for(lambda: health_is(admin, (503, "degraded")), timeout=30, what="healthz degraded")
                await wait_for(lambda: health.read_text() == "1\n", timeout=10, what="the health file says 1")

                async def replaced() -> bool:
                    w0 = await worker(admin, 0)
                    return bool(w0["serving"] and w0["pid"] != victim and w0["restart_causes"] == {"hung": 1})

                await wait_for(replaced, timeout=60, what="worker 0 killed and started again")
            finally:
                resume_or_kill(victim, signal.SIGKILL)
            assert not alive(victim)
            assert "worker hung, killed" in proxy.log()
            await wait_for(lambda: health_is(admin, (200, "ok")), timeout=30, what="healthz ok")
            text = await get(f"{admin}/metrics")
            assert metric(text, "rabbitproxy_worker_restarts_total", cause="hung") == 1
            # process_* describe the parent; each worker's CPU and memory are rabbitproxy_worker_* series.
            for index in ("0", "1"):
                assert metric(text, "rabbitproxy_worker_up", worker=index) == 1
                assert metric(text, "rabbitproxy_worker_cpu_seconds_total", worker=index) > 0
                assert metric(text, "rabbitproxy_worker_resident_memory_bytes", worker=index) > 0
            assert metric(text, "rabbitproxy_worker_restarts_total", cause="exited") == 0
            # The new worker takes its share of new clients again.
            clients = await spread(proxy.addr, admin)
            for c in clients:
                c.close()


def new_child(parent: int, known: set[int], deadline: float = 30.0) -> int:
    """The pid of a child of ``parent`` not in ``known``, as soon as it exists (polled in a thread)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for child in psutil.Process(parent).children():
            if child.pid not in known:
                return int(child.pid)
        time.sleep(0.002)
    raise AssertionError("no new worker process appeared")


async def test_a_reload_while_a_worker_is_being_replaced_reaches_it_too(tmp_path: Path) -> None:
    async with backends(b"A", b"B") as entries:
        data, admin = config(entries[:1])
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            pids = {w["pid"] for w in await workers(admin)}
            victim = (await worker(admin, 0))["pid"]
            finding = asyncio.ensure_future(asyncio.to_thread(new_child, proxy.pid, pids))
            os.kill(victim, signal.SIGKILL)
            successor = await finding
            # Held before it listens: it got the configuration before the reload in its start message.
            os.kill(successor, signal.SIGSTOP)
            try:
                w0 = await worker(admin, 0)
                assert w0["pid"] == successor and not w0["ready"], w0
                data["services"][0]["backends"] = entries[1:]
                proxy.config_path.write_text(to_toml(data))
                reload = asyncio.ensure_future(post_reload(admin))
                # The parent and worker 1 have reloaded; the answer waits for worker 0.
                await wait_for(
                    lambda: proxy.log().count("configuration reloaded") == 2, timeout=20, what="worker 1 reloaded"
                )
                assert not reload.done()
                os.kill(successor, signal.SIGCONT)
                status, body = await reload
            finally:
                resume_or_kill(successor, signal.SIGCONT)
            assert (status, body["status"]) == (200, "reloaded"), body
            assert {w["generation"] for w in await workers(admin)} == {1}
            # Every worker serves the new configuration: new clients on both reach B.
            fresh = [await Client.open(proxy.addr) for _ in range(30)]
            assert {c.tag for c in fresh} == {b"B"}
            listing = await get(f"{admin}/api/connections?limit=1000&backend=B")
            assert {c["worker"] for c in listing["connections"]} == {0, 1}
            # Each worker's line says which worker wrote it (issue 25, item 11).
            lines = [line for line in proxy.log().splitlines() if "configuration reloaded" in line]
            assert len(lines) == 3 and sum("worker=" in line for line in lines) == 2, lines
            for c in fresh:
                c.close()


async def test_connection_ids_stay_unique_over_a_worker_restart_and_pages_merge_in_order(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries)
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            clients = await spread(proxy.addr, admin)
            for i, c in enumerate(clients):
                c.writer.write(b"x" * (i * 7 % 31 + 1))

            async def counted() -> bool:
                page = await get(f"{admin}/api/connections?limit=1000")
                return all(c["bytes_out"] > 1 for c in page["connections"])

            await wait_for(counted, timeout=10, what="every client's bytes counted")
            # Pages cut in each worker and merged in the parent are the slices of one ordered list.
            for order in ("sort=bytes_in&order=asc", "sort=age&order=desc", "sort=idle&order=asc"):
                everything = (await get(f"{admin}/api/connections?limit=1000&{order}"))["connections"]
                page = await get(f"{admin}/api/connections?limit=7&offset=5&{order}")
                assert [c["id"] for c in page["connections"]] == [c["id"] for c in everything[5:12]], order
                assert (page["total"], page["next_offset"]) == (40, 12)
            before = (await get(f"{admin}/api/connections?limit=1000"))["connections"]
            one = await get(f"{admin}/api/connections/{before[0]['id']}")
            assert {k: one[k] for k in ("id", "client", "worker")} == {
                k: before[0][k] for k in ("id", "client", "worker")
            }
            victim = (await worker(admin, 0))["pid"]
            os.kill(victim, signal.SIGKILL)

            async def restarted() -> bool:
                w0 = await worker(admin, 0)
                return bool(w0["ready"] and w0["pid"] != victim)

            await wait_for(restarted, timeout=30, what="worker 0 restarted")
            survivors = [c for c in before if c["worker"] == 1]
            more = await spread(proxy.addr, admin, 40, already=len(survivors))
            after = (await get(f"{admin}/api/connections?limit=1000"))["connections"]
            old_ids = {c["id"] for c in before}
            fresh = [c for c in after if c["id"] not in {s["id"] for s in survivors}]
            assert len(fresh) == 40 and not old_ids & {c["id"] for c in fresh}
            # An id from the listing before names no connection of the new worker 0.
            gone = next(c["id"] for c in before if c["worker"] == 0)
            async with aiohttp.ClientSession() as http, http.get(f"{admin}/api/connections/{gone}") as resp:
                assert resp.status == 404
            for c in clients + more:
                c.close()


async def test_aborting_a_drain_stops_the_closes_running_in_the_workers(tmp_path: Path) -> None:
    async with backends(b"A", b"B") as entries:
        data, admin = config(entries)
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            clients = await spread(proxy.addr, admin, n=200)
            on_a = len([c for c in clients if c.tag == b"A"])
            # No [services.rabbitmq]: each worker closes its share by TCP at 20 a second, seconds for all of them.
            await patch(f"{admin}/api/services/amqp/backends/A", {"state": "drain", "deadline": 0.5})

            async def closed() -> float:
                text = await get(f"{admin}/metrics")
                return metric(
                    text, "rabbitproxy_service_closed_by_proxy_total", service="amqp", cause="drain", via="tcp"
                )

            async def ended() -> float:
                text = await get(f"{admin}/metrics")
                return metric(
                    text, "rabbitproxy_service_connections_ended_total", service="amqp", reason="drain deadline"
                )

            await wait_for(lambda: _at_least(ended(), 2), timeout=20, what="the first closes")
            await patch(f"{admin}/api/services/amqp/backends/A", {"state": "ready"})
            await wait_for(
                lambda: _lines(proxy.log(), "pending close cancelled", 2) != ["missing"],
                timeout=20,
                what="each worker cancelled its batch",
            )
            left = (await get(f"{admin}/api/connections?limit=1000&backend=A"))["connections"]
            assert 0 < len(left) < on_a
            ports = {int(c["client"].rsplit(":", 1)[1]) for c in left}
            still = [c for c in clients if c.writer.get_extra_info("sockname")[1] in ports]
            assert len(still) == len(left) and all([await c.echoes() for c in still])
            # Nothing was closed after the cancel: the listing and the counters agree with what the clients see.
            assert (await get(f"{admin}/api/connections?limit=1000&backend=A"))["total"] == len(left)
            # The parent reports what the workers closed (it was 0 with workers); they send their counters twice a
            # second.
            await wait_for(lambda: _equal(closed(), on_a - len(left)), timeout=10, what="the parent's counter")
            for c in clients:
                c.close()


async def test_a_workers_lines_say_which_worker_wrote_them(tmp_path: Path) -> None:
    # Issue 25, item 11: what a worker did on the parent's request (a reload, a close) was logged without worker=.
    async with backends(b"A") as entries:
        data, _ = config(entries)
        async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
            os.kill(proxy.pid, signal.SIGHUP)
            await wait_for(lambda: proxy.log().count("configuration reloaded") == 3, timeout=20, what="reloaded")
            lines = [line for line in proxy.log().splitlines() if "configuration reloaded" in line]
            assert sorted(line.split("worker=")[1][:1] for line in lines if "worker=" in line) == ["0", "1"], lines


async def test_amqp_through_two_workers(cluster: DevCluster, tmp_path: Path) -> None:
    port = free_port()
    service = service_config(backends_for(cluster), health_check={"type": "amqp", "interval": 2.0})
    data = proxy_config(service, admin={"listen": f"127.0.0.1:{port}"})
    data["workers"] = 2
    admin = f"http://127.0.0.1:{port}"
    async with running(ProxyProcess(data, tmp_path)) as proxy:
        host, lport = proxy.addr
        conns = [await aio_pika.connect(f"amqp://guest:guest@{host}:{lport}/", timeout=30) for _ in range(12)]
        listing = await get(f"{admin}/api/connections?limit=100")
        assert {c["worker"] for c in listing["connections"]} == {0, 1}
        assert {c["user"] for c in listing["connections"]} == {"guest"}
        channel = await conns[0].channel()
        queue = await channel.declare_queue("", exclusive=True)
        for i in range(100):
            await channel.default_exchange.publish(aio_pika.Message(b"%d" % i), routing_key=queue.name)
        for i in range(100):
            message = await wait_for(lambda: queue.get(fail=False), timeout=30, what="message")
            assert message.body == b"%d" % i
            await message.ack()
        for c in conns:
            await c.close()


async def test_workers_stop_when_the_parent_dies(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries)
        proxy = await start(ProxyProcess(data, tmp_path, log_level="info"))
        pids = [w["pid"] for w in await workers(admin)]
        os.kill(proxy.pid, signal.SIGKILL)
        await wait_for(lambda: not any(alive(p) for p in pids), timeout=20, what="orphaned workers exiting")
        assert proxy.log().count("the parent process is gone") == 2
        await stop(proxy)


async def test_a_second_signal_ends_the_workers_at_once(tmp_path: Path) -> None:
    async with backends(b"A") as entries:
        data, admin = config(entries, shutdown_timeout=300.0)
        proxy = await start(ProxyProcess(data, tmp_path, log_level="info"))
        clients = await spread(proxy.addr, admin, 8)
        pids = [w["pid"] for w in await workers(admin)]
        assert proxy.proc is not None
        proxy.proc.terminate()
        await wait_for(lambda: "shutting down" in proxy.log(), timeout=10, what="the drain begun")
        assert all([await c.echoes() for c in clients]), "still draining"
        proxy.proc.terminate()
        # Well before the 300 s grace period: the operator asked twice.
        assert await asyncio.to_thread(proxy.proc.wait, 30) == 1
        await wait_for(lambda: not any(alive(p) for p in pids), timeout=10, what="workers killed")
        assert all([await c.ended() for c in clients])
        for c in clients:
            c.close()
        await stop(proxy)


async def test_maint_closes_through_the_broker_in_every_worker(cluster: DevCluster, tmp_path: Path) -> None:
    port = free_port()
    entries = backends_for(cluster)
    for entry, node in zip(entries, cluster.nodes, strict=True):
        entry["management_port"] = node.management_port
    service = service_config(entries, rabbitmq={"timeout": 15.0})
    data = proxy_config(service, admin={"listen": f"127.0.0.1:{port}"})
    data["workers"] = 2
    admin = f"http://127.0.0.1:{port}"
    async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
        host, lport = proxy.addr
        conns: list[aio_pika.abc.AbstractConnection] = []
        closes: list[list[BaseException | None]] = []
        for i in range(12):
            conn = await aio_pika.connect(
                f"amqp://guest:guest@{host}:{lport}/", timeout=30, client_properties={"connection_name": f"w-{i}"}
            )
            seen: list[BaseException | None] = []
            conn.close_callbacks.add(lambda _c, exc=None, seen=seen: seen.append(exc))
            conns.append(conn)
            closes.append(seen)
        listing = await get(f"{admin}/api/connections?limit=100&backend=rabbit1")
        on_r1 = {c["connection_name"] for c in listing["connections"]}
        assert {c["worker"] for c in listing["connections"]} == {0, 1}, "rabbit1 has clients in both workers"

        async def counted() -> bool:
            # The parent knows the workers' connections from their figures, at most half a second old.
            service = await get(f"{admin}/api/services/amqp")
            return bool(service["backends"][0]["connections"]["active"] == len(on_r1))

        await wait_for(counted, timeout=10, what="the workers' connections counted in the parent")
        answer = await patch(f"{admin}/api/services/amqp/backends/rabbit1", {"state": "maint", "force": True})
        # The workers close them; the answer says how many (it was 0 with workers).
        assert answer["closing_through_broker"] == len(on_r1) > 0
        text = "rabbitproxy: node rabbit1 is in maintenance"
        mine = [seen for i, seen in enumerate(closes) if f"w-{i}" in on_r1]
        await wait_for(lambda: all(mine), timeout=60, what="every client on rabbit1 closed")

        async def counted() -> bool:
            metrics = await get(f"{admin}/metrics")
            name = "rabbitproxy_service_closed_by_proxy_total"
            return metric(metrics, name, service="amqp", cause="maint", via="broker") == len(on_r1)

        await wait_for(counted, timeout=10, what="the workers' closes in the parent's metrics")

        def by_broker(exc: BaseException | None) -> bool:
            return isinstance(exc, aiormq.exceptions.ConnectionClosed) and exc.args[0] == 320 and text in str(exc)

        assert all(by_broker(seen[0]) for seen in mine), [seen[:1] for seen in mine]
        assert not any(seen for i, seen in enumerate(closes) if f"w-{i}" not in on_r1)
        for c in conns:
            if not c.is_closed:
                await c.close()


async def test_the_rebalancer_runs_in_every_worker(cluster: DevCluster, tmp_path: Path) -> None:
    port = free_port()
    entries = backends_for(cluster)
    for entry, node in zip(entries, cluster.nodes, strict=True):
        entry["management_port"] = node.management_port
    service = service_config(
        entries, rabbitmq={"timeout": 15.0, "close_rate": 50.0}, rebalance={"enabled": True, "after": 1.0}
    )
    data = proxy_config(service, admin={"listen": f"127.0.0.1:{port}"})
    data["workers"] = 2
    admin = f"http://127.0.0.1:{port}"
    async with running(ProxyProcess(data, tmp_path, log_level="info")) as proxy:
        for name in ("rabbit2", "rabbit3"):
            await patch(f"{admin}/api/services/amqp/backends/{name}", {"state": "drain", "force": True})
        host, lport = proxy.addr
        conns = [await aio_pika.connect(f"amqp://guest:guest@{host}:{lport}/", timeout=30) for _ in range(18)]
        closed: list[BaseException | None] = []
        for c in conns:
            c.close_callbacks.add(lambda _c, exc=None: closed.append(exc))
        listing = await get(f"{admin}/api/connections?limit=100&backend=rabbit1")
        assert listing["total"] == 18 and {c["worker"] for c in listing["connections"]} == {0, 1}
        for name in ("rabbit2", "rabbit3"):
            await patch(f"{admin}/api/services/amqp/backends/{name}", {"state": "ready"})
        # Each worker holds its own share of rabbit1's clients and moves its own surplus.
        await wait_for(
            lambda: all(f"worker={i}" in line for i, line in enumerate(_lines(proxy.log(), "rebalancing", 2))),
            timeout=60,
            what="a rebalancing round in each worker",
        )
        await wait_for(lambda: len(closed) >= 6, timeout=60, what="clients moved off rabbit1")

        async def held() -> bool:
            # Each worker holds rabbit1 while the clients it moved have not come back: the parent shows both.
            text = await get(f"{admin}/metrics")
            return metric(text, "rabbitproxy_backend_rebalance_hold", service="amqp", backend="rabbit1") == 2

        await wait_for(held, timeout=30, what="rabbit1 held by both workers")
        assert all(isinstance(exc, aiormq.exceptions.ConnectionClosed) and exc.args[0] == 320 for exc in closed)
        for c in conns:
            if not c.is_closed:
                await c.close()


async def _at_least(value: Awaitable[float], n: float) -> bool:
    return await value >= n


async def _equal(value: Awaitable[float], n: float) -> bool:
    return await value == n


def _lines(log: str, event: str, n: int) -> list[str]:
    """The first line of ``event`` from each of ``n`` workers, in worker order (fewer while some are missing)."""
    found = {}
    for line in log.splitlines():
        if event in line:
            for i in range(n):
                if f"worker={i}" in line:
                    found.setdefault(i, line)
    return [found[i] for i in sorted(found)] if len(found) == n else ["missing"]

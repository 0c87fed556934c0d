"""The admin API over real HTTP, against a proxy running in this loop in front of plain TCP echo backends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

from rabbitproxy import config as config_mod
from rabbitproxy.app import serve
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.cli import app
from rabbitproxy.config import ConfigError
from rabbitproxy.control.channel import ChannelError
from rabbitproxy.control.reload import ReloadResult
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.control.workers import WorkerSet
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.process import to_toml
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

TOKEN = "s3cret-token"


@contextlib.asynccontextmanager
async def admin_proxy(token: str | None = None) -> AsyncIterator[tuple[Supervisor, str, list[dict[str, Any]]]]:
    """A proxy with two echo backends and the admin API; yields (proxy, admin URL, service configs)."""
    async with tcp_server(echo_handler) as p1, tcp_server(echo_handler) as p2:
        services = [
            service_config(
                [
                    {"name": "echo1", "address": "127.0.0.1", "port": p1, "weight": 100},
                    {"name": "echo2", "address": "127.0.0.1", "port": p2, "weight": 50},
                ]
            )
        ]
        admin_port = free_port()
        admin: dict[str, Any] = {"listen": f"127.0.0.1:{admin_port}"}
        if token is not None:
            admin["token"] = token
        async with run_proxy(*services, admin=admin) as proxy:
            yield proxy, f"http://127.0.0.1:{admin_port}", services


async def echo_once(proxy: Supervisor, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*listen_addr(proxy))
    writer.write(payload)
    assert await reader.readexactly(len(payload)) == payload
    return reader, writer


@pytest.mark.asyncio
async def test_healthz_and_services_listing() -> None:
    async with admin_proxy() as (proxy, url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
        _, writer = await echo_once(proxy, b"x" * 1000)
        async with http.get(f"{url}/api/services") as resp:
            assert resp.status == 200
            data = await resp.json()
        writer.close()
        assert data["state"] == "running"
        [svc] = data["services"]
        assert svc["name"] == "amqp"
        assert [b["name"] for b in svc["backends"]] == ["echo1", "echo2"]
        b1 = svc["backends"][0]
        assert (b1["weight"], b1["effective_weight"], b1["status"], b1["admin_state"]) == (100, 100, "up", "ready")
        assert b1["health"]["status"] == "up"
        assert b1["agent"]["status"] == "none"
        # Smooth weighted round robin sends the first connection to the heavier backend; its bytes are live.
        assert b1["connections"]["active"] == 1
        assert b1["bytes"] == {"in": 1000, "out": 1000}


@pytest.mark.asyncio
async def test_healthz_is_503_while_shutting_down() -> None:
    # Drive the real shutdown (serve()'s trigger) while a client connection stays open, so the drain, and with
    # it the window in which a load balancer in front must see 503, lasts until the test closes that connection.
    async with tcp_server(echo_handler) as port:
        service = service_config([{"name": "echo1", "address": "127.0.0.1", "port": port}], shutdown_timeout=30.0)
        admin_port = free_port()
        url = f"http://127.0.0.1:{admin_port}/healthz"
        cfg = config_mod.validate({"services": [service], "admin": {"listen": f"127.0.0.1:{admin_port}"}}, "test")
        stop = asyncio.Event()
        started: asyncio.Future[Supervisor] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(cfg, shutdown_trigger=stop.wait, ready=started.set_result))
        try:
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            proxy = started.result()
            async with aiohttp.ClientSession() as http:

                async def healthz() -> tuple[int, Any]:
                    async with http.get(url) as resp:
                        return resp.status, await resp.json()

                assert await healthz() == (200, {"status": "ok"})
                reader, writer = await echo_once(proxy, b"held")
                stop.set()

                async def stopping() -> bool:
                    return await healthz() == (503, {"status": "stopping"})

                await wait_for(stopping, what="/healthz answering 503 stopping")
                # The listener is closed, the open connection still relays, and /healthz keeps saying 503.
                with pytest.raises(OSError):
                    await asyncio.open_connection(*listen_addr(proxy))
                writer.write(b"still here")
                assert await reader.readexactly(10) == b"still here"
                assert not task.done()
                assert await healthz() == (503, {"status": "stopping"})
                writer.close()
                await asyncio.wait_for(task, 60)
            # Once the drain is over, serve() has returned and the admin API is gone with it.
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", admin_port)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


@pytest.mark.asyncio
async def test_healthz_is_503_without_a_healthy_backend_and_livez_stays_200() -> None:
    # keepalived's track script and the readiness probes read /healthz: a proxy that cannot reach any node must
    # hand its clients over; a restart (liveness) would not help it, so /livez stays 200.
    async with admin_proxy() as (proxy, url, _), aiohttp.ClientSession() as http:
        echo1, echo2 = proxy.services["amqp"].pool.backends
        echo1.mark_health(False, "refused", 0.0)
        async with http.get(f"{url}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        echo2.agent_down = "agent says down"
        async with http.get(f"{url}/healthz") as resp:
            assert (resp.status, await resp.json()) == (503, {"status": "no-healthy-backend"})
        async with http.get(f"{url}/livez") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "alive", "state": "running"})
        echo2.agent_down = None
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        # Draining every backend is the operator's choice and keeps the open connections: no reason to move a VIP.
        for b in (echo1, echo2):
            b.mark_health(True, "ok", 0.0)
            b.set_operator_state("drain", CloseReason.BACKEND_MAINT)
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200


@pytest.mark.asyncio
async def test_drain_keeps_connections_maint_closes_them_ready_restores() -> None:
    async with admin_proxy() as (proxy, url, _), aiohttp.ClientSession() as http:
        backend = proxy.services["amqp"].pool.by_name["echo1"]
        conns = [await echo_once(proxy, b"hello") for _ in range(3)]
        on_echo1 = backend.active
        assert on_echo1 == 2  # weights 100:50 -> echo1, echo2, echo1
        path = f"{url}/api/services/amqp/backends/echo1"
        async with http.patch(path, json={"state": "drain"}) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert (body["status"], body["operator_state"], body["closed_connections"]) == ("drain", "drain", 0)
        assert backend.active == on_echo1
        # New connections avoid the drained backend.
        more = [await echo_once(proxy, b"again") for _ in range(3)]
        assert backend.total == 2
        async with http.patch(path, json={"state": "maint"}) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["closed_connections"] == on_echo1
        await wait_for(lambda: backend.active == 0, what="echo1's connections closed")
        assert proxy.services["amqp"].ended[CloseReason.BACKEND_MAINT] == on_echo1
        async with http.patch(path, json={"state": "ready"}) as resp:
            assert (await resp.json())["status"] == "up"
        for _, w in conns + more:
            w.close()


@pytest.mark.asyncio
async def test_weight_change_applies_to_new_connections() -> None:
    async with admin_proxy() as (proxy, url, _), aiohttp.ClientSession() as http:
        pool = proxy.services["amqp"].pool
        async with http.patch(f"{url}/api/services/amqp/backends/echo2", json={"weight": 0}) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert (body["weight"], body["effective_weight"], body["weight_overridden"]) == (0, 0, True)
        writers = [(await echo_once(proxy, b"w"))[1] for _ in range(4)]
        assert (pool.by_name["echo1"].total, pool.by_name["echo2"].total) == (4, 0)
        for w in writers:
            w.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/api/services/amqp/backends/echo1", {"state": "off"}, 400, "state must be one of"),
        ("/api/services/amqp/backends/echo1", {"weight": 5000}, 400, "0 to 1000"),
        ("/api/services/amqp/backends/echo1", [1, 2], 400, "JSON object"),
        ("/api/services/amqp/backends/nope", {"state": "drain"}, 404, "no backend named 'nope'"),
        ("/api/services/nope/backends/echo1", {"state": "drain"}, 404, "no service named 'nope'"),
    ],
)
async def test_bad_patches_are_refused_and_change_nothing(path: str, body: Any, status: int, fragment: str) -> None:
    async with admin_proxy() as (proxy, url, _), aiohttp.ClientSession() as http:
        async with http.patch(url + path, json=body) as resp:
            assert resp.status == status
            assert fragment in (await resp.json())["error"]
        b = proxy.services["amqp"].pool.by_name["echo1"]
        assert (b.operator_state, b.configured_weight, b.weight_overridden) == ("ready", 100, False)


@pytest.mark.asyncio
async def test_mutations_need_a_json_body_and_our_own_origin() -> None:
    async with admin_proxy() as (proxy, url, _), aiohttp.ClientSession() as http:
        path = f"{url}/api/services/amqp/backends/echo1"
        # What an HTML form on another site could send.
        async with http.patch(
            path, data="state=maint", headers={"Content-Type": "application/x-www-form-urlencoded"}
        ) as r:
            assert r.status == 415
        async with http.patch(path, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not valid JSON" in (await r.json())["error"]
        async with http.patch(path, json={"state": "maint"}, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        assert proxy.services["amqp"].pool.by_name["echo1"].operator_state == "ready"
        async with http.patch(path, json={"state": "drain"}, headers={"Origin": url}) as r:
            assert r.status == 200


@pytest.mark.asyncio
async def test_token_guards_api_and_metrics_but_not_healthz_or_page() -> None:
    async with admin_proxy(TOKEN) as (proxy, url, _), aiohttp.ClientSession() as http:
        good = {"Authorization": f"Bearer {TOKEN}"}
        for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            async with http.get(f"{url}/api/services", headers=bad) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(f"{url}/metrics", headers=bad) as resp:
                assert resp.status == 401
            async with http.patch(
                f"{url}/api/services/amqp/backends/echo1", json={"state": "maint"}, headers=bad
            ) as resp:
                assert resp.status == 401
        assert proxy.services["amqp"].pool.by_name["echo1"].operator_state == "ready"
        async with http.get(f"{url}/api/services", headers=good) as resp:
            assert resp.status == 200
        async with http.get(f"{url}/metrics", headers=good) as resp:
            assert resp.status == 200
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{url}/") as resp:
            assert resp.status == 200
            page = await resp.text()
        assert "System Overview" in page


@pytest.mark.asyncio
async def test_page_is_self_contained() -> None:
    async with admin_proxy() as (_, url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/") as resp:
            assert resp.content_type == "text/html"
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            page = await resp.text()
        # Nothing may come from elsewhere: the page has to work on an isolated management network.
        for marker in ("http://", "https://", "//cdn", "<link", "src="):
            assert marker not in page, marker


async def refused_to_start(svc: dict[str, Any], admin: dict[str, Any]) -> ConfigError:
    """Start a proxy that must refuse with a ConfigError, and check it left nothing listening on the service port."""
    with pytest.raises(ConfigError) as exc:
        async with run_proxy(svc, admin=admin):
            pass
    host, port = svc["listen"].split(":")
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))
    return exc.value


@pytest.mark.asyncio
async def test_non_loopback_admin_without_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RABBITPROXY_ADMIN_TOKEN", raising=False)
    svc = service_config([{"name": "x", "address": "127.0.0.1", "port": free_port()}])
    error = await refused_to_start(svc, admin={"listen": f"0.0.0.0:{free_port()}"})
    assert error.errors[0].startswith("admin.token:")


@pytest.mark.asyncio
async def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITPROXY_ADMIN_TOKEN", TOKEN)
    async with admin_proxy() as (_, url, _), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/services") as resp:
            assert resp.status == 401
        async with http.get(f"{url}/api/services", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200


@pytest.mark.asyncio
async def test_admin_port_in_use_is_a_clear_error_and_releases_the_service_port() -> None:
    async with tcp_server(echo_handler) as busy:
        svc = service_config([{"name": "x", "address": "127.0.0.1", "port": busy}])
        error = await refused_to_start(svc, admin={"listen": f"127.0.0.1:{busy}"})
        assert error.errors[0].startswith("admin.listen: cannot listen on")


@pytest.mark.asyncio
async def test_metrics_endpoint_counts_connections_and_reasons() -> None:
    async with admin_proxy() as (proxy, url, _), aiohttp.ClientSession() as http:
        _, w = await echo_once(proxy, b"a" * 300)
        w.close()
        await wait_for(lambda: proxy.services["amqp"].active == 0, what="connection closed")
        async with http.get(f"{url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        lines = set(text.splitlines())
        assert 'rabbitproxy_backend_connections_total{backend="echo1",service="amqp"} 1.0' in lines
        assert 'rabbitproxy_backend_bytes_in_total{backend="echo1",service="amqp"} 300.0' in lines
        assert 'rabbitproxy_backend_bytes_out_total{backend="echo1",service="amqp"} 300.0' in lines
        assert 'rabbitproxy_service_connections_ended_total{reason="client closed",service="amqp"} 1.0' in lines
        assert 'rabbitproxy_backend_up{backend="echo2",service="amqp"} 1.0' in lines
        assert any(line.startswith("process_open_fds ") for line in lines)


@pytest.mark.asyncio
async def test_reload_through_the_api(tmp_path: Path) -> None:
    async with admin_proxy() as (proxy, url, services), aiohttp.ClientSession() as http:
        path = tmp_path / "rabbitproxy.toml"
        proxy.config_path = path
        pool = proxy.services["amqp"].pool
        pool.by_name["echo1"].set_operator_state("drain", CloseReason.BACKEND_MAINT)
        _, w = await echo_once(proxy, b"kept")
        live_backend = proxy.services["amqp"].pool.choose()
        assert live_backend is not None
        new = dict(services[0])
        new["backends"] = [dict(b) for b in services[0]["backends"]]
        new["backends"][1]["weight"] = 30
        path.write_text(to_toml({"admin": {"enabled": False}, "services": [new]}))
        async with http.post(f"{url}/api/reload", json={}) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "status": "reloaded",
                "added": [],
                "removed": [],
                "changed": ["amqp"],
                "unchanged": [],
            }
        pool = proxy.services["amqp"].pool
        assert pool.by_name["echo2"].configured_weight == 30
        assert pool.by_name["echo1"].operator_state == "drain"  # the operator's drain survives the reload
        assert pool.by_name["echo2"].active == 1  # the open connection is still counted
        # An invalid file: 400 with the errors, nothing changes.
        path.write_text('[[services]]\nname = "amqp"\nbackends = []\nbogus = 1\n')
        async with http.post(f"{url}/api/reload", json={}) as resp:
            assert resp.status == 400
            errors = (await resp.json())["errors"]
        assert "services['amqp'].bogus: unknown key" in errors
        assert proxy.services["amqp"].pool is pool
        w.write(b"still here")
        w.close()


@pytest.mark.asyncio
async def test_cli_commands_talk_to_the_api() -> None:
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(app, list(args), env={"RABBITPROXY_ADMIN_TOKEN": TOKEN})

    async with admin_proxy(TOKEN) as (proxy, url, _):
        res = await asyncio.to_thread(cli, "status", "--admin", url)
        assert res.exit_code == 0, res.output
        assert "echo1" in res.output and "echo2" in res.output
        res = await asyncio.to_thread(cli, "backend", "drain", "amqp", "echo2", "--admin", url)
        assert res.exit_code == 0, res.output
        assert "amqp/echo2: drain" in res.output
        assert proxy.services["amqp"].pool.by_name["echo2"].operator_state == "drain"
        res = await asyncio.to_thread(cli, "backend", "weight", "amqp", "echo1", "7", "--admin", url)
        assert res.exit_code == 0, res.output
        assert proxy.services["amqp"].pool.by_name["echo1"].configured_weight == 7
        res = await asyncio.to_thread(cli, "backend", "ready", "amqp", "nope", "--admin", url)
        assert res.exit_code == 1
        assert "no backend named 'nope'" in res.output
        res = await asyncio.to_thread(
            runner.invoke, app, ["status", "--admin", url], env={"RABBITPROXY_ADMIN_TOKEN": "wrong"}
        )
        assert res.exit_code == 1
        assert "bearer token" in res.output
        # Started with a config object, not a file: reload explains that it has nothing to re-read.
        res = await asyncio.to_thread(cli, "reload", "--admin", url)
        assert res.exit_code == 1
        assert "no configuration file to reload" in res.output


def test_cli_exits_non_zero_when_the_api_is_unreachable() -> None:
    res = CliRunner().invoke(app, ["status", "--admin", f"http://127.0.0.1:{free_port()}"])
    assert res.exit_code == 1
    assert "cannot reach the admin API" in res.output


@pytest.mark.asyncio
async def test_a_reload_some_worker_refused_is_reported_as_incomplete(monkeypatch: pytest.MonkeyPatch) -> None:
    # workers = N: the parent applied the file, a worker refused it and still serves the old configuration. That
    # is not "reloaded": 500, the workers' reasons, and the CLI prints them.
    async with admin_proxy() as (proxy, url, _services), aiohttp.ClientSession() as http:

        async def half_done(new: Any = None) -> ReloadResult:
            return ReloadResult(unchanged=["amqp"], worker_errors=["worker 1: services['amqp'].listen: in use"])

        monkeypatch.setattr(proxy, "reload", half_done)
        async with http.post(f"{url}/api/reload", json={}) as resp:
            assert resp.status == 500
            body = await resp.json()
        assert body["status"] == "incomplete" and body["unchanged"] == ["amqp"]
        assert body["errors"] == body["worker_errors"] == ["worker 1: services['amqp'].listen: in use"]
        res = await asyncio.to_thread(CliRunner().invoke, app, ["reload", "--admin", url])
        assert res.exit_code == 1
        assert "reload incomplete" in res.output and "worker 1: services['amqp'].listen: in use" in res.output


@pytest.mark.asyncio
async def test_the_workers_answers_to_a_reload_are_collected() -> None:
    # WorkerSet.reload against workers that answer as control.worker does: one takes it, one refuses, one fails.
    config = config_mod.validate({"services": [service_config([{"name": "b1", "address": "127.0.0.1"}])]})
    sup: Any = SimpleNamespace(config=SimpleNamespace(worker_count=3), services={})
    workers = WorkerSet(sup)
    answers: list[Any] = [{"t": "reloaded"}, {"errors": ["bad listen"]}, ChannelError("worker 2 is not running")]
    for slot in workers.slots:
        slot.channel = SimpleNamespace(closed=True)  # type: ignore[assignment]
        slot.ready = True

    async def request(slot: Any, message: dict[str, Any], deadline: float = 5.0) -> dict[str, Any]:
        assert message["t"] == "reload" and message["config"]["services"][0]["name"] == "amqp"
        answer = answers[slot.index]
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)

    workers.request = request  # type: ignore[method-assign]
    assert await workers.reload(config) == ["worker 1: bad listen", "worker 2: worker 2 is not running"]

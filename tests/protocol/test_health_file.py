"""``[admin] health_file``: the /healthz verdict as 0/1 in a file, for keepalived's track_file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.admin import readiness
from rabbitproxy.app import serve
from rabbitproxy.control.supervisor import Supervisor
from tests.support.net import echo_handler, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@pytest.mark.asyncio
async def test_health_file_follows_healthz_and_turns_1_as_soon_as_shutdown_begins(tmp_path: Path) -> None:
    path = tmp_path / "health"
    async with tcp_server(echo_handler) as port:
        svc = service_config([{"name": "echo", "address": "127.0.0.1", "port": port}], shutdown_timeout=30.0)
        cfg = config_mod.validate({"services": [svc], "admin": {"enabled": False, "health_file": str(path)}}, "test")
        stop = asyncio.Event()
        started: asyncio.Future[Supervisor] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(cfg, shutdown_trigger=stop.wait, ready=started.set_result))
        try:
            proxy = await asyncio.wait_for(started, 30)
            await wait_for(lambda: _read(path) == "0\n", what="health file 0 once running")
            (backend,) = proxy.services["amqp"].pool.backends
            backend.mark_health(False, "refused", 0.0)
            await wait_for(lambda: _read(path) == "1\n", what="health file 1 with no healthy backend")
            backend.mark_health(True, "ok", 0.0)
            await wait_for(lambda: _read(path) == "0\n", what="health file 0 again")
            # An open connection keeps the drain (and so the process) going for up to 30 s: the file must say 1
            # while it drains, not only once the proxy has gone.
            reader, writer = await asyncio.open_connection(*listen_addr(proxy))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            stop.set()
            await wait_for(lambda: _read(path) == "1\n", what="health file 1 when shutdown begins")
            assert not task.done()
            writer.close()
            await writer.wait_closed()
            await asyncio.wait_for(task, 30)
            assert _read(path) == "1\n"
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


@pytest.mark.asyncio
async def test_health_file_updater_is_restarted_after_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A dead updater would leave keepalived trusting a stale 0; it must come back and carry on.
    path = tmp_path / "health"
    calls = 0
    real = readiness.health_status

    def flaky(proxy: Supervisor) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug in the updater")
        return real(proxy)

    monkeypatch.setattr(readiness, "health_status", flaky)
    async with tcp_server(echo_handler) as port:
        svc = service_config([{"name": "echo", "address": "127.0.0.1", "port": port}])
        async with run_proxy(svc, admin={"enabled": False, "health_file": str(path)}) as proxy:
            await wait_for(lambda: calls > 2, what="the updater to run again after the failure")
            (backend,) = proxy.services["amqp"].pool.backends
            backend.mark_health(False, "refused", 0.0)
            await wait_for(lambda: _read(path) == "1\n", what="the restarted updater to write 1")


def test_health_file_must_be_absolute() -> None:
    with pytest.raises(config_mod.ConfigError, match=r"admin.health_file: .*'health' must be an absolute path"):
        config_mod.validate(
            {"admin": {"health_file": "health"}, "services": [service_config([{"name": "b", "address": "h"}])]},
            "test",
        )

"""``[admin] state_file`` with a running proxy: operator changes survive a restart and a reload, reset clears a
runtime weight, a bad file never stops a start (issue 26, item 5). With workers: tests/integration/test_state_file.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

from rabbitproxy import config as config_mod
from rabbitproxy.cli import app
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.proxy import listen_addr, proxy_config, run_proxy, service_config


def backends(p1: int, p2: int, weight2: int = 50) -> list[dict[str, Any]]:
    return [
        {"name": "echo1", "address": "127.0.0.1", "port": p1, "weight": 100},
        {"name": "echo2", "address": "127.0.0.1", "port": p2, "weight": weight2},
    ]


def saved(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc["services"].get("amqp", {})


@pytest.mark.asyncio
async def test_operator_changes_survive_a_restart_and_reset_clears_a_weight(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    async with tcp_server(echo_handler) as p1, tcp_server(echo_handler) as p2, aiohttp.ClientSession() as http:
        admin_port = free_port()
        url = f"http://127.0.0.1:{admin_port}"
        admin = {"listen": f"127.0.0.1:{admin_port}", "state_file": str(state)}
        svc = service_config(backends(p1, p2))
        async with run_proxy(svc, admin=admin):
            base = f"{url}/api/services/amqp/backends"
            async with http.patch(f"{base}/echo1", json={"state": "drain"}) as resp:
                assert resp.status == 200
            async with http.patch(f"{base}/echo2", json={"weight": 7}) as resp:
                assert resp.status == 200
            assert saved(state) == {
                "echo1": {"state": "drain"},
                "echo2": {"state": "ready", "weight": 7, "file_weight": 50},
            }
        # A new process would start from the same file and find the same operator changes before serving.
        async with run_proxy(svc, admin=admin) as proxy:
            pool = proxy.services["amqp"].pool.by_name
            assert pool["echo1"].operator_state == "drain"
            assert (pool["echo2"].configured_weight, pool["echo2"].weight_overridden) == (7, True)
            # The drained backend takes no client, from the first one on.
            reader, writer = await asyncio.open_connection(*listen_addr(proxy))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            assert (pool["echo1"].active, pool["echo2"].active) == (0, 1)
            writer.close()
            res = await asyncio.to_thread(
                CliRunner().invoke, app, ["backend", "reset", "amqp", "echo2", "--admin", url]
            )
            assert res.exit_code == 0, res.output
            assert "amqp/echo2: weight 50 from the configuration" in res.output
            assert (pool["echo2"].configured_weight, pool["echo2"].weight_overridden) == (50, False)
            assert saved(state) == {"echo1": {"state": "drain"}}


@pytest.mark.asyncio
async def test_a_reload_keeps_an_override_unless_the_files_weight_changed(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    async with tcp_server(echo_handler) as p1, tcp_server(echo_handler) as p2:
        admin = {"listen": f"127.0.0.1:{free_port()}", "state_file": str(state)}
        svc = service_config(backends(p1, p2))
        async with run_proxy(svc, admin=admin) as proxy:
            pool = proxy.services["amqp"].pool
            pool.by_name["echo2"].set_weight(7)
            pool.by_name["echo1"].operator_state = "maint"
            proxy.state_changed()
            await proxy.reload(config_mod.validate(proxy_config(svc, admin=admin)))
            echo2 = proxy.services["amqp"].pool.by_name["echo2"]
            assert (echo2.configured_weight, echo2.weight_overridden) == (7, True)
            assert saved(state)["echo2"]["weight"] == 7
            edited = dict(svc, backends=backends(p1, p2, weight2=60))
            await proxy.reload(config_mod.validate(proxy_config(edited, admin=admin)))
            echo2 = proxy.services["amqp"].pool.by_name["echo2"]
            assert (echo2.configured_weight, echo2.weight_overridden) == (60, False)
            assert proxy.services["amqp"].pool.by_name["echo1"].operator_state == "maint"
            assert saved(state) == {"echo1": {"state": "maint"}}


@pytest.mark.asyncio
async def test_a_corrupt_state_file_does_not_stop_the_proxy(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(b'{"version": 1, "services": {"amqp": {"echo1": {"state": "dra')
    async with tcp_server(echo_handler) as p1, tcp_server(echo_handler) as p2:
        admin = {"listen": f"127.0.0.1:{free_port()}", "state_file": str(state)}
        async with run_proxy(service_config(backends(p1, p2)), admin=admin) as proxy:
            assert all(b.operator_state == "ready" for b in proxy.services["amqp"].pool.backends)
            [aside] = tmp_path.glob("state.json.bad-*")
            assert aside.read_bytes().endswith(b'"dra')
            # A fresh file, from the configuration, took its place.
            assert saved(state) == {}

"""A reload judges the new file as serve and check-config do: every error at once, and nothing changes (issue 26)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.config import ConfigError
from tests.support.config_files import BROKEN, Case
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.proxy import run_proxy, service_config

MANY = next(c for c in BROKEN if c.id == "many-errors")


def check_config_errors(path: Path) -> list[str]:
    """What check-config (and serve) report for ``path``, in this process's environment, as a reload reads it."""
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    return info.value.errors


@pytest.mark.asyncio
@pytest.mark.parametrize("case", [MANY, next(c for c in BROKEN if c.id == "port-as-string")], ids=lambda c: c.id)
async def test_a_refused_reload_reports_every_error_check_config_reports(tmp_path: Path, case: Case) -> None:
    path = tmp_path / "rabbitproxy.toml"
    path.write_text(case.text)
    expected = check_config_errors(path)
    assert len(expected) == len(case.expected)
    async with tcp_server(echo_handler) as port:
        admin_port = free_port()
        svc = service_config([{"name": "echo", "address": "127.0.0.1", "port": port}])
        async with run_proxy(svc, admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy:
            proxy.config_path = path
            pool = proxy.services["amqp"].pool
            # SIGHUP's path ...
            with pytest.raises(ConfigError) as info:
                await proxy.reload()
            assert info.value.errors == expected
            # ... and the API's.
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"http://127.0.0.1:{admin_port}/api/reload", json={}) as resp,
            ):
                assert resp.status == 400
                assert (await resp.json())["errors"] == expected
            assert proxy.services["amqp"].pool is pool

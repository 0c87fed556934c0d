"""Who reaches the admin API and what they may do (issue 26, items 3 and 4).

The CLI never goes through an HTTP proxy named by the environment; the operator's token may do everything, the
read token only read; the unix socket trusts whoever its file permissions let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

from rabbitproxy.cli import app
from rabbitproxy.config import ConfigError
from rabbitproxy.control.supervisor import Supervisor
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.proxy import run_proxy, service_config

OPERATOR = "operator-token-1"
READER = "reader-token-2"


@contextlib.asynccontextmanager
async def proxy_with(admin: dict[str, Any]) -> AsyncIterator[tuple[Supervisor, str]]:
    """A proxy with one echo backend ``echo1`` and the admin API as ``admin`` says; yields (proxy, URL)."""
    async with tcp_server(echo_handler) as port:
        svc = service_config([{"name": "echo1", "address": "127.0.0.1", "port": port}])
        admin_port = free_port()
        async with run_proxy(svc, admin={"listen": f"127.0.0.1:{admin_port}", **admin}) as proxy:
            yield proxy, f"http://127.0.0.1:{admin_port}"


@contextlib.asynccontextmanager
async def recording_proxy() -> AsyncIterator[list[bytes]]:
    """A TCP server standing in for an HTTP proxy: it records what it receives and answers 502."""
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()

    async with tcp_server(handler) as port:
        received.append(str(port).encode())
        yield received


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


@pytest.mark.asyncio
async def test_the_cli_never_sends_the_token_through_an_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with recording_proxy() as received, proxy_with({"token": OPERATOR}) as (proxy, url):
        proxy_url = f"http://127.0.0.1:{received.pop(0).decode()}"
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy_url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        env = {"RABBITPROXY_ADMIN_TOKEN": OPERATOR}
        res = await asyncio.to_thread(cli, "status", "--admin", url, env=env)
        assert res.exit_code == 0, res.output
        assert "echo1" in res.output
        res = await asyncio.to_thread(cli, "backend", "drain", "amqp", "echo1", "--admin", url, env=env)
        assert res.exit_code == 0, res.output
        assert proxy.services["amqp"].pool.by_name["echo1"].operator_state == "drain"
        assert received == []


@pytest.mark.asyncio
async def test_the_read_token_reads_and_is_refused_changes() -> None:
    async with proxy_with({"token": OPERATOR, "read_token": READER}) as (proxy, url), aiohttp.ClientSession() as http:
        reader = {"Authorization": f"Bearer {READER}"}
        operator = {"Authorization": f"Bearer {OPERATOR}"}
        for path in ("/api/services", "/api/services/amqp/backends/echo1", "/api/connections", "/metrics"):
            async with http.get(url + path, headers=reader) as resp:
                assert resp.status == 200, path
                assert resp.headers["X-Rabbitproxy-Access"] == "read"
            async with http.get(url + path) as resp:
                assert resp.status == 401, path
        backend = proxy.services["amqp"].pool.by_name["echo1"]
        patch = f"{url}/api/services/amqp/backends/echo1"
        for method, path, body in (
            ("PATCH", patch, {"state": "maint"}),
            ("POST", f"{patch}/reset", {}),
            ("POST", f"{url}/api/reload", {}),
            ("DELETE", f"{url}/api/connections/1", None),
        ):
            async with http.request(method, path, json=body, headers=reader) as resp:
                assert resp.status == 403, (method, path)
                message = (await resp.json())["error"]
            assert "read-only token" in message and "admin.token" in message
        assert backend.operator_state == "ready"
        async with http.patch(patch, json={"state": "drain"}, headers=operator) as resp:
            assert resp.status == 200
            assert resp.headers["X-Rabbitproxy-Access"] == "operator"
        assert backend.operator_state == "drain"
        # The page itself and /healthz need no token; the page learns the level from the API's answers.
        async with http.get(url + "/") as resp:
            assert resp.status == 200
            assert "X-Rabbitproxy-Access" in await resp.text()
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200


@pytest.mark.asyncio
async def test_the_cli_says_why_a_read_token_cannot_drain() -> None:
    async with proxy_with({"token": OPERATOR, "read_token": READER}) as (_proxy, url):
        env = {"RABBITPROXY_ADMIN_TOKEN": READER}
        res = await asyncio.to_thread(cli, "status", "--admin", url, env=env)
        assert res.exit_code == 0, res.output
        res = await asyncio.to_thread(cli, "backend", "drain", "amqp", "echo1", "--admin", url, env=env)
        assert res.exit_code == 1
        assert "read-only token" in res.output


@pytest.mark.asyncio
async def test_without_any_token_loopback_is_the_operator_and_a_read_token_alone_closes_it() -> None:
    async with proxy_with({}) as (proxy, url), aiohttp.ClientSession() as http:
        async with http.patch(f"{url}/api/services/amqp/backends/echo1", json={"state": "drain"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Rabbitproxy-Access"] == "operator"
    async with proxy_with({"read_token": READER}) as (proxy, url), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/services") as resp:
            assert resp.status == 401
        async with http.patch(
            f"{url}/api/services/amqp/backends/echo1",
            json={"state": "drain"},
            headers={"Authorization": f"Bearer {READER}"},
        ) as resp:
            assert resp.status == 403
        assert proxy.services["amqp"].pool.by_name["echo1"].operator_state == "ready"


@pytest.mark.asyncio
async def test_the_admin_socket_is_the_operators_by_file_permission(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    # A socket file left by a crashed proxy is replaced, not a reason to fail.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(sock))
    assert stat.S_ISSOCK(sock.stat().st_mode)
    admin = {"token": OPERATOR, "read_token": READER, "socket": str(sock), "socket_mode": "0660"}
    async with proxy_with(admin) as (proxy, _url):
        mode = sock.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
        target = f"unix:{sock}"
        # No token at all: whoever could open the socket is the operator.
        res = await asyncio.to_thread(cli, "backend", "maint", "amqp", "echo1", "--admin", target, env={})
        assert res.exit_code == 0, res.output
        assert proxy.services["amqp"].pool.by_name["echo1"].operator_state == "maint"
        res = await asyncio.to_thread(cli, "status", "--admin", target, env={})
        assert res.exit_code == 0, res.output
        assert "maint" in res.output
        # Even an environment proxy could not be involved: there is no host to send it to.
        res = await asyncio.to_thread(cli, "backend", "ready", "amqp", "echo1", "--admin", target, env={})
        assert res.exit_code == 0, res.output
    assert not sock.exists()


@pytest.mark.asyncio
async def test_the_admin_socket_with_an_unknown_group_refuses_to_start(tmp_path: Path) -> None:
    admin = {"socket": str(tmp_path / "admin.sock"), "socket_group": "no-such-group-i26b"}
    with pytest.raises(ConfigError, match="socket_owner/socket_group: no such user or group"):
        async with proxy_with(admin):
            pass


def test_an_unreachable_socket_is_a_clear_error(tmp_path: Path) -> None:
    res = cli("status", "--admin", f"unix:{tmp_path / 'nothing.sock'}", env={})
    assert res.exit_code == 1
    assert f"cannot reach the admin API at unix:{tmp_path / 'nothing.sock'}" in res.output

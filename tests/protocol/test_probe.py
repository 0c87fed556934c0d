"""`rabbitproxy healthcheck` against a real admin API, and against HTTP answers that must not count as healthy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rabbitproxy.admin.probe import check
from rabbitproxy.cli import app
from tests.support.net import dead_port, echo_handler, free_port, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for


def _run_cli(*args: str) -> tuple[int, str]:
    # The probe reads these; the test machine's own values must not leak in.
    clean: dict[str, str | None] = {
        "RABBITPROXY_CONFIG": None,
        "RABBITPROXY_ADMIN": None,
        "RABBITPROXY_ADMIN_LISTEN": None,
    }
    result = CliRunner().invoke(app, ["healthcheck", *args], env=clean)
    return result.exit_code, result.output


@pytest.mark.asyncio
async def test_healthy_while_running_unhealthy_while_draining() -> None:
    admin = f"127.0.0.1:{free_port()}"
    async with (
        tcp_server(echo_handler) as backend_port,
        run_proxy(
            service_config([{"name": "b1", "address": "127.0.0.1", "port": backend_port}]), admin={"listen": admin}
        ) as proxy,
    ):
        # The CLI blocks, and the admin API answers from this loop: run the probe in a thread.
        code, out = await asyncio.to_thread(_run_cli, "--admin", admin)
        assert (code, out.strip()) == (0, f"healthy: http://{admin}/healthz: ok")

        # An open connection keeps the drain going, so the admin API stays up and says 503 meanwhile.
        reader, writer = await asyncio.open_connection(*listen_addr(proxy))
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        shutdown = asyncio.create_task(proxy.shutdown())
        await wait_for(lambda: proxy.state == "stopping", what="the proxy to start stopping")
        code, out = await asyncio.to_thread(_run_cli, "--admin", f"http://{admin}")
        assert code == 1
        assert "HTTP 503, status stopping" in out
        writer.close()
        await shutdown


@pytest.mark.asyncio
async def test_healthy_on_an_ipv6_loopback_admin_api_without_a_token(tmp_path: Path) -> None:
    # Issue 25 item 7: the probe sent ``Host: ::1`` unbracketed and the loopback guard refused it with 403, so a
    # proxy whose admin API listens on [::1] without a token was always reported unhealthy.
    admin = f"[::1]:{free_port('::1')}"
    config = tmp_path / "rabbitproxy.toml"
    config.write_text(f'[admin]\nlisten = "{admin}"\n')
    async with (
        tcp_server(echo_handler) as backend_port,
        run_proxy(
            service_config([{"name": "b1", "address": "127.0.0.1", "port": backend_port}]), admin={"listen": admin}
        ),
    ):
        code, out = await asyncio.to_thread(_run_cli, "--config", str(config))
    assert (code, out.strip()) == (0, f"healthy: http://{admin}/healthz: ok")


@pytest.mark.asyncio
async def test_a_proxy_in_the_environment_is_never_used() -> None:
    # Containers often inherit HTTP_PROXY; the probe must still ask the admin API itself. The proxy named here is a
    # closed port, so going through it would fail the probe.
    with dead_port() as closed:
        proxy_url = f"http://127.0.0.1:{closed}"
        env = dict.fromkeys(("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"), proxy_url)
        async with http_answer(_response("200 OK", b'{"status": "ok"}')) as base:
            clean: dict[str, str | None] = {"RABBITPROXY_CONFIG": None, "RABBITPROXY_ADMIN": None, "no_proxy": None}
            result = await asyncio.to_thread(CliRunner().invoke, app, ["healthcheck", "--admin", base], env=clean | env)
    assert (result.exit_code, result.output.strip()) == (0, f"healthy: {base}/healthz: ok")


@contextlib.asynccontextmanager
async def http_answer(raw: bytes) -> AsyncIterator[str]:
    """A server that answers every request with ``raw``; yields its base URL."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()

    async with tcp_server(handler) as port:
        yield f"http://127.0.0.1:{port}"


def _response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raw", "healthy", "detail"),
    [
        (_response("200 OK", b'{"status": "ok"}'), True, "ok"),
        (_response("200 OK", b'{"status": "starting"}'), False, "HTTP 200, status starting"),
        (_response("503 Service Unavailable", b'{"status": "ok"}'), False, "HTTP 503, status ok"),
        (_response("200 OK", b"ok"), False, "HTTP 200, status ok"),
        (_response("200 OK", b'["ok"]'), False, 'HTTP 200, status ["ok"]'),
        (_response("200 OK", b""), False, "HTTP 200, status (empty body)"),
        (b"garbage\r\n\r\n", False, "not an HTTP answer (status line 'garbage')"),
        # A proxy in front of the admin API may answer chunked; the body is read whole.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b'7\r\n{"statu\r\n9\r\ns": "ok"}\r\n0\r\n\r\n',
            True,
            "ok",
        ),
    ],
)
async def test_only_200_with_status_ok_is_healthy(raw: bytes, healthy: bool, detail: str) -> None:
    async with http_answer(raw) as base:
        result = await asyncio.to_thread(check, f"{base}/healthz", 5.0)
    assert result.healthy is healthy
    assert detail in result.detail


@pytest.mark.asyncio
async def test_no_answer_and_refused_are_unhealthy() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with tcp_server(silent) as port:
        result = await asyncio.to_thread(check, f"http://127.0.0.1:{port}/healthz", 0.3)
    assert not result.healthy
    assert result.detail.endswith("no answer within 0.3s")

    with dead_port() as closed:
        code, out = await asyncio.to_thread(_run_cli, "--admin", f"127.0.0.1:{closed}", "--timeout", "2")
    assert code == 1
    assert "unhealthy" in out
    assert "Connection refused" in out


def test_bad_admin_address_is_a_usage_error() -> None:
    code, out = _run_cli("--admin", "ftp://127.0.0.1:9080")
    assert code == 2
    assert "--admin: 'ftp://127.0.0.1:9080': the admin URL must start with http:// or https://" in out


def test_disabled_admin_in_the_config_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "rabbitproxy.toml"
    cfg.write_text(
        '[admin]\nenabled = false\n\n[[services]]\nname = "amqp"\n'
        '[[services.backends]]\nname = "r1"\naddress = "127.0.0.1"\n'
    )
    result = CliRunner().invoke(app, ["healthcheck", "--config", str(cfg)])
    assert result.exit_code == 1
    assert "the admin API is disabled" in result.output

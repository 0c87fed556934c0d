"""``rabbitproxy reload`` waits for the outcome and exits 1 with the reasons when the proxy refuses the file
(issue 26, item 6): what the systemd unit's ExecReload relies on to fail a "systemctl reload" that did not happen.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rabbitproxy.cli import app
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.process import to_toml
from tests.support.proxy import proxy_config, run_proxy, service_config
from tests.support.tls import make_ca


def reload_cli(url: str) -> Any:
    return CliRunner().invoke(app, ["reload", "--admin", url], env={})


@pytest.mark.asyncio
async def test_a_reload_refused_for_a_taken_port_or_a_bad_certificate_exits_1_with_the_reasons(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rabbitproxy.toml"
    ca = make_ca(tmp_path / "pki", "reload")
    cert, key = ca.issue("server")
    async with tcp_server(echo_handler) as port:
        entries = [{"name": "echo1", "address": "127.0.0.1", "port": port}]
        svc = service_config(entries)
        admin_port = free_port()
        admin = {"listen": f"127.0.0.1:{admin_port}"}
        url = f"http://127.0.0.1:{admin_port}"
        async with run_proxy(svc, admin=admin, config_path=path) as proxy:
            res = await asyncio.to_thread(reload_cli, url)
            assert res.exit_code == 0, res.output
            assert "reloaded:" in res.output and "unchanged: amqp" in res.output
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = f"127.0.0.1:{taken.getsockname()[1]}"
                added = service_config(entries, name="second", listen=busy)
                path.write_text(to_toml(proxy_config(svc, added, admin=admin)))
                res = await asyncio.to_thread(reload_cli, url)
            assert res.exit_code == 1, res.output
            assert "invalid configuration; nothing was changed" in res.output
            assert f"  services['second'].listen: cannot listen on {busy}: Address already in use" in res.output
            assert set(proxy.services) == {"amqp"}
            # A certificate file that holds no certificate: refused, and the running configuration stays.
            bad = tmp_path / "bad.pem"
            bad.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
            tls = service_config(entries, name="tls", tls={"cert": str(bad), "key": str(key)})
            path.write_text(to_toml(proxy_config(svc, tls, admin=admin)))
            res = await asyncio.to_thread(reload_cli, url)
            assert res.exit_code == 1, res.output
            # Read when the file is validated (check-config's words), before anything is bound.
            assert f"  services['tls'].tls.cert: '{bad}' holds no certificate OpenSSL can read" in res.output
            assert set(proxy.services) == {"amqp"}
            # The same file with the real certificate is taken.
            tls = service_config(entries, name="tls", tls={"cert": str(cert), "key": str(key)})
            path.write_text(to_toml(proxy_config(svc, tls, admin=admin)))
            res = await asyncio.to_thread(reload_cli, url)
            assert res.exit_code == 0, res.output
            assert "added: tls" in res.output

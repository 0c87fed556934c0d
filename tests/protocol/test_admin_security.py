"""The admin API against an attacker: no token, a wrong token, cross-site forms, simple GETs, DNS rebinding."""

from __future__ import annotations

import hmac
import re
from typing import Any

import aiohttp
import pytest

from rabbitproxy.admin import access
from rabbitproxy.admin import api as admin
from rabbitproxy.control.supervisor import Supervisor
from tests.support.net import free_port
from tests.support.proxy import run_proxy, service_config

TOKEN = "s3cret-token"
SAFE = {"GET", "HEAD", "OPTIONS"}


def svc() -> dict[str, Any]:
    return service_config([{"name": "b1", "address": "127.0.0.1", "port": free_port()}])


def mutating_routes(proxy: Supervisor) -> list[tuple[str, str]]:
    """Every non-safe (method, path) the admin app serves, path parameters filled with real names.

    Read from the router itself, so an endpoint added later is covered without editing this test.
    """
    out = []
    for route in admin.make_app(proxy, TOKEN).router.routes():
        if route.method in SAFE or route.method == "*":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str)
        path = path.replace("{service}", "amqp").replace("{backend}", "b1").replace("{id}", "1")
        assert not re.search(r"\{\w+\}", path), f"unknown parameter in {path}"
        out.append((route.method, path))
    return out


def state(proxy: Supervisor) -> tuple[str, int]:
    b = proxy.services["amqp"].pool.by_name["b1"]
    return b.operator_state, b.configured_weight


@pytest.mark.asyncio
async def test_every_mutating_endpoint_needs_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    # The token check must go through hmac.compare_digest (constant time), not ==.
    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    async with (
        run_proxy(svc(), admin={"listen": f"127.0.0.1:{port}", "token": TOKEN}) as p,
        aiohttp.ClientSession() as http,
    ):
        routes = mutating_routes(p)
        assert ("PATCH", "/api/services/amqp/backends/b1") in routes and ("POST", "/api/reload") in routes
        body = {"state": "maint", "weight": 1}
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                async with http.request(method, base + path, json=body, headers=headers) as resp:
                    assert resp.status == 401, (method, path, headers)
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert state(p) == ("ready", 100)
        assert (b"wrong", TOKEN.encode()) in compared
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.patch(f"{base}/api/services/amqp/backends/b1", json=body, headers=auth) as resp:
            assert resp.status == 200
        assert state(p) == ("maint", 1)


@pytest.mark.asyncio
async def test_no_state_change_from_a_simple_get_or_a_cross_site_form() -> None:
    # Without a token (loopback only), the browser's same-origin rules are all that protect the API.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with run_proxy(svc(), admin={"listen": f"127.0.0.1:{port}"}) as p, aiohttp.ClientSession() as http:
        for method, path in mutating_routes(p):
            # A link or <img> can make a browser GET any URL, query string included.
            async with http.get(f"{base}{path}?state=maint&weight=1") as resp:
                # GET /api/connections/{id} reads one connection; there is none with id 1 here, hence 404.
                allowed = (200, 404, 405) if path.startswith("/api/connections/") else (200, 405)
                assert resp.status in allowed, (path, resp.status)
            # An HTML form can POST urlencoded or text/plain bodies to any origin without a preflight.
            for content_type, data in (
                ("application/x-www-form-urlencoded", "state=maint&weight=1"),
                ("text/plain", '{"state": "maint", "weight": 1}'),
            ):
                headers = {"Content-Type": content_type, "Origin": "http://evil.example"}
                async with http.post(base + path, data=data, headers=headers) as resp:
                    assert resp.status in (403, 405), (path, content_type, resp.status)
            # fetch() from another origin with a JSON body: the Origin gives it away.
            async with http.request(
                method, base + path, json={"state": "maint"}, headers={"Origin": "http://evil.example"}
            ) as resp:
                assert resp.status == 403
        # No CORS grant that would let another origin read answers or send JSON after a preflight.
        async with http.options(
            f"{base}/api/services/amqp/backends/b1",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "PATCH"},
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
        assert state(p) == ("ready", 100)
        # The System Overview page itself forbids framing (clickjacking) and foreign scripts.
        async with http.get(f"{base}/") as resp:
            csp = resp.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp


@pytest.mark.asyncio
async def test_dns_rebinding_cannot_drive_a_tokenless_api() -> None:
    # evil.example resolves to 127.0.0.1 after the page loaded: the browser then sends Host and Origin that agree.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with run_proxy(svc(), admin={"listen": f"127.0.0.1:{port}"}) as p, aiohttp.ClientSession() as http:
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        async with http.patch(f"{base}/api/services/amqp/backends/b1", json={"state": "maint"}, headers=evil) as resp:
            assert resp.status == 403
        async with http.get(f"{base}/api/services", headers={"Host": f"evil.example:{port}"}) as resp:
            assert resp.status == 403
        assert state(p) == ("ready", 100)
        # The page's own use, by loopback address or localhost, still works.
        # A bracketed IPv6 loopback is loopback too, as an HTTP client writes it (the page on [::1], the probe).
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "[::1]"):
            own = {"Host": host, "Origin": f"http://{host}"}
            async with http.patch(f"{base}/api/services/amqp/backends/b1", json={"weight": 50}, headers=own) as resp:
                assert resp.status == 200
        assert state(p) == ("ready", 50)
        # Unbracketed, ``::1`` is not a valid Host; it names no loopback address and stays refused.
        async with http.get(f"{base}/api/services", headers={"Host": "::1"}) as resp:
            assert resp.status == 403

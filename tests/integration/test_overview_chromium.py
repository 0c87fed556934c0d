"""The System Overview page in a real headless Chromium, driven over the DevTools protocol.

No WebDriver and nothing downloaded: Debian's ``chromium`` is started with ``--remote-debugging-port=0`` and we
speak the Chrome DevTools Protocol over a websocket with aiohttp (already a dependency). Clicks are real mouse
events at the button's position, so the page's own event handlers and fetch calls do the work.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.dev.cluster import DevCluster
from rabbitproxy.protocols.amqp_handshake import Handshake
from tests.support.amqp import client_dead
from tests.support.cluster import backends_for
from tests.support.net import echo_handler, free_port, tcp_server
from tests.support.proxy import listen_addr, run_proxy, service_config
from tests.support.waiting import wait_for

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
TOKEN = "overview-test-token"
READ_TOKEN = "overview-read-token"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1500,700",
    "--remote-debugging-port=0",
]


class Page:
    """One browser tab over CDP: send commands, await their results."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            fut = self.pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def click(self, selector: str) -> None:
        """A real left click in the middle of the element, as a person would make it."""
        box = await self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        assert box is not None, f"no element matches {selector}"
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Page]:
    exe = shutil.which("chromium")
    assert exe is not None, "Debian's chromium package is required (apt-get install chromium)"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    proc = await asyncio.create_subprocess_exec(
        exe,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        # Chromium writes the port it picked into the profile directory once DevTools listens.
        port_file = profile / "DevToolsActivePort"

        def port_written() -> int | None:
            assert proc.returncode is None, f"chromium exited with {proc.returncode}"
            lines = port_file.read_text().split() if port_file.exists() else []
            return int(lines[0]) if lines else None

        port = await wait_for(port_written, timeout=60, what="chromium's DevTools port")
        async with aiohttp.ClientSession() as http:

            async def page_target() -> str | None:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = await resp.json()
                return next((t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"), None)

            ws_url = await wait_for(page_target, timeout=30, what="a page target")
            ws = await http.ws_connect(ws_url, max_msg_size=0)
            page = Page(ws)
            try:
                yield page
            finally:
                await page.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.asyncio
async def test_overview_lists_backends_and_drain_button_works(cluster: DevCluster, tmp_path: Path) -> None:
    admin_port = free_port()
    url = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        run_proxy(
            service_config(backends_for(cluster)), admin={"listen": f"127.0.0.1:{admin_port}", "token": TOKEN}
        ) as proxy,
        chromium(tmp_path) as page,
        aiohttp.ClientSession(headers=auth) as http,
    ):
        host, port = listen_addr(proxy)
        # One real AMQP client through the proxy so the page has a connection to show.
        amqp = await aio_pika.connect(f"amqp://guest:guest@{host}:{port}/")
        try:
            await page.send("Page.enable")
            await page.send("Page.navigate", url=url + "/")
            # A token is configured: the page must ask for it before it can show anything.
            await wait_for(
                lambda: page.eval("document.querySelector('#tokenform.show') !== null"), what="the token prompt"
            )
            assert await page.eval("document.querySelectorAll('tr[data-backend]').length") == 0
            await page.click("#token")
            await page.send("Input.insertText", text=TOKEN)
            await page.click("#tokensave")
            await wait_for(
                lambda: page.eval("document.querySelectorAll('tr[data-backend]').length === 3"),
                what="three backend rows",
            )
            names = await page.eval("[...document.querySelectorAll('tr[data-backend]')].map(r => r.dataset.backend)")
            assert names == ["rabbit1", "rabbit2", "rabbit3"]
            statuses = await page.eval(
                "[...document.querySelectorAll('.badge[data-status]')].map(b => b.dataset.status)"
            )
            assert statuses == ["up", "up", "up"]

            # Drain the node that holds our client, as an operator would before patching it.
            pool = proxy.services["amqp"].pool
            held = next(b.name for b in pool.backends if b.active == 1)
            others = [b.name for b in pool.backends if b.name != held]
            await page.click(f'button[data-action="drain"][data-backend="{held}"]')

            async def api_state() -> str:
                async with http.get(f"{url}/api/services/amqp/backends/{held}") as resp:
                    return str((await resp.json())["admin_state"])

            def badge(name: str) -> str:
                return f"document.querySelector('tr[data-backend=\"{name}\"] .badge').textContent"

            await wait_for(lambda: _equals(api_state(), "drain"), what=f"{held} drained as seen by the API")
            await wait_for(lambda: page.eval(badge(held) + " === 'drain'"), what=f"the page showing {held} as drain")
            # Drain keeps the open connection: the client is still there and still counted.
            assert amqp.connected.is_set()
            assert pool.by_name[held].active == 1
            # Set a weight from the page as well.
            await page.eval(
                f"document.querySelector('tr[data-backend=\"{others[0]}\"] input[data-weight-input]').value = '25'"
            )
            await page.click(f'tr[data-backend="{others[0]}"] button[data-action="weight"]')

            async def api_weight() -> int:
                async with http.get(f"{url}/api/services/amqp/backends/{others[0]}") as resp:
                    return int((await resp.json())["weight"])

            await wait_for(lambda: _equals(api_weight(), 25), what=f"{others[0]}'s weight set from the page")
            # The page refreshes by itself: a change made elsewhere shows up without reloading the page.
            pool.by_name[others[1]].set_operator_state("maint", "backend maint")
            await wait_for(lambda: page.eval(badge(others[1]) + " === 'maint'"), what=f"{others[1]} shown as maint")
            # What an operator reads: the rendered text of every row (innerText, so hidden or unrendered text does
            # not count) must match the live proxy's state, column by column, once the page's refresh caught up.
            await wait_for(lambda: _shown_matches(page, proxy), timeout=30, what="the rows showing the live state")
            title = await page.eval(
                "(() => { const h = document.querySelector('section[data-service=\"amqp\"] h2');"
                " return [h.firstChild.textContent, h.querySelector('small').innerText]; })()"
            )
            listen = proxy.services["amqp"].config.listen
            assert title[0] == "amqp"
            assert title[1].startswith(f"{listen} · weighted-round-robin · 1 open / "), title
            assert await page.eval("document.getElementById('state').innerText") == "proxy running"
            shot = await page.send("Page.captureScreenshot", format="png")
            png = base64.b64decode(shot["data"])
            # A screenshot of the page's viewport, not an empty image: the PNG header names the viewport's size.
            viewport = await page.eval("[innerWidth, innerHeight].map(v => Math.round(v * devicePixelRatio))")
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            assert list(struct.unpack(">II", png[16:24])) == viewport
            ARTIFACTS.mkdir(exist_ok=True)
            loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
            (ARTIFACTS / f"overview-{loop_name}.png").write_bytes(png)
        finally:
            await amqp.close()


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


ROWS_SHOWN = """[...document.querySelectorAll('tr[data-backend]')].map(r => ({
    visible: r.getBoundingClientRect().height > 0,
    cells: [...r.cells].map(td => td.innerText.trim()),
}))"""


def _row_expected(backend: Backend) -> dict[str, str]:
    """The columns of a backend's row as the page should show them (name, address, status, weights, connections)."""
    return {
        "name": backend.name,
        "addr": f"{backend.address}:{backend.port}",
        # The badge is styled in upper case, and innerText shows what is rendered.
        "status": backend.status.upper(),
        "weight": str(backend.configured_weight) + (" *" if backend.weight_overridden else ""),
        "eweight": str(backend.effective_weight),
        "active": str(backend.active),
        "total": str(backend.total),
    }


async def _shown_matches(page: Page, proxy: Supervisor) -> bool:
    rows = await page.eval(ROWS_SHOWN)
    columns = ["name", "addr", "status", "health", "weight", "eweight", "agent", "rabbitmq", "active", "total"]
    shown = [dict(zip(columns, row["cells"], strict=False)) for row in rows if row["visible"]]
    expected = [_row_expected(b) for b in proxy.services["amqp"].pool.backends]
    return [{key: row.get(key) for key in expected[0]} for row in shown] == expected


@pytest.mark.asyncio
async def test_overview_shows_each_rabbitmq_node_with_its_alarm_and_maintenance(
    cluster: DevCluster, tmp_path: Path
) -> None:
    admin_port = free_port()
    backends = backends_for(cluster)
    for entry, node in zip(backends, cluster.nodes, strict=True):
        entry["management_port"] = node.management_port
    # A long interval: after its first poll the monitor leaves alone the state this test sets on the backends.
    svc = service_config(backends, rabbitmq={"interval": 600.0, "timeout": 10.0})
    async with (
        run_proxy(svc, admin={"listen": f"127.0.0.1:{admin_port}"}) as proxy,
        chromium(tmp_path) as page,
    ):
        pool = proxy.services["amqp"].pool
        await wait_for(
            lambda: all(b.rabbitmq is not None and b.rabbitmq.node for b in pool.backends),
            timeout=60,
            what="every node named by the monitor",
        )
        await page.send("Page.enable")
        await page.send("Page.navigate", url=f"http://127.0.0.1:{admin_port}/")

        def cell(name: str) -> str:
            return f"document.querySelector('tr[data-backend=\"{name}\"] td.rabbitmq')"

        await wait_for(
            lambda: page.eval(f"{cell('rabbit1')} !== null && {cell('rabbit1')}.textContent.includes('3.10.8')"),
            what="rabbit1's node and version on the page",
        )
        assert cluster.nodes[0].name in await page.eval(f"{cell('rabbit1')}.textContent")
        r2, r3 = pool.by_name["rabbit2"], pool.by_name["rabbit3"]
        assert r2.rabbitmq is not None and r3.rabbitmq is not None
        r2.rabbitmq = replace(r2.rabbitmq, alarms=("memory",))
        r3.rabbitmq = replace(r3.rabbitmq, maintenance=True, maintenance_detail="drained")
        await wait_for(
            lambda: page.eval(f"{cell('rabbit2')}.querySelector('.badge.alarm[data-alarm=\"memory\"]') !== null"),
            what="rabbit2's memory alarm badge",
        )
        await wait_for(
            lambda: page.eval(
                "document.querySelector('tr[data-backend=\"rabbit3\"] .badge[data-status]').textContent"
                " === 'maintenance'"
            ),
            what="rabbit3's status shown as maintenance",
        )
        assert await page.eval(f"{cell('rabbit3')}.querySelector('.badge.maintenance') !== null")
        assert await page.eval("document.querySelector('tr[data-backend=\"rabbit3\"]').className") == "maintenance"
        shot = await page.send("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
        (ARTIFACTS / f"overview-rabbitmq-{loop_name}.png").write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.asyncio
async def test_overview_connections_view_filters_and_sorts(cluster: DevCluster, tmp_path: Path) -> None:
    admin_port = free_port()
    url = f"http://127.0.0.1:{admin_port}"
    tag = f"page-{admin_port}"
    async with (
        run_proxy(
            service_config(backends_for(cluster)), admin={"listen": f"127.0.0.1:{admin_port}", "token": TOKEN}
        ) as proxy,
        chromium(tmp_path) as page,
    ):
        host, port = listen_addr(proxy)
        service = proxy.services["amqp"]
        clients = []
        ids: dict[str, int] = {}
        try:
            for name in (f"{tag}-orders", f"{tag}-billing"):
                before = {c.id for c in service.connections}
                clients.append(
                    await aio_pika.connect(
                        f"amqp://guest:guest@{host}:{port}/", client_properties={"connection_name": name}
                    )
                )
                [leg] = [c for c in service.connections if c.id not in before]
                if leg.handshake is None:
                    # Stand-in until the handshake reader (issue 14 part A) is on the data path: the identity it
                    # records for this client. Once it is there it has filled this in from the client's handshake.
                    leg.handshake = Handshake(connection_name=name, user="guest", vhost="/")
                ids[name] = leg.id
            # The billing client moves more bytes, so sorting by bytes in puts it first.
            channel = await clients[1].channel()
            queue = await channel.declare_queue(f"{tag}-q", auto_delete=True)
            await channel.default_exchange.publish(aio_pika.Message(b"y" * 20000), routing_key=queue.name)

            await page.send("Page.enable")
            await page.send("Page.navigate", url=url + "/")
            await wait_for(
                lambda: page.eval("document.querySelector('#tokenform.show') !== null"), what="the token prompt"
            )
            await page.click("#token")
            await page.send("Input.insertText", text=TOKEN)
            await page.click("#tokensave")

            rows = (
                "[...document.querySelectorAll('#connrows tr')]"
                ".map(r => r.querySelector('[data-col=name]').textContent)"
            )
            # Oldest first by default.
            await wait_for(
                lambda: _equals(page.eval(rows), [f"{tag}-orders", f"{tag}-billing"]), what="both connections by age"
            )
            first = await page.eval(
                "[...document.querySelectorAll('#connrows tr')[0].querySelectorAll('td')].map(td => td.textContent)"
            )
            assert first[0] == str(ids[f"{tag}-orders"])
            assert first[2] in ("rabbit1", "rabbit2", "rabbit3")
            assert first[3].startswith("127.0.0.1:")
            await page.eval(
                "document.getElementById('connsort').value = 'bytes_in';"
                " document.getElementById('connsort').dispatchEvent(new Event('change'))"
            )
            await wait_for(
                lambda: _equals(page.eval(rows), [f"{tag}-billing", f"{tag}-orders"]), what="sorted by bytes in"
            )
            # The filter box: typed as a person would, matched against the connection name by the API.
            await page.click("#connfilter")
            await page.send("Input.insertText", text="ORDERS")
            await wait_for(lambda: _equals(page.eval(rows), [f"{tag}-orders"]), what="only the orders client")
            assert await page.eval("document.getElementById('conncount').textContent") == "1 shown"
            shot = await page.send("Page.captureScreenshot", format="png")
            ARTIFACTS.mkdir(exist_ok=True)
            loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
            (ARTIFACTS / f"overview-connections-{loop_name}.png").write_bytes(base64.b64decode(shot["data"]))

            # Close it from the page: the reason prompt is answered as an operator would (a dialog would stop the
            # headless page), the API closes it (by TCP: no [services.rabbitmq] here) and the row goes away.
            await page.eval("window.prompt = () => 'closed from the page'")
            await page.click(f'button[data-action="close-connection"][data-conn-id="{ids[f"{tag}-orders"]}"]')
            await wait_for(lambda: client_dead(clients[0]), timeout=30, what="the orders client closed")
            await wait_for(lambda: _equals(page.eval(rows), []), what="its row gone")
            assert service.ended[CloseReason.OPERATOR_CLOSE] == 1
            assert not client_dead(clients[1])
        finally:
            for c in clients:
                if not client_dead(c):
                    await c.close()


@pytest.mark.asyncio
async def test_overview_with_the_read_token_shows_no_buttons(tmp_path: Path) -> None:
    # Issue 26, item 4: a reader sees every backend and connection, and no control it may not use.
    admin_port = free_port()
    url = f"http://127.0.0.1:{admin_port}"
    admin = {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN, "read_token": READ_TOKEN}
    async with (
        tcp_server(echo_handler) as port,
        run_proxy(service_config([{"name": "echo1", "address": "127.0.0.1", "port": port}]), admin=admin) as proxy,
        chromium(tmp_path) as page,
    ):
        _, writer = await asyncio.open_connection(*listen_addr(proxy))
        try:
            await page.send("Page.enable")
            await page.send("Page.navigate", url=url + "/")
            await wait_for(
                lambda: page.eval("document.querySelector('#tokenform.show') !== null"), what="the token prompt"
            )
            await page.click("#token")
            await page.send("Input.insertText", text=READ_TOKEN)
            await page.click("#tokensave")
            await wait_for(
                lambda: page.eval("document.querySelectorAll('tr[data-conn-id]').length === 1"),
                what="the backend row and the connection",
            )
            assert await page.eval("document.querySelectorAll('tr[data-backend]').length") == 1
            visible = (
                "[...document.querySelectorAll('[data-action], [data-weight-input]')]"
                ".filter(e => getComputedStyle(e).display !== 'none').length"
            )
            assert await page.eval("document.querySelectorAll('[data-action]').length") > 0
            assert await page.eval(visible) == 0
            assert await page.eval("getComputedStyle(document.getElementById('readonly')).display") != "none"
            # The same page with the operator's token has its buttons back.
            await page.eval(f"sessionStorage.setItem('rabbitproxy-admin-token', {json.dumps(TOKEN)})")
            await wait_for(lambda: _equals_after(page, visible), what="the buttons for the operator")
            assert await page.eval("getComputedStyle(document.getElementById('readonly')).display") == "none"
        finally:
            writer.close()


async def _equals_after(page: Page, visible: str) -> bool:
    return bool(await page.eval(visible))

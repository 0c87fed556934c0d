"""Admission control through a running proxy: clients over connect_rate are held, not refused, and paced.

TCP backends in the test's loop note when they accept each connection (the loop's clock): the pacing is judged by
what the backends see, as a broker would, with a margin for connect latency that only spreads connections out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.admin.metrics import registry_for, render
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.relay.admission import AdmissionDesk
from rabbitproxy.relay.service import Service
from tests.support.metrics import metric
from tests.support.net import tcp_server
from tests.support.pacing import densest
from tests.support.proxy import proxy_config, run_proxy, service_config
from tests.support.waiting import wait_for

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def stamping_backend(tag: bytes = b"x") -> AsyncIterator[tuple[int, list[float]]]:
    """An echo backend that greets with ``tag`` and notes the loop time of every accept; yields (port, times)."""
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        times.append(loop.time())
        writer.write(tag)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async with tcp_server(handler) as port:
        yield port, times


def paced(port: int | list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    backends = port if isinstance(port, list) else [{"name": "b1", "address": "127.0.0.1", "port": port}]
    return service_config(backends, name="svc", protocol="tcp", **extra)


async def open_client(addr: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*addr)


async def greeted(reader: asyncio.StreamReader, timeout: float = 30.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(1), timeout)


def held_now(service: Service) -> int:
    figures = service.admission_figures()
    return figures.waiting if figures is not None else 0


async def test_a_burst_of_clients_is_held_and_let_through_at_the_rate() -> None:
    rate, burst, clients = 4.0, 2, 12
    async with stamping_backend() as (port, times), run_proxy(paced(port, connect_rate=rate, connect_burst=burst)) as p:
        addr = p.services["svc"].bound[0]
        conns = await asyncio.gather(*(open_client(addr) for _ in range(clients)))
        # Every client is served in the end: none is refused, none times out (30 s by default).
        assert [await greeted(r) for r, _ in conns] == [b"x"] * clients
        for r, w in conns:
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
        service = p.services["svc"]
        figures = service.admission_figures()
        assert figures is not None and figures.waiting == 0 and figures.held >= clients - burst
        assert service.ended[CloseReason.ADMISSION_TIMEOUT] == 0
        for _, w in conns:
            w.close()
    # What the backend saw: never more than the burst plus the rate in a second, with half a second's margin for
    # connect latency; all twelve at once (as without admission control) would break the bound.
    assert len(times) == clients
    assert densest(times, 1.0) <= burst + rate * 1.5
    assert max(times) - min(times) >= (clients - burst) / rate - 0.5


async def test_a_client_held_past_connect_queue_timeout_is_closed_with_admission_timeout() -> None:
    async with (
        stamping_backend() as (port, _),
        run_proxy(paced(port, connect_rate=0.25, connect_burst=1, connect_queue_timeout=0.5)) as p,
    ):
        addr = p.services["svc"].bound[0]
        (r1, w1), (r2, w2), (r3, w3) = [await open_client(addr) for _ in range(3)]
        assert await greeted(r1) == b"x"
        # The next token is 4 s away; the other two are closed after half a second, with nothing from a backend.
        assert await asyncio.wait_for(r2.read(), 30) == b""
        assert await asyncio.wait_for(r3.read(), 30) == b""
        service = p.services["svc"]
        await wait_for(lambda: service.ended[CloseReason.ADMISSION_TIMEOUT] == 2, what="two admission timeouts")
        figures = service.admission_figures()
        assert figures is not None and figures.waiting == 0 and figures.held == 2
        assert sum(figures.wait_buckets) == 2 and figures.wait_sum >= 1.0
        for w in (w1, w2, w3):
            w.close()


async def test_held_clients_count_against_max_connections_and_a_leaving_one_is_forgotten() -> None:
    async with (
        stamping_backend() as (port, times),
        run_proxy(paced(port, connect_rate=0.1, connect_burst=1, max_connections=3)) as p,
    ):
        addr = p.services["svc"].bound[0]
        service = p.services["svc"]
        (r1, w1) = await open_client(addr)
        assert await greeted(r1) == b"x"
        held = [await open_client(addr) for _ in range(2)]
        await wait_for(lambda: held_now(service) == 2, what="two held")
        r4, w4 = await open_client(addr)
        assert await asyncio.wait_for(r4.read(), 30) == b""
        await wait_for(lambda: service.ended[CloseReason.LIMIT] == 1, what="the fourth refused (limit)")
        # A held client that gives up leaves the queue at once; nothing of it stays behind.
        held[0][1].close()
        await wait_for(lambda: held_now(service) == 1, what="the leaver forgotten")
        assert service.active == 2 and len(times) == 1
        for w in (w1, held[1][1], w4):
            w.close()


async def test_a_reload_that_drops_the_rate_lets_every_held_client_through() -> None:
    async with stamping_backend() as (port, times), run_proxy(paced(port, connect_rate=0.1, connect_burst=1)) as p:
        addr = p.services["svc"].bound[0]
        conns = [await open_client(addr) for _ in range(4)]
        service = p.services["svc"]
        await wait_for(lambda: held_now(service) == 3, what="three held")
        result = await p.reload(config_mod.validate(proxy_config(paced(port)), "test"))
        assert result.changed == ["svc"], result
        assert [await greeted(r) for r, _ in conns] == [b"x"] * 4
        assert len(times) == 4
        for _, w in conns:
            w.close()


async def test_a_backend_out_of_tokens_is_passed_over_and_waited_for_when_alone() -> None:
    async with stamping_backend(b"a") as (pa, _), stamping_backend(b"b") as (pb, _):
        backends = [
            {"name": "a", "address": "127.0.0.1", "port": pa, "connect_rate": 0.5},
            {"name": "b", "address": "127.0.0.1", "port": pb},
        ]
        async with run_proxy(paced(backends)) as p:
            addr = p.services["svc"].bound[0]
            conns = [await open_client(addr) for _ in range(6)]
            tags = [await greeted(r) for r, _ in conns]
            # Round robin would alternate; a's one token goes to the first client, b takes the rest at once.
            assert tags.count(b"a") == 1 and tags.count(b"b") == 5
            for _, w in conns:
                w.close()
        backends[1]["weight"] = 0
        async with run_proxy(paced(backends)) as p:
            addr = p.services["svc"].bound[0]
            first, second = await open_client(addr), await open_client(addr)
            assert await greeted(first[0]) == b"a"
            # b takes nothing (weight 0), so the second client waits for a's next token (2 s) instead of failing.
            assert await greeted(second[0]) == b"a"
            service = p.services["svc"]
            assert service.ended[CloseReason.NO_BACKEND] == 0
            figures = service.admission_figures()
            assert figures is not None and figures.held == 1 and figures.wait_sum >= 1.0
            for conn in (first, second):
                conn[1].close()


async def test_metrics_show_the_rate_the_queue_and_the_waits() -> None:
    async with stamping_backend() as (port, _), run_proxy(paced(port, connect_rate=0.2, connect_burst=1)) as p:
        addr = p.services["svc"].bound[0]
        conns = [await open_client(addr) for _ in range(3)]
        service = p.services["svc"]
        await wait_for(lambda: held_now(service) == 2, what="two held")
        text = render(registry_for(p))[0].decode()
        assert metric(text, "rabbitproxy_service_connect_rate", service="svc") == 0.2
        assert metric(text, "rabbitproxy_service_admission_waiting", service="svc") == 2
        assert metric(text, "rabbitproxy_service_admission_oldest_wait_seconds", service="svc") >= 0
        assert metric(text, "rabbitproxy_service_admission_wait_seconds_count", service="svc") == 0
        for _, w in conns:
            w.close()
        await wait_for(lambda: held_now(service) == 0, what="the leavers forgotten")
        text = render(registry_for(p))[0].decode()
        assert metric(text, "rabbitproxy_service_admission_wait_seconds_count", service="svc") == 0


async def test_the_desk_rearms_its_timer_whatever_kind_of_handle_the_loop_gave() -> None:
    """uvloop answers call_at for a time already past with a plain Handle (no when()); re-arming must not ask it.

    Seen live as an AttributeError out of connection_made in a storm of 1,200 clients: the client was reset.
    """
    loop = asyncio.get_running_loop()
    released: list[str] = []
    cfg = config_mod.ServiceConfig.model_validate(paced(1, connect_rate=1000.0, connect_burst=1))
    desk: AdmissionDesk[str] = AdmissionDesk(loop, cfg, released.append, lambda _: None)
    assert desk.admit("a")
    assert not desk.admit("b")
    desk.release_all()  # due at once: the timer is now whatever the loop makes of a time already past
    assert not desk.admit("c")
    await wait_for(lambda: released == ["b", "c"], what="both released")
    assert len(desk) == 0

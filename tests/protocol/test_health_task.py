"""A health-check task on a running loop: a probe that raises is a failed check, and the loop goes on."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from rabbitproxy.config import ServiceConfig
from rabbitproxy.control import health
from rabbitproxy.control.health import ProbeResult
from rabbitproxy.relay.service import Service
from rabbitproxy.tasks import cancel_and_wait
from tests.support.waiting import wait_for


@pytest.mark.asyncio
async def test_a_probe_that_raises_counts_as_a_failed_check_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # getaddrinfo raises UnicodeError (not OSError) for "rabbit1..example.com"; any other bug of ours likewise must
    # not end the checks, or the backend's health freezes (up for a dead node).
    cfg = ServiceConfig.model_validate(
        {
            "name": "amqp",
            "listen": "127.0.0.1:5999",
            "health_check": {"type": "tcp", "interval": 0.02, "rise": 1, "fall": 2},
            "backends": [{"name": "a", "address": "10.0.0.1", "port": 5672}],
        }
    )
    service = Service(cfg)
    backend = service.pool.backends[0]
    calls: list[bool] = []
    release = asyncio.Event()

    async def scripted_probe(*args: object) -> ProbeResult:
        calls.append(backend.healthy)
        n = len(calls)
        if n == 2:
            raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label empty or too long)")
        if n == 3:
            raise RuntimeError("a bug of ours")
        if n == 4:
            # Hold the loop here so the state after the two failures can be read.
            await release.wait()
        return ProbeResult(True, "TCP connect ok")

    monkeypatch.setattr(health, "probe_tcp", scripted_probe)
    with capture_logs() as logs:
        task = asyncio.get_running_loop().create_task(health.health_task(service, backend))
        try:
            await wait_for(lambda: len(calls) == 4, timeout=10, what="the fourth check")
            # Up after the first check, down after `fall` = 2 failed ones.
            assert calls[1:] == [True, True, False]
            assert not backend.healthy
            assert backend.health_detail == "check error: RuntimeError: a bug of ours"
            release.set()
            await wait_for(lambda: backend.healthy, timeout=10, what="the backend up again")
            assert not task.done()
        finally:
            await cancel_and_wait([task])
    failures = [e for e in logs if e["event"] == "health check failed unexpectedly"]
    assert [type(e["exc_info"]) for e in failures] == [UnicodeError, RuntimeError]
    assert task.cancelled()

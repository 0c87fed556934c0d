"""A monitor task (health checks, feedback agent) that dies is restarted by its owner; cancellation is no death."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from rabbitproxy import config as config_mod
from rabbitproxy.balancing.backend import Backend
from rabbitproxy.control import supervisor as supervisor_mod
from rabbitproxy.control.supervisor import Supervisor
from rabbitproxy.relay.service import Service
from rabbitproxy.tasks import Backoff, cancel_and_wait, run_restarting
from tests.support.waiting import wait_for


def test_backoff_doubles_to_its_cap_and_resets_after_a_good_run() -> None:
    backoff = Backoff(first=1.0, most=30.0, reset_after=60.0)
    assert [backoff.next(ran_for=0.1) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.next(ran_for=61.0) == 1.0
    assert backoff.next(ran_for=0.1) == 2.0


@pytest.mark.asyncio
async def test_run_restarting_restarts_a_task_that_raises_or_returns() -> None:
    starts = 0
    running = asyncio.Event()

    async def flaky() -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise RuntimeError("a bug of ours")
        if starts == 2:
            return
        running.set()
        await asyncio.Event().wait()

    with capture_logs() as logs:
        task = asyncio.get_running_loop().create_task(run_restarting(flaky, "flaky", Backoff(first=0.01, most=0.02)))
        try:
            await wait_for(running.is_set, timeout=10, what="the third start")
        finally:
            await cancel_and_wait([task])
    assert task.cancelled()
    assert starts == 3
    events = [(e["event"], type(e.get("exc_info"))) for e in logs]
    assert events == [("task died, restarting", RuntimeError), ("task ended, restarting", type(None))]


@pytest.mark.asyncio
async def test_cancelling_is_not_a_death_even_during_the_back_off() -> None:
    starts = 0

    async def dies() -> None:
        nonlocal starts
        starts += 1
        raise RuntimeError("a bug of ours")

    with capture_logs() as logs:
        # A long back-off: the task is asleep in it when cancelled, and must end at once.
        task = asyncio.get_running_loop().create_task(run_restarting(dies, "dies", Backoff(first=3600.0)))
        await wait_for(lambda: starts == 1 and len(logs) == 1, timeout=10, what="the first death")
        async with asyncio.timeout(5):
            await cancel_and_wait([task])
    assert task.cancelled()
    assert starts == 1
    assert [e["event"] for e in logs] == ["task died, restarting"]


@pytest.mark.asyncio
async def test_a_cancelled_error_not_aimed_at_the_task_is_a_death() -> None:
    # E.g. a library that lets a CancelledError of its own escape: nobody cancelled the monitor, so it must not end.
    starts = 0
    running = asyncio.Event()

    async def stray_cancel() -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise asyncio.CancelledError
        running.set()
        await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(run_restarting(stray_cancel, "stray", Backoff(first=0.01)))
    try:
        await wait_for(running.is_set, timeout=10, what="the restart after a stray CancelledError")
    finally:
        await cancel_and_wait([task])
    assert starts == 2


def _config() -> config_mod.Config:
    return config_mod.validate(
        {
            "services": [
                {
                    "name": "amqp",
                    "listen": "127.0.0.1:5999",
                    "health_check": {"type": "tcp"},
                    "backends": [{"name": "rabbit1", "address": "10.0.0.1", "port": 5672}],
                }
            ]
        }
    )


@pytest.mark.asyncio
async def test_supervisor_restarts_a_health_task_that_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[str] = []

    async def dying_then_steady(service: Service, backend: Backend) -> None:
        starts.append(backend.name)
        if len(starts) == 1:
            raise RuntimeError("a bug of ours")
        await asyncio.Event().wait()

    monkeypatch.setattr(supervisor_mod, "health_task", dying_then_steady)
    cfg = _config()
    proxy = Supervisor(cfg)
    service = Service(cfg.services[0])
    proxy.services["amqp"] = service
    with capture_logs() as logs:
        proxy.watch_service(service)
        (task,) = proxy.monitors[id(service.pool.backends[0])]
        try:
            # The first restart comes after the default back-off's first step (1 s).
            await wait_for(lambda: len(starts) == 2, timeout=15, what="the health task restarted")
            assert not task.done()
        finally:
            async with asyncio.timeout(5):
                await proxy._stop_all_monitors()
    assert task.cancelled()
    assert starts == ["rabbit1", "rabbit1"]
    died = [e for e in logs if e["event"] == "task died, restarting"]
    assert len(died) == 1
    assert (died[0]["service"], died[0]["backend"], died[0]["task"]) == ("amqp", "rabbit1", "health check amqp/rabbit1")
    assert isinstance(died[0]["exc_info"], RuntimeError)

"""The feedback poller on a running loop: stale values kept, agent maint/drain/down applied to live connections."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.config import ServiceConfig
from rabbitproxy.control import feedback
from rabbitproxy.control.feedback import STATUS_OK, AgentUnavailableError
from rabbitproxy.relay.service import Service
from rabbitproxy.tasks import cancel_and_wait
from tests.support.agents import ScriptedPoller
from tests.support.fakes import FakeConn
from tests.support.proxy import agent_service
from tests.support.waiting import wait_for


@pytest.mark.asyncio
async def test_unreachable_or_garbled_agent_keeps_the_last_good_value() -> None:
    service = agent_service()
    poller = ScriptedPoller(
        service, [b"25%\n", AgentUnavailableError("refused"), b"\xff\xfe garbage", b"hello\n", b"up ready 75%\r\n"]
    )
    backend = poller.backend
    await poller.poll_once()
    assert (backend.agent_percent, backend.agent_status, backend.agent_reply) == (25, STATUS_OK, "25%")
    await poller.poll_once()
    assert backend.agent_percent == 25
    assert (backend.agent_status, backend.agent_detail) == ("unreachable", "refused")
    await poller.poll_once()
    assert backend.agent_percent == 25
    assert backend.agent_status == "bad reply"
    assert backend.agent_detail is not None and backend.agent_detail.startswith("reply is not ASCII")
    await poller.poll_once()
    assert backend.agent_detail is not None and backend.agent_detail.startswith("unknown word 'hello'")
    await poller.poll_once()
    assert (backend.agent_percent, backend.agent_status, backend.agent_reply) == (75, STATUS_OK, "up ready 75%")
    assert backend.agent_detail is None


@pytest.mark.asyncio
async def test_maint_from_the_agent_closes_connections_and_drain_does_not() -> None:
    service = agent_service()
    poller = ScriptedPoller(service, [b"drain\n", b"maint\n", b"up ready 100%\n"])
    conn = FakeConn()
    poller.backend.opened(conn)
    await poller.poll_once()
    assert poller.backend.admin_state == "drain"
    assert conn.reasons == []
    await poller.poll_once()
    assert poller.backend.admin_state == "maint"
    assert conn.reasons == [CloseReason.BACKEND_MAINT]
    await poller.poll_once()
    assert poller.backend.admin_state == "ready"


@pytest.mark.asyncio
@pytest.mark.parametrize(("policy", "closed"), [("close", [CloseReason.BACKEND_DOWN]), ("keep", [])])
async def test_agent_down_follows_on_marked_down(policy: str, closed: list[str]) -> None:
    service = agent_service(on_marked_down=policy)
    poller = ScriptedPoller(service, [b"fail #oom\n"])
    conn = FakeConn()
    poller.backend.opened(conn)
    await poller.poll_once()
    assert poller.backend.agent_down == "oom"
    assert conn.reasons == closed


@pytest.mark.asyncio
async def test_a_poll_that_raises_is_an_error_that_keeps_the_last_good_value() -> None:
    service = agent_service()
    poller = ScriptedPoller(service, [b"25%\n", RuntimeError("a bug of ours"), RuntimeError("a bug of ours"), b"60%\n"])
    backend = poller.backend
    with capture_logs() as logs:
        for _ in range(3):
            await poller.poll_once()
    assert (backend.agent_percent, backend.agent_reply) == (25, "25%")
    assert (backend.agent_status, backend.agent_detail) == ("error", "RuntimeError: a bug of ours")
    assert backend.status == "up"
    # Logged with its traceback, once for the same error in a row.
    failed = [e for e in logs if e["event"].startswith("feedback agent poll failed unexpectedly")]
    assert [type(e["exc_info"]) for e in failed] == [RuntimeError]
    await poller.poll_once()
    assert (backend.agent_percent, backend.agent_status, backend.agent_detail) == (60, STATUS_OK, None)


@pytest.mark.asyncio
async def test_the_feedback_task_survives_an_agent_lookup_that_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # getaddrinfo raises UnicodeError (not OSError) for "rabbit1..example.com": the task must keep polling.
    cfg = ServiceConfig.model_validate(
        {
            "name": "amqp",
            "listen": "127.0.0.1:5999",
            "health_check": {"type": "none"},
            "feedback": {"type": "agent", "interval": 0.02},
            "backends": [{"name": "a", "address": "127.0.0.1", "port": 5672}],
        }
    )
    service = Service(cfg)
    backend = service.pool.backends[0]
    answers: list[bytes | Exception] = [b"40%\n", UnicodeError("label empty or too long")]
    # The backend's agent state as each poll begins, i.e. as the previous one left it.
    seen: list[tuple[str, int | None]] = []

    async def scripted_ask(host: str, port: int, within: float) -> bytes:
        seen.append((backend.agent_status, backend.agent_percent))
        answer = answers.pop(0) if answers else b"70%\n"
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(feedback, "ask_tcp", scripted_ask)
    task = asyncio.get_running_loop().create_task(feedback.feedback_task(service, backend))
    try:
        await wait_for(lambda: backend.agent_percent == 70, timeout=10, what="the poll after the failing one")
        assert not task.done()
    finally:
        await cancel_and_wait([task])
    assert seen[:3] == [("none", None), ("ok", 40), ("error", 40)]
    assert task.cancelled()

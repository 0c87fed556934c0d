"""The feedback poller on a running loop: stale values kept, agent maint/drain/down applied to live connections."""

from __future__ import annotations

import pytest

from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.control.feedback import STATUS_OK, AgentUnavailableError, Poller
from rabbitproxy.relay.service import Service
from tests.support.fakes import FakeConn
from tests.support.proxy import agent_service


class ScriptedPoller(Poller):
    """A poller whose agent is a list of answers: bytes, or an exception to raise."""

    def __init__(self, service: Service, answers: list[bytes | Exception]) -> None:
        super().__init__(service, service.pool.backends[0])
        self.answers = answers

    async def ask(self) -> bytes:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


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
    assert backend.agent_status == "unreachable: refused; keeping the last good value"
    await poller.poll_once()
    assert backend.agent_percent == 25
    assert backend.agent_status.startswith("bad reply: reply is not ASCII")
    await poller.poll_once()
    assert backend.agent_status.startswith("bad reply: unknown word 'hello'")
    await poller.poll_once()
    assert (backend.agent_percent, backend.agent_status, backend.agent_reply) == (75, STATUS_OK, "up ready 75%")


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

"""Stand-in feedback agents: a TCP agent that answers one line, and a poller whose answers are scripted."""

from __future__ import annotations

import asyncio

from rabbitproxy.balancing.backend import Backend
from rabbitproxy.control.feedback import Poller
from rabbitproxy.relay.service import Service


class ScriptedAgent:
    """Answers each connection with ``line`` and closes, like a Loadbalancer.org agent; counts the polls."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.server: asyncio.Server | None = None
        self.polls = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.polls += 1
        writer.write(self.line.encode())
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


class ScriptedPoller(Poller):
    """A poller whose agent is a list of answers: bytes, or an exception to raise."""

    def __init__(self, service: Service, answers: list[bytes | Exception], backend: Backend | None = None) -> None:
        super().__init__(service, backend if backend is not None else service.pool.backends[0])
        self.answers = answers

    async def ask(self) -> bytes:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

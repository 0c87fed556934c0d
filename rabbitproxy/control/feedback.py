"""Feedback agents: one task per backend polls its agent and scales the backend's weight by the reply.

Two dialects, one grammar: the TCP agent (Loadbalancer.org's port 3333, HAProxy's agent-check) writes one line on
connect; the HTTP variant serves the same words in the body of a GET. :mod:`rabbitproxy.protocols.agent_reply` parses
the line; :func:`apply_reply` (no I/O) turns it into backend state. An agent that cannot be reached or answers garbage
changes nothing: the last good value stays, ``agent_status`` says that it is stale (a word from a fixed set, so it can
be a metric label) and ``agent_detail`` and the log say why. A poll that raises anything else is our bug: it is
logged with its traceback, counts as ``error`` with the same keep-the-last-value rule, and the next poll runs as usual.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog

from rabbitproxy.balancing.backend import AgentStatus
from rabbitproxy.balancing.reasons import CloseReason
from rabbitproxy.protocols.agent_reply import MAX_REPLY_BYTES, AgentReply, AgentReplyError, parse_agent_reply

if TYPE_CHECKING:
    from rabbitproxy.balancing.backend import AdminState, Backend
    from rabbitproxy.config import FeedbackConfig
    from rabbitproxy.relay.service import Service

log = structlog.get_logger("rabbitproxy.feedback")

STATUS_OK = AgentStatus.OK


class AgentUnavailableError(Exception):
    """The agent could not be asked (refused, timeout, HTTP error); the message is the reason."""


@dataclass(frozen=True, slots=True)
class Change:
    """What one applied reply changed on a backend."""

    admin_before: AdminState
    admin_after: AdminState
    down_before: str | None
    down_after: str | None
    percent_before: int | None
    percent_after: int | None

    @property
    def entered_maint(self) -> bool:
        return self.admin_after == "maint" and self.admin_before != "maint"

    @property
    def went_down(self) -> bool:
        return self.down_after is not None and self.down_before is None


def apply_reply(backend: Backend, reply: AgentReply, raw: str) -> Change:
    """Apply a parsed reply to ``backend`` (fields the agent did not send stay as they are)."""
    admin_before, down_before, percent_before = backend.admin_state, backend.agent_down, backend.agent_percent
    if reply.percent is not None:
        backend.agent_percent = reply.percent
    if reply.admin is not None:
        backend.agent_state = reply.admin
    if reply.health == "down":
        backend.agent_down = reply.reason or "agent says down"
    elif reply.health == "up":
        backend.agent_down = None
    backend.agent_reply = raw
    backend.agent_status = STATUS_OK
    backend.agent_detail = None
    # An agent that says ready/up again starts the backend's slow start.
    backend.observe(time.monotonic())
    return Change(
        admin_before, backend.admin_state, down_before, backend.agent_down, percent_before, backend.agent_percent
    )


def agent_port(cfg: FeedbackConfig, backend: Backend) -> int:
    return backend.config.agent_port or cfg.port


async def ask_tcp(host: str, port: int, within: float) -> bytes:
    """Connect, read one line (or whatever arrives before EOF), close."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            data = bytearray()
            # One byte past the limit is enough for the parser to call the reply too long.
            while len(data) <= MAX_REPLY_BYTES and b"\n" not in data and b"\r" not in data:
                chunk = await reader.read(MAX_REPLY_BYTES + 1 - len(data))
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise AgentUnavailableError("timeout") from None
    except ConnectionRefusedError:
        raise AgentUnavailableError("refused") from None
    except OSError as exc:
        raise AgentUnavailableError(exc.strerror or type(exc).__name__) from None
    finally:
        if writer is not None:
            writer.close()
    if not data:
        raise AgentUnavailableError("closed without a reply")
    return bytes(data)


async def ask_http(session: aiohttp.ClientSession, url: str, within: float) -> bytes:
    """GET ``url``; the body of a 2xx answer is the reply."""
    try:
        async with asyncio.timeout(within), session.get(url, allow_redirects=False) as resp:
            if not 200 <= resp.status < 300:
                raise AgentUnavailableError(f"HTTP {resp.status}")
            # read(n) returns whatever has arrived, which may be the first part of the body only: read until EOF
            # or one byte past the limit (enough for the parser to call the reply too long), never more.
            body = bytearray()
            while len(body) <= MAX_REPLY_BYTES:
                chunk = await resp.content.read(MAX_REPLY_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
    except TimeoutError:
        raise AgentUnavailableError("timeout") from None
    except aiohttp.ClientConnectorError as exc:
        cause = exc.os_error
        raise AgentUnavailableError(
            "refused" if isinstance(cause, ConnectionRefusedError) else cause.strerror or str(cause)
        ) from None
    except aiohttp.ClientError as exc:
        raise AgentUnavailableError(f"HTTP error: {exc or type(exc).__name__}") from None
    return bytes(body)


class Poller:
    """Asks one backend's agent and applies the answer."""

    def __init__(self, service: Service, backend: Backend) -> None:
        self.service = service
        self.backend = backend
        self.cfg = service.config.feedback
        self.session: aiohttp.ClientSession | None = None

    async def ask(self) -> bytes:
        cfg, b = self.cfg, self.backend
        port = agent_port(cfg, b)
        if cfg.type == "agent":
            return await ask_tcp(b.address, port, cfg.timeout)
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        host = f"[{b.address}]" if ":" in b.address else b.address
        return await ask_http(self.session, f"http://{host}:{port}{cfg.path}", cfg.timeout)

    async def poll_once(self) -> None:
        """Ask the agent once and apply the answer; never raises (cancellation aside)."""
        try:
            await self._poll()
        except Exception as exc:  # noqa: BLE001 - logged with its traceback in _failed
            # House rule 12: a bug of ours (or a library's surprise, such as getaddrinfo raising UnicodeError for
            # "rabbit1..example.com") must not end the polling, or the backend's agent state freezes for good.
            await self._failed(exc)

    async def _poll(self) -> None:
        b = self.backend
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            try:
                raw = await self.ask()
            finally:
                b.agent_duration = loop.time() - began
            reply = parse_agent_reply(raw)
        except AgentUnavailableError as exc:
            self._stale(AgentStatus.UNREACHABLE, str(exc))
            return
        except AgentReplyError as exc:
            self._stale(AgentStatus.BAD_REPLY, str(exc))
            return
        was_stale = b.agent_status not in (STATUS_OK, AgentStatus.NONE)
        # The parser only accepted the first line; whatever followed it may be anything.
        text = raw.splitlines()[0].decode("ascii", "replace").strip()
        change = apply_reply(b, reply, text)
        self._report(change, text, was_stale)

    def _stale(self, status: AgentStatus, detail: str) -> None:
        b = self.backend
        if (b.agent_status, b.agent_detail) != (status, detail):
            # Logged once per new problem, not on every poll of an agent that stays away.
            log.warning(
                "feedback agent unusable, keeping the last good value",
                problem=str(status),
                service=self.service.name,
                backend=b.name,
                reason=detail,
                kept_percent=b.agent_percent,
                kept_state=b.agent_state,
            )
        b.agent_status = status
        b.agent_detail = detail

    async def _failed(self, exc: Exception) -> None:
        """An unexpected error: logged with its traceback (once per new error), the last good value kept."""
        b = self.backend
        detail = f"{type(exc).__name__}: {exc}"
        if (b.agent_status, b.agent_detail) != (AgentStatus.ERROR, detail):
            log.error(
                "feedback agent poll failed unexpectedly, keeping the last good value",
                service=self.service.name,
                backend=b.name,
                reason=detail,
                kept_percent=b.agent_percent,
                kept_state=b.agent_state,
                exc_info=exc,
            )
        b.agent_status = AgentStatus.ERROR
        b.agent_detail = detail
        # The HTTP session may be what broke; the next poll starts with a new one.
        await self.close()

    def _report(self, change: Change, text: str, was_stale: bool) -> None:
        b, name = self.backend, self.service.name
        if was_stale:
            log.info("feedback agent answers again", service=name, backend=b.name, reply=text)
        if change.percent_before != change.percent_after:
            log.info(
                "agent weight changed",
                service=name,
                backend=b.name,
                percent=change.percent_after,
                effective_weight=b.effective_weight,
                reply=text,
            )
        if change.admin_before != change.admin_after:
            closed = b.close_connections(CloseReason.BACKEND_MAINT) if change.entered_maint else 0
            if change.admin_after != "ready":
                self.service.cancel_connects_to(b)
            log.info(
                "backend admin state changed",
                service=name,
                backend=b.name,
                state=change.admin_after,
                reason=f"agent replied {text!r}",
                closed_connections=closed,
            )
        if change.went_down:
            closed = 0
            if self.service.config.health_check.on_marked_down == "close":
                closed = b.close_connections(CloseReason.BACKEND_DOWN)
                self.service.cancel_connects_to(b)
            log.warning(
                "backend down",
                service=name,
                backend=b.name,
                reason=f"agent: {change.down_after}",
                closed_connections=closed,
            )
        elif change.down_before is not None and change.down_after is None:
            log.info("backend up", service=name, backend=b.name, reason=f"agent replied {text!r}")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


async def feedback_task(service: Service, backend: Backend) -> None:
    """Poll ``backend``'s agent every interval until cancelled (reload, shutdown)."""
    poller = Poller(service, backend)
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    try:
        while True:
            await poller.poll_once()
            next_at = max(next_at + poller.cfg.interval, loop.time())
            await asyncio.sleep(next_at - loop.time())
    finally:
        await poller.close()

"""``rabbitproxy agent``: a feedback agent for the RabbitMQ hosts, in the Loadbalancer.org format.

Every TCP connection gets one line and is closed: ``NN%``, the host's idle percentage averaged over a window of
a few seconds (one instant sample would make the weights jitter with every burst). With ``--http`` a GET gets the
same figure as a bare integer. An operator can force ``drain``, ``maint`` or ``ready`` by writing that word into
the state file; with ``--rabbitmq URL`` the figure also falls with the node's memory and file-descriptor use, and
the agent says ``drain`` while the node has a memory or disk alarm.

Measuring (:class:`IdleWindow`, :class:`RabbitWatch`, :func:`rabbit_headroom`) is kept apart from answering
(:class:`Agent`, :func:`serve_agent`), so the figures can be tested without sockets.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import psutil
import structlog
from aiohttp import web
from yarl import URL

from rabbitproxy.addresses import format_host_port
from rabbitproxy.config import split_host_port

log = structlog.get_logger("rabbitproxy.agent")

Metric = Literal["cpu", "memory", "max"]
AgentState = Literal["ready", "drain", "maint"]
STATES: tuple[AgentState, ...] = ("ready", "drain", "maint")
SAMPLE_INTERVAL = 1.0
RABBITMQ_INTERVAL = 2.0
RABBITMQ_TIMEOUT = 2.0

# -- measuring ------------------------------------------------------------------------------------------------------


def _cpu_snapshot() -> tuple[float, float]:
    """(total, idle) CPU seconds since boot; iowait counts as idle, as the CPU could run other work meanwhile."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times), idle


class IdleWindow:
    """CPU idle percentage over the last ``window`` seconds, from cumulative counters sampled now and then."""

    def __init__(
        self,
        window: float = 5.0,
        snapshot: Callable[[], tuple[float, float]] = _cpu_snapshot,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._snapshot = snapshot
        self._clock = clock
        self._samples: deque[tuple[float, float, float]] = deque()
        self.sample()

    def sample(self) -> None:
        now = self._clock()
        total, idle = self._snapshot()
        self._samples.append((now, total, idle))
        # Keep one sample older than the window, so the average always spans the whole window once it is full.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def percent(self) -> int:
        """Idle percentage from the oldest kept sample to now (0-100)."""
        self.sample()
        _, total0, idle0 = self._samples[0]
        _, total1, idle1 = self._samples[-1]
        spent = total1 - total0
        if spent <= 0:
            # No time passed on the counters yet (the first request right after start): nothing says we are busy.
            return 100
        return _clamp(100 * (idle1 - idle0) / spent)


def memory_free_percent() -> int:
    return _clamp(100 - psutil.virtual_memory().percent)


def _clamp(value: float) -> int:
    return max(0, min(100, round(value)))


@dataclass(frozen=True, slots=True)
class RabbitView:
    """What the agent learnt from the node's management API."""

    headroom: int
    alarm: str | None


def rabbit_headroom(node: Mapping[str, Any]) -> RabbitView:
    """Headroom (0-100) left on the node's memory and file descriptors, and its alarm, from /api/nodes/{node}.

    Memory is measured against ``mem_limit`` (the high watermark, where RabbitMQ blocks publishers), not the
    host's RAM. A missing or odd figure counts as no pressure rather than guessing.
    """
    alarms = [name for key, name in (("mem_alarm", "memory"), ("disk_free_alarm", "disk")) if node.get(key) is True]
    headroom = 100
    for used_key, limit_key in (("mem_used", "mem_limit"), ("fd_used", "fd_total")):
        used, limit = _number(node.get(used_key)), _number(node.get(limit_key))
        if used is not None and limit is not None and limit > 0:
            # Bounded before scaling: a tiny limit makes the ratio huge, and 100 * (1 - huge) overflows.
            share = min(max(used / limit, 0.0), 1.0)
            headroom = min(headroom, _clamp(100 * (1 - share)))
    return RabbitView(headroom, " and ".join(alarms) + " alarm" if alarms else None)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    # JSON may carry huge or tiny figures whose ratio overflows to infinity; such a node reports nothing usable.
    return number if math.isfinite(number) else None


class RabbitWatch:
    """Polls the local node through the management API; ``view`` is None until the first good answer."""

    def __init__(self, url: str) -> None:
        parsed = URL(url)
        # A header rather than aiohttp.BasicAuth, which aiohttp 3.14 deprecates.
        self.headers = {"Authorization": aiohttp.encode_basic_auth(parsed.user or "guest", parsed.password or "guest")}
        self.base = parsed.with_user(None).with_password(None).with_path("/").with_query(None)
        self.view: RabbitView | None = None
        self.problem: str | None = None

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        try:
            async with asyncio.timeout(RABBITMQ_TIMEOUT):
                overview = await self._get(session, "api/overview")
                node = overview.get("node") if isinstance(overview, dict) else None
                if not isinstance(node, str):
                    raise ValueError("/api/overview carries no node name")
                details = await self._get(session, f"api/nodes/{node}")
                if not isinstance(details, dict):
                    raise ValueError(f"/api/nodes/{node} is not an object")
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            problem = str(exc) or type(exc).__name__
            if problem != self.problem:
                # The host figure alone is still honest; a dead node is the health check's business.
                log.warning("rabbitmq management API unusable; reporting host figures only", reason=problem)
            self.problem = problem
            self.view = None
            return
        if self.problem is not None:
            log.info("rabbitmq management API answers again")
        self.problem = None
        view = rabbit_headroom(details)
        if self.view is None or view.alarm != self.view.alarm:
            log.info("rabbitmq node state", node=node, alarm=view.alarm, headroom=view.headroom)
        self.view = view

    async def _get(self, session: aiohttp.ClientSession, path: str) -> Any:
        async with session.get(self.base.join(URL(path)), headers=self.headers) as resp:
            if resp.status != 200:
                raise ValueError(f"GET /{path}: HTTP {resp.status}")
            return await resp.json()


# -- answering ------------------------------------------------------------------------------------------------------


def parse_state_word(text: str) -> AgentState:
    """The state an operator wrote into the state file; an empty file means ready."""
    words = text.split()
    if not words:
        return "ready"
    word = words[0].lower()
    if len(words) > 1 or word not in STATES:
        raise ValueError(f"expected one of {', '.join(STATES)}, found {text.strip()[:40]!r}")
    return word


def format_reply(percent: int, state: AgentState, *, announce_ready: bool, http: bool) -> str:
    """The line the agent sends.

    ``announce_ready`` adds ``up ready`` before the figure. An agent that can say drain or maint must say so, or
    a balancer that applied ``drain`` would keep it after the operator cleared the file (unsent words change
    nothing). A plain CPU agent leaves it out and sends exactly the Loadbalancer.org ``NN%`` (or ``NN`` over HTTP).
    """
    if state != "ready":
        return f"{state}\n"
    figure = f"{percent}" if http else f"{percent}%"
    return f"up ready {figure}\n" if announce_ready else f"{figure}\n"


class Agent:
    """Combines the measurements and the operator's state file into one reply."""

    def __init__(
        self,
        *,
        metric: Metric = "cpu",
        state_file: Path | None = None,
        rabbitmq: str | None = None,
        window: float = 5.0,
        http: bool = False,
    ) -> None:
        self.metric = metric
        self.state_file = state_file
        self.http = http
        self.cpu = IdleWindow(window)
        self.rabbit = RabbitWatch(rabbitmq) if rabbitmq else None
        self.file_state: AgentState = "ready"
        self._file_problem: str | None = None

    def host_percent(self) -> int:
        if self.metric == "cpu":
            return self.cpu.percent()
        if self.metric == "memory":
            return memory_free_percent()
        # "max": whichever of CPU and memory is used most decides.
        return min(self.cpu.percent(), memory_free_percent())

    def read_state_file(self) -> AgentState:
        """The operator's state, read at every request so a change applies to the very next poll."""
        if self.state_file is None:
            return "ready"
        try:
            state = parse_state_word(self.state_file.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            state = "ready"
        except (OSError, ValueError) as exc:
            problem = str(exc)
            if problem != self._file_problem:
                log.warning("state file unusable; keeping the last state", path=str(self.state_file), reason=problem)
            self._file_problem = problem
            return self.file_state
        self._file_problem = None
        if state != self.file_state:
            log.info("state file changed", path=str(self.state_file), state=state)
        self.file_state = state
        return state

    def reply(self) -> str:
        state = self.read_state_file()
        percent = self.host_percent()
        view = self.rabbit.view if self.rabbit is not None else None
        if view is not None:
            percent = min(percent, view.headroom)
            if view.alarm is not None and state == "ready":
                state = "drain"
        announce = self.state_file is not None or self.rabbit is not None
        return format_reply(percent, state, announce_ready=announce, http=self.http)

    async def run_samplers(self) -> None:
        """Sample the CPU every second and the node every few seconds, until cancelled."""
        session = aiohttp.ClientSession() if self.rabbit is not None else None
        try:
            next_rabbit = 0.0
            while True:
                self.cpu.sample()
                if self.rabbit is not None and session is not None and time.monotonic() >= next_rabbit:
                    next_rabbit = time.monotonic() + RABBITMQ_INTERVAL
                    await self.rabbit.refresh(session)
                await asyncio.sleep(SAMPLE_INTERVAL)
        finally:
            if session is not None:
                await session.close()


async def serve_agent(
    agent: Agent,
    listen: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Answer feedback polls on ``listen`` until ``shutdown_trigger`` returns."""
    host, port = split_host_port(listen)
    samplers = asyncio.create_task(agent.run_samplers())
    if agent.rabbit is not None:
        # The first answer should already know about an alarm, so ask the node once before listening.
        async with aiohttp.ClientSession() as session:
            await agent.rabbit.refresh(session)
    runner: web.AppRunner | None = None
    server: asyncio.Server | None = None
    try:
        if agent.http:
            runner = await _start_http(agent, host, port)
            bound = runner.addresses[0]
        else:
            server = await asyncio.start_server(lambda r, w: _answer(agent, w), host, port)
            bound = server.sockets[0].getsockname()
        shown = format_host_port(bound[0], bound[1])
        log.info("feedback agent listening", listen=shown, http=agent.http, metric=agent.metric)
        if ready is not None:
            ready((bound[0], bound[1]))
        await shutdown_trigger()
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
        if runner is not None:
            await runner.cleanup()
        samplers.cancel()
        await asyncio.gather(samplers, return_exceptions=True)


async def _answer(agent: Agent, writer: asyncio.StreamWriter) -> None:
    # The poller sends nothing; it reads one line and we close. A peer that resets early is its own business.
    try:
        writer.write(agent.reply().encode("ascii"))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _start_http(agent: Agent, host: str, port: int) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=agent.reply(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

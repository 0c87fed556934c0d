"""The parent's side of ``workers = N``: start the worker processes, keep them running, steer them, add them up.

Each worker is a fresh interpreter (``python -m rabbitproxy.control.worker``, never a fork of a running loop) with
one end of an AF_UNIX socketpair (:mod:`rabbitproxy.control.channel`). The parent sends it the configuration and
the backends' state, then every change of that state (:mod:`rabbitproxy.balancing.snapshot`), reloads and the
shutdown; the worker sends its counters every :data:`STATS_INTERVAL` seconds, which the parent writes onto its own
``Service`` and ``Backend`` objects, so the admin API and ``/metrics`` read the sum of all workers unchanged.

A worker that dies is logged with its exit code or signal and started again with back-off; it gets the current
configuration and state before it listens. Counters stay monotonic across such a restart: what the dead worker had
counted is kept as a base.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog

from rabbitproxy.balancing.snapshot import pool_state
from rabbitproxy.config import Config, ConfigError
from rabbitproxy.control.channel import Channel, ChannelError, Message
from rabbitproxy.control.closer import CloseOutcome
from rabbitproxy.control.worker_views import RemoteConnection, Tally, add_counts
from rabbitproxy.tasks import Backoff, OwnedTasks

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor

log = structlog.get_logger("rabbitproxy.workers")

# How often the parent compares its backends' state with what it last sent (changes through the admin API are
# sent at once); the workers send their counters this often too.
STATE_POLL = 0.05
STATS_INTERVAL = 0.5
# Seconds a starting worker has to bind its listeners and say it is ready.
START_TIMEOUT = 30.0


def config_data(config: Config) -> dict[str, Any]:
    """``config`` as JSON-ready data the worker validates again (only keys that were set, as ``build_config``)."""
    return config.model_dump(mode="json", exclude_unset=True)


def signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return str(-returncode)


class WorkerSlot:
    """Worker ``index``: its current process and channel, its last counters and those of its dead predecessors."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.first = asyncio.get_running_loop().create_future()
        self.stats: dict[str, Any] = {}
        self.base: dict[str, Any] = {}
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


class WorkerSet:
    """The N worker processes of a parent supervisor."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.count = sup.config.worker_count
        self.slots = [WorkerSlot(i) for i in range(self.count)]
        self.tasks = OwnedTasks()
        self.stopping = False
        self._sent_state: dict[str, Any] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each listens; ConfigError (and none left running) if one cannot."""
        for slot in self.slots:
            self.tasks.spawn(self._keep_running(slot), name=f"worker {slot.index}")
        try:
            async with asyncio.timeout(START_TIMEOUT):
                results = await asyncio.gather(*(slot.first for slot in self.slots))
        except TimeoutError:
            raise ConfigError([f"workers: not every worker was listening after {START_TIMEOUT:g} s"]) from None
        errors = sorted({e for errs in results for e in errs})
        if errors:
            raise ConfigError(errors)
        self.tasks.spawn(self._push_state_loop(), name="worker state")

    async def shutdown(self) -> None:
        """Tell every worker to drain (shutdown_timeout, then close_timeout) and exit; kill those that outlive it."""
        self.stopping = True
        for slot in self.slots:
            self._send(slot, {"t": "shutdown"})
        grace = max(sc.shutdown_timeout + sc.close_timeout for sc in self.sup.config.services) + 5.0
        procs = [s.process for s in self.slots if s.process is not None and s.process.returncode is None]
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.error("worker did not stop in time, killed", pid=p.pid)
                    p.kill()
        await self.tasks.cancel_all()

    def kill_all(self) -> None:
        self.stopping = True
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()

    async def _keep_running(self, slot: WorkerSlot) -> None:
        """Run worker ``slot`` and start it again whenever it dies, until the shutdown."""
        backoff = Backoff(first=0.5, most=10.0)
        loop = asyncio.get_running_loop()
        while not self.stopping:
            began = loop.time()
            try:
                await self._run_once(slot)
            except Exception:
                log.exception("worker supervision failed", worker=slot.index)
            finally:
                self._retire(slot)
            if self.stopping:
                return
            delay = backoff.next(loop.time() - began)
            proc = slot.process
            code = proc.returncode if proc is not None else None
            log.error(
                "worker died, restarting",
                worker=slot.index,
                pid=slot.pid,
                exit_code=code if code is None or code >= 0 else None,
                signal=signal_name(code),
                restart_in=delay,
            )
            slot.restarts += 1
            await asyncio.sleep(delay)

    async def _run_once(self, slot: WorkerSlot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rabbitproxy.control.worker",
                str(slot.index),
                str(theirs.fileno()),
                _loop_name(),
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        proc = slot.process
        try:
            channel = await Channel.open(ours)
        except BaseException:
            ours.close()
            proc.kill()
            raise
        slot.channel = channel
        log.info("worker started", worker=slot.index, pid=proc.pid)
        try:
            # The state goes with the configuration: the worker copies it before it listens.
            channel.send(
                {
                    "t": "start",
                    "config": config_data(self.sup.config),
                    "workers": self.count,
                    "state": self.snapshot(),
                }
            )
            await channel.serve(lambda m: self._notified(slot, m), _no_requests)
        except (ChannelError, OSError) as exc:
            # A bad frame, or the worker died hard (a reset): either way this worker ends here and is restarted.
            log.error("worker channel failed", worker=slot.index, error=str(exc) or type(exc).__name__)
        finally:
            channel.close()
            slot.channel = None
            slot.ready = False
            # The channel is closed: the worker sees EOF and stops; one that does not is killed.
            try:
                async with asyncio.timeout(5.0 if not self.stopping else 3600.0):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if not slot.first.done():
            slot.first.set_result([f"workers: worker {slot.index} exited (code {proc.returncode}) before listening"])

    def _notified(self, slot: WorkerSlot, message: Message) -> None:
        kind = message.get("t")
        if kind == "stats":
            slot.stats = message
            self._aggregate()
        elif kind == "ready":
            slot.ready = True
            if not slot.first.done():
                slot.first.set_result([])
            elif slot.restarts:
                log.info("worker restarted and listening", worker=slot.index, pid=slot.pid)
            # The state may have changed between the start message and now.
            self._send(slot, {"t": "state", "services": self.snapshot()})
        elif kind == "failed":
            errors = [str(e) for e in message.get("errors", [])]
            log.error("worker could not start", worker=slot.index, errors=errors)
            if not slot.first.done():
                slot.first.set_result(errors)

    def _send(self, slot: WorkerSlot, message: Message) -> None:
        channel = slot.channel
        if channel is None or channel.closed:
            return
        try:
            channel.send(message)
        except ChannelError as exc:
            # A worker that stopped reading (house rule 11): its buffer may not grow; it is killed and restarted.
            log.error("worker stopped reading its channel, killed", worker=slot.index, error=str(exc))
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()

    # -- state, reload, requests ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {name: pool_state(s.pool.backends) for name, s in self.sup.services.items()}

    def push_state(self) -> None:
        """Send the backends' state to every worker if it changed since the last push."""
        state = self.snapshot()
        if state == self._sent_state:
            return
        self._sent_state = state
        for slot in self.slots:
            self._send(slot, {"t": "state", "services": state})

    async def _push_state_loop(self) -> None:
        # Health checks, agents and node monitors change Backends without telling anyone; a poll that compares
        # a few lists per backend costs next to nothing and keeps them out of this concern.
        while True:
            try:
                self.push_state()
            except Exception:
                log.exception("pushing backend state to the workers failed")
            await asyncio.sleep(STATE_POLL)

    async def reload(self, config: Config) -> list[str]:
        """Send ``config`` to every running worker (the parent has applied it); return what went wrong where.

        An empty list means every running worker serves the new configuration. Otherwise each entry names a
        worker that failed or refused it and still serves the one before: the reload is incomplete, and the
        admin API says so instead of "reloaded".
        """
        data = config_data(config)
        live = [s for s in self.slots if s.channel is not None and s.ready]
        answers = await asyncio.gather(
            *(self.request(s, {"t": "reload", "config": data}, deadline=60.0) for s in live), return_exceptions=True
        )
        problems: list[str] = []
        for slot, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                why = str(answer) or type(answer).__name__
                log.error("worker reload failed", worker=slot.index, error=why)
                problems.append(f"worker {slot.index}: {why}")
            elif answer.get("error") or answer.get("errors"):
                errors = answer.get("errors") or [answer["error"]]
                log.error("worker reload refused", worker=slot.index, errors=errors)
                problems.extend(f"worker {slot.index}: {e}" for e in errors)
        self._sent_state = None
        self.push_state()
        return problems

    async def request(self, slot: WorkerSlot, message: Message, deadline: float = 5.0) -> Message:
        channel = slot.channel
        if channel is None or channel.closed:
            raise ChannelError(f"worker {slot.index} is not running")
        return await channel.request(message, deadline)

    async def ask_all(self, message: Message, deadline: float = 5.0) -> list[tuple[WorkerSlot, Message]]:
        """Ask every running worker; a worker that does not answer in time is left out (and logged)."""
        live = [s for s in self.slots if s.channel is not None and s.ready]
        answers = await asyncio.gather(*(self.request(s, message, deadline) for s in live), return_exceptions=True)
        out: list[tuple[WorkerSlot, Message]] = []
        for slot, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("worker did not answer", worker=slot.index, request=message.get("t"), error=repr(answer))
            else:
                out.append((slot, answer))
        return out

    def worker_of(self, conn_id: int) -> WorkerSlot:
        """The worker that numbers its connections like ``conn_id`` (see control.worker)."""
        return self.slots[(conn_id - 1) % self.count]

    async def connections(self) -> list[tuple[str, RemoteConnection]]:
        """Every open connection of every running worker (a worker that does not answer in time is left out)."""
        out: list[tuple[str, RemoteConnection]] = []
        for slot, answer in await self.ask_all({"t": "connections"}):
            for row in answer.get("connections", []):
                service = self.sup.services.get(row[0])
                if service is not None:
                    out.append((row[0], RemoteConnection(self, slot, service.pool.by_name.get(row[2]), row)))
        return out

    async def close_one(self, conn_id: int, text: str) -> CloseOutcome | None:
        """Ask the worker that has connection ``conn_id`` to close it as an operator's close (broker, else TCP).

        None when that worker no longer has it.
        """
        answer = await self.request(self.worker_of(conn_id), {"t": "close_one", "conn": conn_id, "text": text}, 30.0)
        if answer.get("missing"):
            return None
        via = answer.get("via")
        if via not in ("broker", "tcp", "ended"):
            raise ChannelError(f"worker answered a close with {answer!r}")
        return CloseOutcome(via, str(answer.get("detail")))

    def tell(self, index: int, message: Message) -> None:
        self._send(self.slots[index], message)

    def tell_all(self, message: Message) -> None:
        for slot in self.slots:
            self._send(slot, message)

    # -- counters ------------------------------------------------------------------------------------------------

    def _retire(self, slot: WorkerSlot) -> None:
        """Keep a dead worker's counters as the base of its successor's (its open connections died with it)."""
        if slot.stats:
            slot.base = add_counts(slot.base, slot.stats.get("services", {}))
        slot.stats = {}
        self._aggregate()

    def _aggregate(self) -> None:
        """Write the sum of every worker's counters onto the parent's services and backends."""
        total: dict[str, Any] = {}
        active: Counter[tuple[str, str | None]] = Counter()
        for slot in self.slots:
            current = slot.stats.get("services", {})
            total = add_counts(add_counts(total, slot.base), current)
            for sname, s in current.items():
                active[sname, None] += s["active"]
                for bname, b in s["backends"].items():
                    active[sname, bname] += b[0]
        for sname, service in self.sup.services.items():
            s = total.get(sname)
            if s is None:
                service.connections = Tally(0)
                continue
            service.connections = Tally(active[sname, None])
            service.total = s["total"]
            service.ended = Counter(s["ended"])
            service.close_timeouts = s["close_timeouts"]
            service.failed_logins = s["failed_logins"]
            service.handshakes_given_up = s["handshakes_given_up"]
            service.vhost_open = {k: v for k, v in s["vhost_open"].items() if v}
            for b in service.pool.backends:
                figures = s["backends"].get(b.name)
                b.connections = Tally(active[sname, b.name])
                if figures is not None:
                    _, b.total, b.connect_errors, b.traffic_in, b.traffic_out = figures


async def _no_requests(message: Message) -> Message:
    return {"error": f"the parent answers no {message.get('t')!r} requests"}


def _loop_name() -> str:
    """The workers run the parent's kind of loop (``serve --loop``)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"

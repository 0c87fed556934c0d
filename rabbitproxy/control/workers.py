"""The parent's side of ``workers = N``: start the worker processes, keep them running, steer them, add them up.

Each worker is a fresh interpreter (``python -m rabbitproxy.control.worker``, never a fork of a running loop) with
one end of an AF_UNIX socketpair (:mod:`rabbitproxy.control.channel`). The parent sends it the configuration and
the backends' state, then every change of that state (:mod:`rabbitproxy.balancing.snapshot`, only the backends
that changed), reloads and the shutdown; the worker sends its figures every :data:`STATS_INTERVAL` seconds, which
the parent writes onto its own ``Service`` and ``Backend`` objects, so the admin API and ``/metrics`` read the sum
of all workers unchanged. A listing of connections is paged inside each worker and merged here.

A worker that dies is logged with its exit code or signal and started again with back-off; one that stops sending
its figures for :data:`HUNG_AFTER` seconds (a wedged loop, a SIGSTOP) is killed and started again too, and so is
one that does not listen :data:`START_TIMEOUT` after its start. Each restart is counted by cause. A new worker gets
the current configuration and state before it listens; each configuration has a generation, and a worker that
started on an older one (a reload came while it started) is sent the current one when it says it is ready.
Counters stay monotonic across a restart (what the dead worker had counted is kept as a base); gauges are the
running workers' only.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog

from rabbitproxy.balancing.snapshot import States, pool_state, state_changes
from rabbitproxy.config import Config, ConfigError
from rabbitproxy.control.channel import Channel, ChannelError, Message
from rabbitproxy.control.worker_reload import catch_up, reload_workers
from rabbitproxy.control.worker_views import add_counts, counters_of, write_figures
from rabbitproxy.control.worker_watch import HUNG_AFTER, START_TIMEOUT, watch_loop
from rabbitproxy.tasks import Backoff, OwnedTasks

if TYPE_CHECKING:
    from rabbitproxy.control.supervisor import Supervisor

log = structlog.get_logger("rabbitproxy.workers")

# How often the parent compares its backends' state with what it last sent (changes through the admin API are
# sent at once); the workers send their counters this often too.
STATE_POLL = 0.05
STATS_INTERVAL = 0.5
# Why a worker was started again (the label of rabbitproxy_worker_restarts_total): it died by itself; it stopped
# answering; it was not listening START_TIMEOUT after its start; it broke or stopped reading its channel.
RESTART_CAUSES = ("exited", "hung", "start-timeout", "channel")
# Connection ids a worker reserves at a time (control.worker.worker_ids): it tells the parent before it uses one.
ID_BLOCK = 4096


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
    """Worker ``index``: its current process and channel, its last figures and the counters of its predecessors."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.first = asyncio.get_running_loop().create_future()
        self.stats: dict[str, Any] = {}
        self.base: dict[str, Any] = {}
        self.restarts = 0
        self.causes: Counter[str] = Counter()
        # Why the parent ended the current process (RESTART_CAUSES), set just before it kills it.
        self.kill_cause: str | None = None
        # Loop time of the process's start, and of the last message from it (its figures come every STATS_INTERVAL).
        self.launched = 0.0
        self.last_seen = 0.0
        # The configuration generation it runs, and what it said when it refused one.
        self.generation = 0
        self.refused: dict[int, list[str]] = {}
        # The first connection id no process of this slot has used or reserved (control.worker.worker_ids).
        self.next_id = index + 1

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def serving(self, now: float) -> bool:
        """Listening, and its figures keep coming: the kernel's share of new clients is served."""
        return self.ready and self.channel is not None and now - self.last_seen <= HUNG_AFTER


class WorkerSet:
    """The N worker processes of a parent supervisor."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.count = sup.config.worker_count
        self.slots = [WorkerSlot(i) for i in range(self.count)]
        self.tasks = OwnedTasks()
        self.stopping = False
        self._sent_state: States | None = None
        # The configuration's generation: each reload adds one; a worker started or caught up runs the current one.
        self.generation = 0
        self.restart_causes: Counter[str] = Counter()
        # How many workers' rebalancers hold each (service, backend) now.
        self.holds: dict[tuple[str, str], int] = {}
        # Set (and replaced) whenever a worker's generation may have moved: a reload waiting for one wakes up.
        self.moved = asyncio.Event()

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
        self.tasks.spawn(watch_loop(self), name="worker watch")

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

    def moved_on(self) -> None:
        self.moved.set()
        self.moved = asyncio.Event()

    def serving(self) -> int:
        """How many workers serve now (see WorkerSlot.serving); fewer than configured makes /healthz degraded."""
        now = asyncio.get_running_loop().time()
        return sum(1 for slot in self.slots if slot.serving(now))

    async def _keep_running(self, slot: WorkerSlot) -> None:
        """Run worker ``slot`` and start it again whenever it dies, until the shutdown."""
        backoff = Backoff(first=0.5, most=10.0)
        loop = asyncio.get_running_loop()
        while not self.stopping:
            began = loop.time()
            slot.kill_cause = None
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
            cause = slot.kill_cause or "exited"
            log.error(
                "worker died, restarting",
                worker=slot.index,
                pid=slot.pid,
                cause=cause,
                exit_code=code if code is None or code >= 0 else None,
                signal=signal_name(code),
                restart_in=delay,
            )
            slot.restarts += 1
            slot.causes[cause] += 1
            self.restart_causes[cause] += 1
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
        slot.launched = asyncio.get_running_loop().time()
        try:
            channel = await Channel.open(ours)
        except BaseException:
            ours.close()
            proc.kill()
            raise
        slot.channel = channel
        log.info("worker started", worker=slot.index, pid=proc.pid)
        try:
            # The state goes with the configuration, and both are read now, not before the process started: a
            # reload that came meanwhile is in them (and a later one is caught up with on "ready").
            channel.send(
                {
                    "t": "start",
                    "config": config_data(self.sup.config),
                    "generation": self.generation,
                    "workers": self.count,
                    "first_id": slot.next_id,
                    "state": self.snapshot(),
                }
            )
            await channel.serve(lambda m: self._notified(slot, m), _no_requests)
        except (ChannelError, OSError) as exc:
            # A bad frame, or the worker died hard (a reset): either way this worker ends here and is restarted.
            if isinstance(exc, ChannelError) and slot.kill_cause is None:
                slot.kill_cause = "channel"
            log.error("worker channel failed", worker=slot.index, error=str(exc) or type(exc).__name__)
        finally:
            channel.close()
            slot.channel = None
            slot.ready = False
            self.moved_on()
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
        slot.last_seen = asyncio.get_running_loop().time()
        if kind == "stats":
            slot.stats = message
            self._aggregate()
        elif kind == "ids":
            slot.next_id = max(slot.next_id, int(message["next"]))
        elif kind == "ready":
            slot.ready = True
            slot.generation = int(message.get("generation", 0))
            if not slot.first.done():
                slot.first.set_result([])
            elif slot.restarts:
                log.info("worker restarted and listening", worker=slot.index, pid=slot.pid)
            # The state may have changed between the start message and now.
            self._send(slot, {"t": "state", "services": self.snapshot(), "full": True})
            if slot.generation != self.generation:
                # A reload landed while this worker was starting: it runs the configuration before.
                self.tasks.spawn(catch_up(self, slot), name=f"worker {slot.index} catch up")
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
            self.kill(slot, "channel")

    def kill(self, slot: WorkerSlot, cause: str) -> None:
        """End ``slot``'s process now; it is started again, counted under ``cause``."""
        proc = slot.process
        if proc is not None and proc.returncode is None:
            slot.kill_cause = cause
            proc.kill()

    # -- state, reload ------------------------------------------------------------------------------------------

    def snapshot(self) -> States:
        return {name: pool_state(s.pool.backends) for name, s in self.sup.services.items()}

    def push_state(self) -> None:
        """Send every worker the backends whose state changed since the last push (all of them after a reload)."""
        state = self.snapshot()
        changes = state_changes(self._sent_state, state)
        if not changes:
            return
        full = self._sent_state is None
        self._sent_state = state
        for slot in self.slots:
            self._send(slot, {"t": "state", "services": changes, "full": full})

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
        """Send ``config`` to every worker (the parent has applied it); what went wrong where (worker_reload)."""
        problems = await reload_workers(self, config)
        self._sent_state = None
        self.push_state()
        return problems

    # -- requests ------------------------------------------------------------------------------------------------

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

    def tell(self, index: int, message: Message) -> None:
        self._send(self.slots[index], message)

    def tell_all(self, message: Message) -> None:
        for slot in self.slots:
            self._send(slot, message)

    # -- figures -------------------------------------------------------------------------------------------------

    def _retire(self, slot: WorkerSlot) -> None:
        """Keep a dead worker's counters as the base of its successor's; its gauges went with it."""
        if slot.stats:
            slot.base = add_counts(slot.base, counters_of(slot.stats))
        slot.stats = {}
        # A reservation of connection ids may still have been in the dead worker's buffer: skip one block.
        slot.next_id += ID_BLOCK * self.count
        self._aggregate()

    def _aggregate(self) -> None:
        """Write the sum of every worker's figures onto the parent's services, backends and close counters."""
        figures = [(slot.base, slot.stats) for slot in self.slots]
        self.holds = write_figures(self.sup.services, self.sup.steering.stats, figures)

    def processes(self) -> list[tuple[int, int]]:
        """(index, pid) of every worker process running now."""
        return [(s.index, s.process.pid) for s in self.slots if s.process is not None and s.process.returncode is None]


async def _no_requests(message: Message) -> Message:
    return {"error": f"the parent answers no {message.get('t')!r} requests"}


def _loop_name() -> str:
    """The workers run the parent's kind of loop (``serve --loop``)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"

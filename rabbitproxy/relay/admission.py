"""A service's admission control on the event loop: held clients, the backends' gates, one timer, one deadline.

The arithmetic is pure (:mod:`rabbitproxy.balancing.admission`); this module gives it the loop's clock and a single
timer for the whole queue, keeps the ``connect_queue_timeout`` of every held client in one
:class:`~rabbitproxy.relay.deadlines.Deadlines`, and counts the waits for the metrics. A held client costs a dict
entry here and one in the deadline queue: no task, no timer, no buffer beyond what any connecting client has (its
first bytes wait in the client leg's ``pending``, bounded by ``high_water``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from rabbitproxy.balancing.admission import WAIT_BUCKETS, Admission, AdmissionFigures, RateGate, default_burst
from rabbitproxy.relay.deadlines import Deadlines

if TYPE_CHECKING:
    import asyncio

    from rabbitproxy.balancing.backend import Backend
    from rabbitproxy.config import ServiceConfig

K = TypeVar("K", bound=Hashable)


def wanted(config: ServiceConfig) -> bool:
    """Whether ``config`` asks for admission control at all (a rate on the service or on any backend)."""
    return config.connect_rate > 0 or any(b.connect_rate > 0 for b in config.backends)


def _service_gate(config: ServiceConfig, now: float) -> RateGate | None:
    rate = config.connect_rate
    if rate <= 0:
        return None
    return RateGate(rate, config.connect_burst or default_burst(rate), now)


class AdmissionDesk(Generic[K]):
    """Admission control of one service: who waits for a connect token, and when the next one may go.

    ``release(conn)`` is called for a held client whose turn has come (it connects now); ``expire(conn)`` for one
    whose ``connect_queue_timeout`` ran out first. Both run from the loop's timers, never from inside a call of the
    data path, so a client leg is never re-entered.
    """

    __slots__ = (
        "_releasing",
        "_timer",
        "_timer_at",
        "admission",
        "backend_gates",
        "held_total",
        "loop",
        "queue_deadlines",
        "release",
        "wait_buckets",
        "wait_sum",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ServiceConfig,
        release: Callable[[K], object],
        expire: Callable[[K], object],
    ) -> None:
        self.loop = loop
        now = loop.time()
        self.admission: Admission[K] = Admission(_service_gate(config, now))
        # Gates of the backends that have a connect_rate of their own, by backend name (Backend objects are
        # replaced by a reload; the server's name stays).
        self.backend_gates: dict[str, RateGate] = {}
        self.release = release
        self.queue_deadlines: Deadlines[K] = Deadlines(loop, config.connect_queue_timeout, self._expired(expire))
        # The one timer and when it fires (kept here: uvloop hands back a plain Handle, without when(), for a timer
        # that is due at once).
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0
        # While a released client connects: when it was first held, so that holding it again keeps its place in time.
        self._releasing: float | None = None
        # Clients held so far and how long they waited (a histogram with WAIT_BUCKETS, cumulative at the end).
        self.held_total = 0
        self.wait_sum = 0.0
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self._backends(config, now)

    def _expired(self, expire: Callable[[K], object]) -> Callable[[K], object]:
        def expired(conn: K) -> None:
            since = self.admission.discard(conn)
            if since is not None:
                self._observe(self.loop.time() - since)
                expire(conn)

        return expired

    def _backends(self, config: ServiceConfig, now: float) -> None:
        gates: dict[str, RateGate] = {}
        for b in config.backends:
            if b.connect_rate > 0:
                gate = self.backend_gates.get(b.name)
                if gate is None:
                    gate = RateGate(b.connect_rate, default_burst(b.connect_rate), now)
                else:
                    gate.retune(b.connect_rate, default_burst(b.connect_rate), now)
                gates[b.name] = gate
        self.backend_gates = gates

    # -- asked by the data path ----------------------------------------------------------------------------------

    def admit(self, conn: K) -> bool:
        """A new client wants its first backend connection: True to go now, False when it is held."""
        if self.admission.admit(conn, self.loop.time()):
            return True
        self._held(conn)
        return False

    def limited(self, backends: Sequence[Backend]) -> list[Backend]:
        """The backends among ``backends`` that have a rate of their own and no token now."""
        gates = self.backend_gates
        if not gates:
            return []
        now = self.loop.time()
        out = []
        for b in backends:
            gate = gates.get(b.name)
            if gate is not None and not gate.ready(now):
                out.append(b)
        return out

    def took(self, backend: Backend) -> None:
        """A connect to ``backend`` starts: it spends one of the backend's tokens (if it has a rate)."""
        gate = self.backend_gates.get(backend.name)
        if gate is not None:
            gate.take(self.loop.time())

    def hold_for(self, conn: K, backends: Sequence[Backend]) -> None:
        """Hold ``conn`` first in line until one of ``backends`` (every one it could use, all out of tokens) has one."""
        now = self.loop.time()
        gates = self.backend_gates
        wait = min((gates[b.name].wait(now) for b in backends if b.name in gates), default=0.0) + 0.001
        since = self._releasing
        self.admission.hold(conn, now if since is None else since, now + wait)
        self._held(conn)

    def discard(self, conn: K) -> None:
        """``conn`` ended while held (it left, or the service closed it)."""
        if self.admission.discard(conn) is not None:
            self.queue_deadlines.discard(conn)

    def __contains__(self, conn: object) -> bool:
        return conn in self.admission

    def __len__(self) -> int:
        return len(self.admission)

    def figures(self) -> AdmissionFigures:
        """What the API and the metrics show of this desk now."""
        return AdmissionFigures(
            waiting=len(self.admission),
            oldest_wait=self.admission.oldest(self.loop.time()),
            held=self.held_total,
            wait_sum=self.wait_sum,
            wait_buckets=tuple(self.wait_buckets),
        )

    # -- settings ------------------------------------------------------------------------------------------------

    def retune(self, config: ServiceConfig) -> None:
        """A reload's new settings; held clients keep their place and their deadline."""
        now = self.loop.time()
        gate = self.admission.gate
        rate = config.connect_rate
        if rate <= 0:
            self.admission.gate = None
        elif gate is None:
            self.admission.gate = _service_gate(config, now)
        else:
            gate.retune(rate, config.connect_burst or default_burst(rate), now)
        self.queue_deadlines.delay = config.connect_queue_timeout
        self._backends(config, now)
        self._arm()

    def release_all(self) -> None:
        """Admission control is switched off (a reload): every held client connects now."""
        self.admission.gate = None
        self.backend_gates = {}
        self._arm()

    # -- the timer -----------------------------------------------------------------------------------------------

    def _held(self, conn: K) -> None:
        if conn not in self.queue_deadlines:
            # A client held again (its backends had no token) keeps the deadline it got when first held.
            self.queue_deadlines.add(conn)
            self.held_total += 1
        self._arm()

    def _arm(self) -> None:
        due = self.admission.due(self.loop.time())
        timer = self._timer
        if due is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        # A millisecond late rather than early: libuv's timers count whole milliseconds, and a timer that fires
        # before the token is whole would only arm itself again.
        when = self.loop.time() + (due + 0.001 if due > 0 else 0.0)
        if timer is not None:
            if self._timer_at <= when:
                return
            timer.cancel()
        self._timer = self.loop.call_at(when, self._tick)
        self._timer_at = when

    def _tick(self) -> None:
        self._timer = None
        now = self.loop.time()
        for conn, since in self.admission.release(now):
            self._releasing = since
            try:
                self.release(conn)
            except Exception as exc:  # noqa: BLE001 - one client's failure must not strand the rest of the queue
                self.loop.call_exception_handler({"message": "admission release failed", "exception": exc})
            finally:
                self._releasing = None
            if conn not in self.admission:
                # Gone for good (held again, it keeps its deadline and is observed when it finally leaves).
                self.queue_deadlines.discard(conn)
                self._observe(now - since)
        self._arm()

    def _observe(self, waited: float) -> None:
        self.wait_sum += waited
        self.wait_buckets[bisect.bisect_left(WAIT_BUCKETS, waited)] += 1

"""Idle and heartbeat timeouts of a service's connections, served by one timer that ticks while any is watched.

A connection watched for silence (``client_idle_timeout``, or 2.5 x its negotiated heartbeat) is looked at once
per timeout at most: when its check comes due it either closes or is put back for the moment the timeout would
run out counting from its last byte. With a timer per connection (``call_later``) every such look cost a
``TimerHandle``, a libuv timer start and stop in a heap that holds every connection, and a callback through the
loop: thousands of idle AMQP connections that heartbeat spent more CPU on their timers than on relaying the
heartbeats. Here a check is a dict insert into the slot of its due time (slots of ``TICK`` seconds) and, when due,
one call from the tick; the timer runs once per tick whatever the number of connections, and not at all when none
is watched.

A check runs at most ``TICK`` after its due time, never before it, so a timeout is never cut short.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

# Seconds per slot: how late after its due time a check may run. Timeouts are seconds to minutes long (a heartbeat
# of 1 s gives 2.5 s); a quarter of a second is lost in that, and four ticks a second cost nothing.
TICK = 0.25


class Watched(Hashable, Protocol):
    """What the watch needs of a connection: a field for its slot (0 when not watched)."""

    idle_slot: int


W = TypeVar("W", bound=Watched)


class IdleWatch(Generic[W]):
    """Connections with a pending idle check, by due slot; ``check(conn)`` is called once a check is due.

    The check decides what happens next: close the connection, or :meth:`at` a later time. A connection is in at
    most one slot (its ``idle_slot``, 0 when not watched), so a new :meth:`at` replaces the pending check.
    """

    __slots__ = ("_done", "_slots", "_timer", "check", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, check: Callable[[W], object]) -> None:
        self.loop = loop
        self.check = check
        self._slots: dict[int, dict[W, None]] = {}
        # The last slot the tick has emptied; slots up to it are never filled again (a due time in the past goes
        # into the next slot, which the next tick serves).
        self._done = math.floor(time.monotonic() / TICK)
        self._timer: asyncio.TimerHandle | None = None

    def at(self, conn: W, due: float) -> None:
        """Check ``conn`` at ``due`` (``time.monotonic()`` seconds), or in the next tick if that has passed."""
        slot = max(math.ceil(due / TICK), self._done + 1)
        old = conn.idle_slot
        if old:
            if old == slot:
                return
            self.discard(conn)
        conn.idle_slot = slot
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = {conn: None}
        else:
            bucket[conn] = None
        if self._timer is None:
            self._arm()

    def discard(self, conn: W) -> None:
        """Stop watching ``conn`` (it closed); nothing is called for it afterwards."""
        slot = conn.idle_slot
        if slot:
            conn.idle_slot = 0
            bucket = self._slots.get(slot)
            if bucket is not None:
                bucket.pop(conn, None)
                if not bucket:
                    del self._slots[slot]

    def __len__(self) -> int:
        return sum(len(b) for b in self._slots.values())

    def _arm(self) -> None:
        # The loop's clock and time.monotonic() share their origin on both loops; the tick rereads the latter.
        delay = (self._done + 1) * TICK - time.monotonic()
        self._timer = self.loop.call_later(max(delay, 0.0), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = math.floor(time.monotonic() / TICK)
        slots = self._slots
        if now - self._done <= len(slots):
            due = [s for s in range(self._done + 1, now + 1) if s in slots]
        else:
            # The loop stalled for many ticks: look at the filled slots, not every slot in between.
            due = sorted(s for s in slots if s <= now)
        self._done = max(now, self._done)
        for s in due:
            bucket = slots.pop(s)
            for conn in bucket:
                conn.idle_slot = 0
            for conn in bucket:
                if conn.idle_slot:
                    continue  # an earlier check in this tick watched it again (a closed one returns at once)
                try:
                    self.check(conn)
                except Exception as exc:  # noqa: BLE001 - one failing check must not stop the others or the timer
                    self.loop.call_exception_handler(
                        {"message": "idle check failed", "exception": exc, "connection": conn}
                    )
        # A check that watched a connection again has armed the next tick already: a second timer here would
        # make two ticks from then on, and one more after every tick that re-watches.
        if slots and self._timer is None:
            self._arm()

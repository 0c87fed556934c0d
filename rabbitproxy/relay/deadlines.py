"""Per-connection deadlines that share one delay, served by one timer.

A service gives every connect the same ``connect_timeout`` and every new client the same ``client_hello_timeout``.
Deadlines with one delay expire in the order they were set, so they can live in an insertion-ordered dict with a
single loop timer armed for the oldest one. A timer per connection (a ``TimerHandle`` and, on uvloop, a libuv
timer to start, stop and close) was a measurable share of a short connection's CPU; this costs a dict insert and
a delete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Keys with a deadline; ``on_expired(key)`` is called once a key's deadline has passed.

    ``delay`` is read at every :meth:`add`. If it is made shorter while keys are waiting (a reload), a newer key
    can wait behind an older one, by at most the old delay: expiry stops at the first key still in time.
    """

    __slots__ = ("_timer", "_waiting", "delay", "loop", "on_expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, on_expired: Callable[[K], object]) -> None:
        self.loop = loop
        self.delay = delay
        self.on_expired = on_expired
        self._waiting: dict[K, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: K) -> None:
        """Start ``key``'s deadline (``delay`` seconds from now); adding a waiting key again restarts it."""
        waiting = self._waiting
        waiting.pop(key, None)
        deadline = self.loop.time() + self.delay
        waiting[key] = deadline
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._expire)

    def discard(self, key: K) -> None:
        """Forget ``key``'s deadline (its wait ended in time); unknown keys are ignored."""
        self._waiting.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[K]:
        """The waiting keys, oldest first; copy them before changing the set while iterating."""
        return iter(self._waiting)

    def close(self) -> None:
        """Drop every deadline and the timer (the owner stops); nothing expires afterwards."""
        self._waiting.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        waiting = self._waiting
        now = self.loop.time()
        expired: list[K] = []
        for key, deadline in waiting.items():
            if deadline > now:
                break
            expired.append(key)
        for key in expired:
            del waiting[key]
        # Armed before the callbacks run, so a callback that adds a key finds the timer set.
        if waiting:
            self._timer = self.loop.call_at(next(iter(waiting.values())), self._expire)
        for key in expired:
            try:
                self.on_expired(key)
            except Exception as exc:  # noqa: BLE001 - one failing callback must not stop the other expiries
                self.loop.call_exception_handler(
                    {"message": "deadline callback failed", "exception": exc, "key": key}
                )

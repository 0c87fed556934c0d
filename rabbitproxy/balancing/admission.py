"""Admission control: how many new backend connections a service, or one backend, may start in a second.

When a node dies or restarts, every client it had reconnects at once; after a proxy restart, all of them do. Each
new AMQP connection costs the broker a TCP accept, a TLS handshake maybe, an authentication (an LDAP or HTTP backend
round trip) and a vhost lookup, and brokers have been seen to fall over under thousands of these at once. A
``connect_rate`` paces them: a client above the rate is accepted and *held* (its first bytes wait in the proxy, as
they do while a backend connect is in flight) until a token is free, first come first served, for at most
``connect_queue_timeout``. Nothing is refused, so clients whose reconnect back-off is short do not make the storm
worse by coming back sooner.

Pure code: the caller passes the clock (``now``, in seconds) to every call, so tests drive it with plain numbers and
the data path (:mod:`rabbitproxy.relay.admission`) keeps the one timer.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


# Refilling in many small steps adds up float rounding (0.1 s at 1 token/s ten times is 0.9999999 tokens): a token
# this close to whole is whole.
WHOLE = 1.0 - 1e-9


def default_burst(rate: float) -> int:
    """The burst a rate gets when none is configured: a tenth of a second's worth, at least one."""
    return max(1, math.ceil(rate / 10))


class RateGate:
    """A token bucket that is asked, never overdrawn: :meth:`take` succeeds only while a whole token is there.

    ``rate`` tokens a second, at most ``burst`` saved up, full at the start. Over any interval of ``t`` seconds it
    hands out at most ``burst + rate * t`` tokens, which is the bound an operator sizing a broker reads it as.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _fill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        """Take a token if one is there; False (and nothing taken) when not."""
        self._fill(now)
        if self.tokens >= WHOLE:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def ready(self, now: float) -> bool:
        """Whether :meth:`take` would succeed now (takes nothing)."""
        self._fill(now)
        return self.tokens >= WHOLE

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until a token is there; 0 when one is there now."""
        self._fill(now)
        return 0.0 if self.tokens >= WHOLE else (1.0 - self.tokens) / self.rate

    def retune(self, rate: float, burst: int, now: float) -> None:
        """New settings (a reload); the tokens saved so far are kept, up to the new burst."""
        self._fill(now)
        self.rate = rate
        self.burst = burst
        self.tokens = min(self.tokens, float(burst))


class Admission(Generic[K]):
    """The clients of one service held for a connect token, oldest first, and the service's own gate.

    ``gate`` is None when only backends have a ``connect_rate``: clients are then held only while every backend
    they could use is out of tokens (the relay decides that and calls :meth:`hold` itself).
    """

    __slots__ = ("gate", "held")

    def __init__(self, gate: RateGate | None) -> None:
        self.gate = gate
        # Held clients in arrival order: when each was held, and the time before which it may not go. A client held
        # again because its backends had no token has passed the service's gate already (no second token from it)
        # and waits for its backends' next token; a client waiting for the service's gate has ``not_before`` None.
        self.held: dict[K, tuple[float, float | None]] = {}

    def __len__(self) -> int:
        return len(self.held)

    def __contains__(self, key: object) -> bool:
        return key in self.held

    def admit(self, key: K, now: float) -> bool:
        """A new client asks to connect: True if it may go now; otherwise it is held (last in the queue)."""
        gate = self.gate
        if not self.held and (gate is None or gate.take(now)):
            return True
        self.held[key] = (now, None if gate is not None else now)
        return False

    def hold(self, key: K, since: float, not_before: float) -> None:
        """Hold ``key``, which passed the service's gate, at the head of the queue until ``not_before``.

        For a client every usable backend of which is out of tokens: it goes first once one of them has a token.
        """
        self.held = {key: (since, not_before), **self.held}

    def discard(self, key: K) -> float | None:
        """Forget a held client (it left, or its wait ran out); when it was held, or None if it was not."""
        entry = self.held.pop(key, None)
        return None if entry is None else entry[0]

    def release(self, now: float) -> list[tuple[K, float]]:
        """The held clients that may connect now, oldest first, each with when it was held; they leave the queue."""
        out: list[tuple[K, float]] = []
        held = self.held
        gate = self.gate
        while held:
            key, (since, not_before) = next(iter(held.items()))
            if not_before is None:
                if gate is not None and not gate.take(now):
                    break
            elif not_before > now:
                break
            del held[key]
            out.append((key, since))
        return out

    def due(self, now: float) -> float | None:
        """Seconds until the head of the queue may go; None when nobody is held."""
        if not self.held:
            return None
        _since, not_before = next(iter(self.held.values()))
        if not_before is not None:
            return max(0.0, not_before - now)
        return 0.0 if self.gate is None else self.gate.wait(now)

    def oldest(self, now: float) -> float:
        """How long the longest-held client has waited (0 when none is held)."""
        if not self.held:
            return 0.0
        since, _not_before = next(iter(self.held.values()))
        return max(0.0, now - since)


# Upper bounds (seconds) of the wait histogram's buckets: from a token that was just short to the default
# connect_queue_timeout and beyond.
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class AdmissionFigures:
    """What one service's admission control shows the API and the metrics; summed over the workers by the parent.

    ``waiting`` and ``oldest_wait`` describe now; the rest count since start: clients held, and how long each
    waited in a histogram with :data:`WAIT_BUCKETS` (one more bucket at the end for longer waits; not cumulative).
    A client let through at once is not counted: the histogram describes the waits admission control caused.
    """

    waiting: int = 0
    oldest_wait: float = 0.0
    held: int = 0
    wait_sum: float = 0.0
    wait_buckets: tuple[int, ...] = (0,) * (len(WAIT_BUCKETS) + 1)

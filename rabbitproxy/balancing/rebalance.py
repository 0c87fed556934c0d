"""How far each backend is from its fair share of a service's connections, and what to do about it: pure.

The fair share of a backend is its share of the service's effective weight; its share of the connections is what
it holds of the connections on the backends that take new ones. After a node restarts, robust clients have all
reconnected to the others and stay there; the rebalancer (:mod:`rabbitproxy.control.rebalancer`) asks
:func:`to_close` how many connections to end where, and :func:`held` which backends should take no new connection
for a while so that the clients it moves land on the backends below their share.

Everything here takes plain numbers, so the decisions are tested without a loop, a pool or a broker.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Share:
    """One backend as the rebalancer sees it: its open connections and its weight for new ones."""

    name: str
    active: int
    weight: int


@dataclass(frozen=True, slots=True)
class Balance:
    """A backend's place in its service: fraction of the connections held vs fraction of the weight."""

    name: str
    active: int
    # Fraction of the service's connections on this backend (0 when the service has none).
    share: float
    # Fraction of the service's weight: the share it would hold if connections followed the weights exactly.
    fair: float
    # fair x the service's connections: how many connections that fair share is.
    fair_count: float

    def over(self, tolerance: float) -> bool:
        """Whether it holds more than ``(1 + tolerance)`` x its fair share."""
        return self.active > (1.0 + tolerance) * self.fair_count


def balances(shares: Iterable[Share]) -> list[Balance]:
    """Each backend with a weight, measured against the others; backends of weight 0 take no part."""
    counted = [s for s in shares if s.weight > 0]
    total = sum(s.active for s in counted)
    weight = sum(s.weight for s in counted)
    out = []
    for s in counted:
        fair = s.weight / weight
        out.append(
            Balance(name=s.name, active=s.active, share=s.active / total if total else 0.0, fair=fair,
                    fair_count=fair * total)
        )
    return out


def to_close(balance: Sequence[Balance], tolerance: float, over: Iterable[str] | None = None) -> dict[str, int]:
    """How many connections to end on each backend above ``(1 + tolerance)`` x its fair share.

    A backend is brought down to its fair share rounded up, not merely under the tolerance: stopping at the edge
    would leave it there and the next wobble would start another round. Rounding up means a handful of
    connections over a handful of backends (one connection, two backends) never moves a connection back and forth.
    ``over`` restricts the answer to the backends that have been over for long enough (the caller's clock).
    """
    allowed = None if over is None else set(over)
    out: dict[str, int] = {}
    for b in balance:
        if allowed is not None and b.name not in allowed:
            continue
        if not b.over(tolerance):
            continue
        n = b.active - math.ceil(b.fair_count - 1e-9)
        if n > 0:
            out[b.name] = n
    return out


def held(balance: Sequence[Balance]) -> set[str]:
    """The backends that should take no new connection while the rebalancer moves clients.

    The clients it closes reconnect through the proxy, and a weighted round robin would send two thirds of them
    straight back to the two crowded nodes of three. While some backend is a whole connection or more below its
    fair share, the backends at or above theirs are held, so reconnects go where the room is. Never all of them:
    when nothing is below its share nothing is held.
    """
    below = [b for b in balance if b.active < math.floor(b.fair_count + 1e-9)]
    if not below:
        return set()
    return {b.name for b in balance if b.active >= math.ceil(b.fair_count - 1e-9)}

"""The backends of one service and the choice of one for a new connection.

Pure, no I/O: the data path asks :meth:`Pool.choose` for a backend; the backends' own state and arithmetic are in
:mod:`rabbitproxy.balancing.backend`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from rabbitproxy.balancing.algorithms import Balancer, make_balancer
from rabbitproxy.balancing.backend import Backend

if TYPE_CHECKING:
    from rabbitproxy.config import ServiceConfig


class Pool:
    """The backends of one service and its balancing algorithm."""

    __slots__ = ("backends", "balancer", "by_name")

    def __init__(self, backends: Sequence[Backend], algorithm: str) -> None:
        self.backends = list(backends)
        self.by_name = {b.name: b for b in self.backends}
        self.balancer: Balancer = make_balancer(algorithm)

    @classmethod
    def from_config(cls, service: ServiceConfig, *, healthy: bool) -> Pool:
        return cls([Backend.for_service(service, b, healthy=healthy) for b in service.backends], service.balance)

    def choose(self, key: bytes | None = None, exclude: Iterable[Backend] = ()) -> Backend | None:
        """Pick a backend for a new connection, or None when no backend may take one.

        Backup backends are considered only while no regular backend is usable at all; ``exclude`` (backends a
        retry already failed on) does not count towards that, so a failed regular backend does not open the backups
        while another regular one is still there.
        """
        # One pass and one weight read per backend: this runs for every new connection.
        regular: list[Backend] = []
        backups: list[Backend] = []
        held: list[Backend] = []
        for b in self.backends:
            if b.weight > 0:
                if b.backup:
                    backups.append(b)
                elif b.rebalance_hold:
                    held.append(b)
                else:
                    regular.append(b)
        # Backups are considered only while no regular backend is usable, whether or not a retry excluded it.
        any_regular = bool(regular or held)
        if exclude:
            skip = set(exclude)
            regular = [b for b in regular if b not in skip]
            held = [b for b in held if b not in skip]
            backups = [b for b in backups if b not in skip]
        # A rebalancer's hold only steers: when no backend below its share is left, the held ones take the client.
        candidates = regular or held or ([] if any_regular else backups)
        if not candidates:
            return None
        return self.balancer.choose(candidates, key)

    def weighted(self) -> list[tuple[Backend, int]]:
        """The backends new connections may go to now, with their weights, by the rules :meth:`choose` follows.

        What the kernel is programmed with in ``mode = "l4-nat"`` (rabbitproxy.control.l4): every usable regular
        backend with its effective weight, or the usable backups while no regular one is usable. One weight read
        per backend, as in :meth:`choose`, so both modes see a state change at the same moment.
        """
        regular: list[tuple[Backend, int]] = []
        backups: list[tuple[Backend, int]] = []
        for b in self.backends:
            weight = b.weight
            if weight > 0:
                (backups if b.backup else regular).append((b, weight))
        return regular or backups

    @property
    def active(self) -> int:
        return sum(b.active for b in self.backends)

    def usable_count(self) -> int:
        return sum(1 for b in self.backends if b.weight > 0)

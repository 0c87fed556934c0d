"""Pure backend selection: smooth weighted round robin, least-connections and source hashing.

Nothing here does I/O or keeps time. A balancer is handed the backends that are usable right now (the
caller has already applied health and admin state, and removed backends already tried when retrying) and
returns one of them.
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Sequence
from typing import ClassVar, Protocol, TypeVar

__all__ = [
    "ALGORITHMS",
    "Balancer",
    "Candidate",
    "LeastConnections",
    "SmoothWeightedRoundRobin",
    "SourceHash",
    "make_balancer",
    "source_key",
]


class Candidate(Protocol):
    """What a balancer needs to know about a backend."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> int:
        """Effective weight; a candidate with weight <= 0 is never chosen."""
        ...

    @property
    def active(self) -> int:
        """Connections open through this backend right now."""
        ...

    @property
    def load(self) -> int:
        """What least-connections compares: open connections plus connects in flight."""
        ...


C = TypeVar("C", bound=Candidate)


class Balancer(abc.ABC):
    """Chooses one backend among candidates."""

    __slots__ = ()

    algorithm: ClassVar[str]

    @abc.abstractmethod
    def choose(self, candidates: Sequence[C], key: bytes | None = None) -> C | None:
        """Pick one of `candidates` (usable backends in config order), or None when none has weight > 0.

        `key` is the client address in bytes; only source-hash uses it.
        """

    def forget(self, name: str) -> None:  # noqa: B027 - deliberately a no-op for stateless algorithms
        """Drop any state kept for the backend `name` (call when a backend is removed from the config)."""


class SmoothWeightedRoundRobin(Balancer):
    """nginx's smooth weighted round robin: deterministic, interleaved, exact over a cycle.

    Each pick adds every candidate's weight to its running `current`, picks the highest `current` (first in
    order on ties) and subtracts the total weight from the winner. Over any sum-of-weights picks with an
    unchanged set, each backend is chosen exactly its weight times, spread out rather than in runs
    (5,1,1 -> a a b a c a a).

    State is keyed by backend name, so the caller may pass a differently filtered list on every call.
    Backends absent from a call (or with weight <= 0) keep their state untouched: a retry that excludes the
    failed backend shifts the sequence only by the one extra pick it makes.

    Weight changes apply at once. Running totals live on the scale of the total weight: totals built up
    under weights 1000:1 would take about a hundred picks at 5:1 to wind down, all of them going to the first
    backend (feedback agents lowering every weight at once do exactly this). So when a candidate's weight
    differs from the one it last had, a new weight epoch begins, and each backend's running total is rescaled
    by new total / the total it was last rescaled under, the first time it takes part in the new epoch (at
    once for the candidates present, on its return for one that was left out). Its position in the cycle is
    kept and the new ratio shows within about one cycle. Without a weight change nothing is rescaled, so a
    retry that leaves a backend out, or a backend going down and up, behaves exactly as in nginx.
    """

    __slots__ = ("_current", "_epoch", "_seen")

    algorithm: ClassVar[str] = "weighted-round-robin"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        # Per backend: the weight it last had, the total weight its running total is scaled to, and the epoch.
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._epoch = 0

    def choose(self, candidates: Sequence[C], key: bytes | None = None) -> C | None:
        """Pick the next backend in the smooth weighted sequence; `key` is ignored."""
        seen = self._seen
        total = 0
        changed = False
        for candidate in candidates:
            weight = candidate.weight
            if weight > 0:
                total += weight
                state = seen.get(candidate.name)
                # A backend seen for the first time has no history, so it is no change.
                if state is not None and state[0] != weight:
                    changed = True
        if changed:
            self._epoch += 1
        epoch = self._epoch
        current = self._current
        best: C | None = None
        best_current = 0
        for candidate in candidates:
            weight = candidate.weight
            if weight <= 0:
                continue
            name = candidate.name
            value = current.get(name, 0)
            state = seen.get(name)
            if state is None or state[2] != epoch:
                if state is not None and value and state[1] != total:
                    # Integer arithmetic keeps this exact for any weight; truncating towards zero (rather than
                    # flooring) keeps the totals from drifting negative over many changes.
                    scaled = abs(value) * total // state[1]
                    value = scaled if value > 0 else -scaled
                seen[name] = (weight, total, epoch)
            value += weight
            current[name] = value
            # Strict comparison keeps the first candidate in config order on ties, as nginx does.
            if best is None or value > best_current:
                best = candidate
                best_current = value
        if best is not None:
            current[best.name] = best_current - total
        return best

    def forget(self, name: str) -> None:
        """Drop the running weight of `name`."""
        self._current.pop(name, None)
        self._seen.pop(name, None)


class LeastConnections(Balancer):
    """Fewest open connections relative to weight.

    The lowest active/weight ratio wins (compared as exact integer cross products). Ties go to the higher
    weight, then rotate among the remaining equals so that, for example, a burst of connections arriving
    before any of them is counted does not all land on the first backend.
    """

    __slots__ = ("_rotation",)

    algorithm: ClassVar[str] = "least-connections"

    def __init__(self) -> None:
        self._rotation = 0

    def choose(self, candidates: Sequence[C], key: bytes | None = None) -> C | None:
        """Pick the least loaded backend relative to its weight; `key` is ignored."""
        tied: list[C] = []
        best_active = 0
        best_weight = 0
        for candidate in candidates:
            weight = candidate.weight
            if weight <= 0:
                continue
            active = candidate.load
            if not tied:
                tied.append(candidate)
                best_active, best_weight = active, weight
                continue
            # active/weight < best_active/best_weight, without division or floats.
            lhs = active * best_weight
            rhs = best_active * weight
            if lhs < rhs or (lhs == rhs and weight > best_weight):
                tied = [candidate]
                best_active, best_weight = active, weight
            elif lhs == rhs and weight == best_weight:
                tied.append(candidate)
        if not tied:
            return None
        if len(tied) == 1:
            return tied[0]
        chosen = tied[self._rotation % len(tied)]
        self._rotation += 1
        return chosen


# 53 bits is what a float mantissa holds exactly, so the uniform value below is exact and never reaches
# 0 or 1 (either would make ln(u) zero or infinite).
_HASH_BITS = 53
_HASH_SCALE = float(1 << _HASH_BITS)


def _unit_interval(key: bytes, name: str) -> float:
    """A stable pseudo-random number in the open interval (0, 1) for this client and backend."""
    digest = hashlib.blake2b(digest_size=8)
    # The length prefix keeps (key, name) pairs from colliding by concatenation ("ab"+"c" vs "a"+"bc").
    digest.update(len(key).to_bytes(4, "big"))
    digest.update(key)
    digest.update(name.encode("utf-8", "surrogatepass"))
    bits = int.from_bytes(digest.digest(), "big") >> (64 - _HASH_BITS)
    return (bits + 0.5) / _HASH_SCALE


def source_key(host: str) -> bytes:
    """What source-hash hashes for a client: the text of its IP address (as the socket or PROXY header gave it).

    The data path and the tests both call this, so the tests' spread and pinned values are computed over the
    keys production really sends.
    """
    return host.encode()


class SourceHash(Balancer):
    """Weighted rendezvous (highest random weight) hashing of the client address.

    Each backend scores `-weight / ln(u)` where `u` is a blake2b-derived uniform value of (key, name); the
    highest score wins. A client therefore sticks to one backend while the set of backends and their weights
    are unchanged, each backend gets a share of clients proportional to its weight, and removing a backend
    moves only the clients that were on it. Ties (practically impossible) go to the lower name so the result
    never depends on order.

    Without a key (for example a client on a Unix socket) there is nothing to hash, so the choice falls back
    to least-connections.
    """

    __slots__ = ("_fallback",)

    algorithm: ClassVar[str] = "source-hash"

    def __init__(self) -> None:
        self._fallback = LeastConnections()

    def choose(self, candidates: Sequence[C], key: bytes | None = None) -> C | None:
        """Pick the backend the client address `key` hashes to."""
        if key is None:
            return self._fallback.choose(candidates)
        best: C | None = None
        best_score = 0.0
        for candidate in candidates:
            weight = candidate.weight
            if weight <= 0:
                continue
            # ln(u) is strictly negative because u is in (0, 1), so the score is positive and finite.
            score = -weight / math.log(_unit_interval(key, candidate.name))
            if best is None or score > best_score or (score == best_score and candidate.name < best.name):
                best = candidate
                best_score = score
        return best


ALGORITHMS: dict[str, type[Balancer]] = {
    cls.algorithm: cls for cls in (SmoothWeightedRoundRobin, LeastConnections, SourceHash)
}


def make_balancer(algorithm: str) -> Balancer:
    """Build a fresh balancer for the configured algorithm name."""
    try:
        cls = ALGORITHMS[algorithm]
    except KeyError:
        choices = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown balancing algorithm {algorithm!r}; choose one of: {choices}") from None
    return cls()

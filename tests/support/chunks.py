"""Cutting bytes into the pieces a socket might deliver, for the parsers' chunking properties."""

from __future__ import annotations

import itertools


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at each of ``cuts`` (modulo ``len(data) + 1``, so any integer is a cut); no empty piece."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]

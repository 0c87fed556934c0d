"""Judging a paced stream of events by their times: how many fell within any window of a given length."""

from __future__ import annotations


def densest(times: list[float], window: float) -> int:
    """The most events within any ``window`` seconds."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best

"""Durations as operators write them: ``300``, ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``.

One grammar for the configuration file's duration keys and the command line's ``--deadline``, so a value that
works in one place works in the other. Standard library only, like :mod:`rabbitproxy.addresses`: the CLI imports
it without loading pydantic, and ``rabbitproxy.config`` builds its duration type on it.
"""

from __future__ import annotations

import math
import re

# Seconds per unit. "m" is minutes (never months), as in Go's time.ParseDuration and systemd's time spans.
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# What every duration error shows, so an operator sees the whole grammar at once.
GRAMMAR = 'seconds as a number (30, 0.5) or a string with a unit: "250ms", "5s", "2m", "1h"'

# A plain decimal: no sign, exponent, underscores, "inf" or "nan", which float() would all take.
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds (0 or more, finite) from a duration string; ValueError showing the grammar otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write {GRAMMAR}")
    number, unit = match.groups()
    seconds = float(number) * UNITS[(unit or "s").lower()]
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is too long a duration")
    return seconds


def duration_seconds(value: object) -> float:
    """Seconds from a configuration value: a number of seconds or a duration string; ValueError otherwise."""
    # bool is an int to Python; ``timeout = true`` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a duration: {GRAMMAR}")
    if isinstance(value, str):
        return parse_duration(value)
    if not math.isfinite(value):
        raise ValueError(f"must be a finite duration: {GRAMMAR}")
    if value < 0:
        raise ValueError(f"must not be negative: {GRAMMAR}")
    return float(value)

"""A strict logfmt reader, to prove that every line the proxy writes reads back as key=value pairs.

The grammar is go-logfmt's (what Loki and Vector follow): pairs separated by one space; a key is one or more
printable characters other than ``=``, ``"`` and space; a value is empty, a bare word of the same characters, or a
double-quoted string of printable characters whose escapes are JSON's (``\\"``, ``\\\\``, ``\\n``, ``\\t``,
``\\uXXXX``). Strict where those parsers are lenient: a stray quote, a control character, a doubled or trailing
space or a bare key without ``=`` is an error, so a line that only happens to parse somewhere fails here.
"""

from __future__ import annotations

import json
import re

_KEY = r'[^\s="\x00-\x1f\x7f]+'
_BARE = r'[^\s="\\\x00-\x1f\x7f]*'
_QUOTED = r'"(?:[^"\\\x00-\x1f\x7f]|\\.)*"'
_PAIR = re.compile(rf"({_KEY})=({_QUOTED}|{_BARE})(?: |\Z)")


class LogfmtError(ValueError):
    """The line is not strict logfmt."""


def parse(line: str) -> dict[str, str]:
    """The pairs of one logfmt line, in order; quoted values unescaped. Raises LogfmtError."""
    pairs: dict[str, str] = {}
    pos = 0
    if not line or line.endswith(" "):
        raise LogfmtError(f"empty line or trailing space: {line!r}")
    while pos < len(line):
        match = _PAIR.match(line, pos)
        if match is None:
            raise LogfmtError(f"not a key=value pair at column {pos}: {line!r}")
        key, raw = match.group(1), match.group(2)
        if not (key + raw).isprintable():
            raise LogfmtError(f"an unprintable character in {key}={raw}: {line!r}")
        if key in pairs:
            raise LogfmtError(f"key {key!r} twice: {line!r}")
        try:
            pairs[key] = json.loads(raw) if raw.startswith('"') else raw
        except ValueError as exc:
            raise LogfmtError(f"bad escape in {raw!r}: {exc}") from None
        pos = match.end()
    return pairs

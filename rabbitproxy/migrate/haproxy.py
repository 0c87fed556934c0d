"""Reading an HAProxy configuration file: sections, directives split into words, times and addresses.

Only the shape of the file is read here, as HAProxy's own parser reads it (``cfgparse.c``): a line is a list of
words separated by blanks, ``#`` starts a comment outside quotes, ``"..."`` and ``'...'`` quote, ``\\`` escapes
the next character, and a section keyword (``global``, ``defaults``, ``listen``, ``frontend``, ``backend``, ...)
at the start of a line opens a new section. What the directives mean for rabbitproxy is
:mod:`rabbitproxy.migrate.convert`'s job. Pure: no I/O, no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every section keyword of HAProxy 2.x; the ones the converter does not read are skipped with a warning.
SECTION_KINDS = frozenset(
    {
        "global",
        "defaults",
        "listen",
        "frontend",
        "backend",
        "peers",
        "resolvers",
        "userlist",
        "mailers",
        "program",
        "cache",
        "http-errors",
        "ring",
        "log-forward",
        "fcgi-app",
        "crt-store",
        "traces",
    }
)
# HAProxy's time units; a bare number is milliseconds for timeouts and check intervals.
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class HAProxySyntaxError(ValueError):
    """A line HAProxy itself would refuse to split (an unterminated quote)."""


@dataclass(frozen=True)
class Directive:
    """One configuration line: its number in the file and its words, quotes and escapes resolved."""

    line: int
    words: tuple[str, ...]

    @property
    def keyword(self) -> str:
        return self.words[0]

    @property
    def text(self) -> str:
        """The directive as it reads in a message."""
        return " ".join(self.words)


@dataclass
class Section:
    """A section: its keyword, name, the arguments after the name, its line and its directives in order."""

    kind: str
    name: str
    line: int
    args: tuple[str, ...] = ()
    directives: list[Directive] = field(default_factory=list)


def split_words(text: str) -> list[str]:
    """The words of one line; a comment ends it. Raises HAProxySyntaxError for an unterminated quote."""
    words: list[str] = []
    current: list[str] = []
    in_word = False
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quote != "'" and i + 1 < len(text):
            current.append(text[i + 1])
            in_word = True
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = ""
            else:
                current.append(ch)
        elif ch in "\"'":
            quote = ch
            in_word = True
        elif ch == "#":
            break
        elif ch in " \t":
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(ch)
            in_word = True
        i += 1
    if quote:
        raise HAProxySyntaxError(f"unterminated {quote} quote")
    if in_word:
        words.append("".join(current))
    return words


def read_sections(text: str) -> tuple[list[Section], list[tuple[int, str]]]:
    """The sections of a configuration file, and the problems found while splitting it ``(line, message)``.

    Lines before the first section belong to none and are reported; so are lines that cannot be split.
    """
    sections: list[Section] = []
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        try:
            words = split_words(raw)
        except HAProxySyntaxError as exc:
            problems.append((number, str(exc)))
            continue
        if not words:
            continue
        if words[0] in SECTION_KINDS:
            name = words[1] if len(words) > 1 else ""
            sections.append(Section(words[0], name, number, tuple(words[2:])))
        elif sections:
            sections[-1].directives.append(Directive(number, tuple(words)))
        else:
            problems.append((number, f"{words[0]}: outside any section"))
    return sections, problems


def parse_time(text: str) -> float:
    """An HAProxy time (``5s``, ``3h``, ``500``, ``1m30s`` is not HAProxy) in seconds. Raises ValueError."""
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(digits) :] or "ms"
    if not digits.isdigit() or unit not in _TIME_UNITS:
        raise ValueError(f"{text!r} is not an HAProxy time (a number with us, ms, s, m, h or d)")
    return int(digits) * _TIME_UNITS[unit]


def split_address(text: str) -> tuple[str, str]:
    """``(host, port_text)`` of an HAProxy address: ``host:port``, ``[v6]:port``, ``ipv6@::1:5672``, ``:5672``.

    The port text may be empty (none given) or a form the caller refuses (a range, an offset). As in HAProxy, the
    last colon of an unbracketed IPv6 address separates the port.
    """
    for prefix in ("ipv4@", "ipv6@", "tcp@", "tcp4@", "tcp6@"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest.removeprefix(":")
    if ":" not in text:
        return text, ""
    host, _, port = text.rpartition(":")
    return host, port

"""Parsing of feedback-agent replies (HAProxy agent-check words and Loadbalancer.org agent replies).

A reply is one line, ended by CR, LF or the end of the input; anything after the first line end is ignored.
Words are separated by spaces, tabs or commas, may come in any order and are case-insensitive:

- `NN%` or a bare `NN`: a percentage of the configured weight. Loadbalancer.org agents send the idle
  percentage (`87%`, or `87`); HAProxy agents send the same form. `0%` is a percent of 0, which the caller
  treats as drain.
- `weight:N%` and `weight:N`: also a percentage. HAProxy's agent weight is always relative to the configured
  weight, so a bare number means the same as with `%`; reading it as an absolute weight would make one agent
  reply mean different things on backends configured with different weights.
- `maxconn:N`: a connection limit for the backend.
- `ready`, `drain`, `maint`: administrative state.
- `up`; `down`, `fail` or `stopped`: operational state. Text after a `#` is a free-form reason
  (`down #disk full`); it is kept whichever words precede it.

Percentages from 0 to 1000 are accepted unchanged, nothing is clamped: HAProxy lets an agent raise a weight
above 100%, and the caller owns the limit on effective weight. Anything above 1000 is treated as garbage.
When a word repeats or contradicts an earlier one, the last one wins, as HAProxy applies the words in order.
Fields the agent did not send are None, meaning "leave unchanged".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAX_MAXCONN",
    "MAX_PERCENT",
    "MAX_REPLY_BYTES",
    "AdminState",
    "AgentReply",
    "AgentReplyError",
    "Health",
    "parse_agent_reply",
]

MAX_REPLY_BYTES: Final = 512
MAX_PERCENT: Final = 1000
MAX_MAXCONN: Final = 2**31 - 1

AdminState = Literal["ready", "drain", "maint"]
Health = Literal["up", "down"]

_WORD_SEPARATORS: Final = re.compile(r"[ \t,]+")
_LINE_END: Final = re.compile(r"[\r\n]")
# Longer than any accepted value; bounds the work int() does on a digit string from the network.
_MAX_DIGITS: Final = 10

_ADMIN_WORDS: Final[dict[str, AdminState]] = {"ready": "ready", "drain": "drain", "maint": "maint"}
_HEALTH_WORDS: Final[dict[str, Health]] = {"up": "up", "down": "down", "fail": "down", "stopped": "down"}


class AgentReplyError(ValueError):
    """The agent's reply is not one we understand; the message says why."""


@dataclass(frozen=True, slots=True)
class AgentReply:
    """What an agent reported; a field is None when the agent did not mention it."""

    percent: int | None = None
    admin: AdminState | None = None
    health: Health | None = None
    reason: str | None = None
    maxconn: int | None = None


def _first_line(line: bytes | str) -> str:
    # Only look as far as the limit: an agent that streams megabytes without a line end must not cost us more
    # than the limit to reject.
    head = line[: MAX_REPLY_BYTES + 1]
    if isinstance(head, bytes):
        end = re.search(rb"[\r\n]", head)
        if end is not None:
            head = head[: end.start()]
        elif len(line) > MAX_REPLY_BYTES:
            raise AgentReplyError(f"reply is longer than {MAX_REPLY_BYTES} bytes")
        try:
            return head.decode("ascii")
        except UnicodeDecodeError:
            raise AgentReplyError(f"reply is not ASCII: {head[:60]!r}") from None
    match = _LINE_END.search(head)
    if match is not None:
        head = head[: match.start()]
    elif len(line) > MAX_REPLY_BYTES:
        raise AgentReplyError(f"reply is longer than {MAX_REPLY_BYTES} bytes")
    if not head.isascii():
        raise AgentReplyError(f"reply is not ASCII: {head[:60]!r}")
    return head


def _number(text: str, word: str, limit: int, what: str) -> int:
    if not text or not text.isdigit() or len(text) > _MAX_DIGITS:
        raise AgentReplyError(f"{word!r} does not hold a whole number")
    value = int(text)
    if value > limit:
        raise AgentReplyError(f"{what} {value} in {word!r} is above the limit of {limit}")
    return value


def _percent(text: str, word: str) -> int:
    return _number(text.removesuffix("%"), word, MAX_PERCENT, "percentage")


def parse_agent_reply(line: bytes | str) -> AgentReply:
    """Parse one agent reply into an AgentReply, or raise AgentReplyError."""
    text = _first_line(line)
    for char in text:
        # Tabs separate words; any other control character means this is not a text reply (and must not
        # reach our logs verbatim).
        if (char < " " and char != "\t") or char == "\x7f":
            raise AgentReplyError(f"reply contains control character {char!r}: {text[:60]!r}")

    words_text, sharp, reason_text = text.partition("#")
    reason = (reason_text.strip() or None) if sharp else None
    words = [word for word in _WORD_SEPARATORS.split(words_text) if word]
    if not words:
        raise AgentReplyError(f"reply has no words before '#': {text[:60]!r}" if sharp else "reply is empty")

    percent: int | None = None
    admin: AdminState | None = None
    health: Health | None = None
    maxconn: int | None = None
    for word in words:
        lowered = word.lower()
        if lowered in _ADMIN_WORDS:
            admin = _ADMIN_WORDS[lowered]
        elif lowered in _HEALTH_WORDS:
            health = _HEALTH_WORDS[lowered]
        elif lowered.startswith("weight:"):
            percent = _percent(lowered[len("weight:") :], word)
        elif lowered.startswith("maxconn:"):
            maxconn = _number(lowered[len("maxconn:") :], word, MAX_MAXCONN, "maxconn")
        elif lowered[:1].isdigit():
            percent = _percent(lowered, word)
        else:
            raise AgentReplyError(f"unknown word {word!r} in agent reply {text[:60]!r}")
    return AgentReply(percent=percent, admin=admin, health=health, reason=reason, maxconn=maxconn)

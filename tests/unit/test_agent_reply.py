"""Unit tests for rabbitproxy.protocols.agent_reply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.protocols.agent_reply import (
    MAX_PERCENT,
    MAX_REPLY_BYTES,
    AgentReply,
    AgentReplyError,
    parse_agent_reply,
)

# --- Loadbalancer.org forms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"87", AgentReply(percent=87)),
        (b"87%", AgentReply(percent=87)),
        (b"87%\n", AgentReply(percent=87)),
        (b"87%\r\n", AgentReply(percent=87)),
        (b"up ready 87%\n", AgentReply(percent=87, admin="ready", health="up")),
        (b"drain\n", AgentReply(admin="drain")),
        (b"down\n", AgentReply(health="down")),
        (b"maint\n", AgentReply(admin="maint")),
        (b"up ready\n", AgentReply(admin="ready", health="up")),
        (b"100%", AgentReply(percent=100)),
        (b"0%", AgentReply(percent=0)),
        (b"0", AgentReply(percent=0)),
        (b"007%", AgentReply(percent=7)),
    ],
)
def test_loadbalancer_org_forms(line: bytes, expected: AgentReply) -> None:
    assert parse_agent_reply(line) == expected
    assert parse_agent_reply(line.decode()) == expected


def test_loadbalancer_org_error_word_is_rejected() -> None:
    with pytest.raises(AgentReplyError, match="unknown word 'error'"):
        parse_agent_reply(b"error\n")


# --- HAProxy words -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("75%", AgentReply(percent=75)),
        ("weight:50%", AgentReply(percent=50)),
        ("weight:50", AgentReply(percent=50)),
        ("weight:150%", AgentReply(percent=150)),
        ("maxconn:30", AgentReply(maxconn=30)),
        ("maxconn:0", AgentReply(maxconn=0)),
        ("ready", AgentReply(admin="ready")),
        ("drain", AgentReply(admin="drain")),
        ("maint", AgentReply(admin="maint")),
        ("up", AgentReply(health="up")),
        ("down", AgentReply(health="down")),
        ("fail", AgentReply(health="down")),
        ("stopped", AgentReply(health="down")),
        ("down #disk full", AgentReply(health="down", reason="disk full")),
        ("fail#no route", AgentReply(health="down", reason="no route")),
        ("stopped #", AgentReply(health="down")),
        ("stopped #  ", AgentReply(health="down")),
        ("down #a # b, c", AgentReply(health="down", reason="a # b, c")),
        ("maint down #upgrade", AgentReply(admin="maint", health="down", reason="upgrade")),
        ("ready up 60% maxconn:10", AgentReply(percent=60, admin="ready", health="up", maxconn=10)),
        ("maxconn:10,60%,up,ready", AgentReply(percent=60, admin="ready", health="up", maxconn=10)),
        ("\t up \t,, 60%  ", AgentReply(percent=60, health="up")),
        ("UP Ready WEIGHT:20% MaxConn:5", AgentReply(percent=20, admin="ready", health="up", maxconn=5)),
        ("DOWN #Keeps Case", AgentReply(health="down", reason="Keeps Case")),
    ],
)
def test_haproxy_words(line: str, expected: AgentReply) -> None:
    assert parse_agent_reply(line) == expected
    assert parse_agent_reply(line.encode()) == expected


def test_last_word_wins() -> None:
    assert parse_agent_reply("drain ready") == AgentReply(admin="ready")
    assert parse_agent_reply("up down") == AgentReply(health="down")
    assert parse_agent_reply("10% weight:20 30") == AgentReply(percent=30)


def test_percent_limits() -> None:
    assert parse_agent_reply(f"{MAX_PERCENT}%").percent == MAX_PERCENT
    with pytest.raises(AgentReplyError, match="above the limit"):
        parse_agent_reply(f"{MAX_PERCENT + 1}%")
    with pytest.raises(AgentReplyError, match="above the limit"):
        parse_agent_reply("weight:5000")


@pytest.mark.parametrize(
    "line",
    [
        "87.5%",
        "87%%",
        "-5%",
        "+5%",
        "5 %",
        "%",
        "weight:",
        "weight:%",
        "weight:-1",
        "maxconn:",
        "maxconn:1.5",
        "maxconn:99999999999",
        "maxconn:-1",
        "87x",
        "1_000",
        "99999999999999999999999999999%",
    ],
)
def test_malformed_numbers(line: str) -> None:
    with pytest.raises(AgentReplyError):
        parse_agent_reply(line)


# --- lines ---------------------------------------------------------------------------------------------


def test_only_the_first_line_counts() -> None:
    assert parse_agent_reply(b"50%\nerror\n") == AgentReply(percent=50)
    assert parse_agent_reply(b"drain\rgarbage \xff") == AgentReply(admin="drain")
    assert parse_agent_reply("up\r\ndown") == AgentReply(health="up")


@pytest.mark.parametrize("line", [b"", b"\n", b"\r\n", b"   \n", b" , \t", "", "\n50%"])
def test_empty_reply(line: bytes | str) -> None:
    with pytest.raises(AgentReplyError, match="empty"):
        parse_agent_reply(line)


def test_reason_without_words() -> None:
    with pytest.raises(AgentReplyError, match="no words"):
        parse_agent_reply("#just a comment")


def test_unknown_word_names_it() -> None:
    with pytest.raises(AgentReplyError, match="'bogus'"):
        parse_agent_reply("up bogus 50%")


@pytest.mark.parametrize("line", [b"50\xc3\xa9%", "50\u00e9%", b"down #caf\xc3\xa9", "\u00a0up"])
def test_non_ascii(line: bytes | str) -> None:
    with pytest.raises(AgentReplyError, match="not ASCII"):
        parse_agent_reply(line)


@pytest.mark.parametrize("line", ["up\x00", "down #bad\x1b[31m", "50%\x7f", "\x0bup"])
def test_control_characters(line: str) -> None:
    with pytest.raises(AgentReplyError, match="control character"):
        parse_agent_reply(line)


def test_length_limit() -> None:
    longest = "up" + " " * (MAX_REPLY_BYTES - 4) + "5%"
    assert len(longest) == MAX_REPLY_BYTES
    assert parse_agent_reply(longest) == AgentReply(percent=5, health="up")
    assert parse_agent_reply(longest.encode() + b"\n" + b"x" * 10_000) == AgentReply(percent=5, health="up")
    with pytest.raises(AgentReplyError, match="longer than 512"):
        parse_agent_reply(longest + " ")
    with pytest.raises(AgentReplyError, match="longer than 512"):
        parse_agent_reply(b"1" * 10_000_000)


def test_error_is_a_value_error() -> None:
    assert issubclass(AgentReplyError, ValueError)


def test_reply_is_frozen() -> None:
    reply = parse_agent_reply("up")
    with pytest.raises(AttributeError):
        reply.health = "down"  # type: ignore[misc]


# --- properties ----------------------------------------------------------------------------------------
# Arbitrary bytes are covered once, in test_fuzz.py; these feed text and plausible words.


@given(st.text(max_size=600))
def test_arbitrary_text_raises_only_agent_reply_error(text: str) -> None:
    try:
        reply = parse_agent_reply(text)
    except AgentReplyError:
        return
    assert isinstance(reply, AgentReply)


WORDS = st.sampled_from(
    [
        "up",
        "down",
        "fail",
        "stopped",
        "ready",
        "drain",
        "maint",
        "UP",
        "Drain",
        "50%",
        "7",
        "weight:3",
        "weight:40%",
        "maxconn:9",
        "0%",
        "error",
        "",
        "#",
        "x%",
        "1001%",
    ]
)


@given(st.lists(WORDS, max_size=8), st.lists(st.sampled_from([" ", "\t", ",", ", ", "  "]), max_size=8))
def test_word_soup_raises_only_agent_reply_error(words: list[str], separators: list[str]) -> None:
    line = "".join(w + (separators[i] if i < len(separators) else " ") for i, w in enumerate(words))
    try:
        parse_agent_reply(line)
    except AgentReplyError:
        pass


@given(
    st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_PERCENT)),
    st.one_of(st.none(), st.sampled_from(["ready", "drain", "maint"])),
    st.one_of(st.none(), st.sampled_from(["up", "down"])),
    st.one_of(st.none(), st.integers(min_value=0, max_value=100_000)),
    st.permutations(range(4)),
)
def test_valid_replies_round_trip(
    percent: int | None,
    admin: str | None,
    health: str | None,
    maxconn: int | None,
    order: list[int],
) -> None:
    pieces = [
        f"{percent}%" if percent is not None else "",
        admin or "",
        health or "",
        f"maxconn:{maxconn}" if maxconn is not None else "",
    ]
    line = " ".join(pieces[i] for i in order if pieces[i])
    if not line:
        return
    reply = parse_agent_reply(line + "\n")
    assert (reply.percent, reply.admin, reply.health, reply.maxconn) == (percent, admin, health, maxconn)

"""Issue 26's table of files: every error of a file in one run, by key path, in our words; warnings for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.config import ConfigError
from rabbitproxy.durations import GRAMMAR
from tests.support.config_files import BASE, BROKEN, GOOD, SVC, Case, edit, in_r1, in_service

# What pydantic says to a programmer; none of it may reach an operator.
PYDANTIC_WORDS = ("Input should", "constrained-", "literal[", "Field required", "function-", "Value error", "ctx")


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "rabbitproxy.toml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def errors_of(tmp_path: Path, text: str | bytes) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.load(write(tmp_path, text), env={})
    return info.value.errors


def split(line: str) -> tuple[str, str]:
    """``"key.path: reason"`` into its two parts (a reason may hold ': ' itself)."""
    path, sep, reason = line.partition(": ")
    assert sep, line
    return path, reason


def matches(lines: list[str], expected: list[tuple[str, str]]) -> None:
    """Exactly the expected lines, in any order: each names its key and holds its fragment."""
    assert len(lines) == len(expected), "\n".join(lines)
    for path, fragment in expected:
        found = [line for line in lines if (split(line)[0] == path if path else True) and fragment in line]
        assert found, f"no {path!r} line with {fragment!r} in:\n" + "\n".join(lines)
    for line in lines:
        assert not any(word in line for word in PYDANTIC_WORDS), line


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.id)
def test_every_error_of_a_broken_file_comes_at_once_naming_its_key(tmp_path: Path, case: Case) -> None:
    matches(errors_of(tmp_path, case.text), case.expected)


@pytest.mark.parametrize("case", GOOD, ids=lambda c: c.id)
def test_a_good_file_loads_with_exactly_its_warnings(tmp_path: Path, case: Case) -> None:
    cfg = config_mod.load(write(tmp_path, case.text), env={})
    matches(config_mod.warnings(cfg), case.expected)


def test_the_table_is_as_large_as_the_issue_says() -> None:
    # Issue 26 was found with about 40 files; the table keeps at least that many, and at least one of them has
    # errors in several tables at once.
    assert len(BROKEN) + len(GOOD) >= 40
    assert max(len(c.expected) for c in BROKEN) >= 5


# -- durations ---------------------------------------------------------------------------------------------------------

DURATION_KEYS = [
    ("connect_timeout", lambda s: s.connect_timeout),
    ("shutdown_timeout", lambda s: s.shutdown_timeout),
    ("close_timeout", lambda s: s.close_timeout),
    ("client_hello_timeout", lambda s: s.client_hello_timeout),
    ("client_idle_timeout", lambda s: s.idle_seconds),
    ("slow_start", lambda s: s.slow_start),
    ("health_check.interval", lambda s: s.health_check.interval),
    ("health_check.timeout", lambda s: s.health_check.timeout),
    ("feedback.interval", lambda s: s.feedback.interval),
    ("feedback.timeout", lambda s: s.feedback.timeout),
    ("rabbitmq.interval", lambda s: s.rabbitmq.interval),
    ("rabbitmq.timeout", lambda s: s.rabbitmq.timeout),
    ("rebalance.after", lambda s: s.rebalance.after),
]


def with_key(key: str, value: str) -> str:
    table, _, leaf = key.rpartition(".")
    if not table:
        return in_service(f"{leaf} = {value}")
    if table == "health_check":
        return edit('health_check = { type = "none" }', f'health_check = {{ type = "tcp", {leaf} = {value} }}')
    extra = {"rebalance": ", enabled = true", "feedback": ', type = "agent"'}.get(table, "")
    text = in_service(f"{table} = {{ {leaf} = {value}{extra} }}")
    # The rebalancer needs [services.rabbitmq] to be enabled.
    return text.replace("rebalance = {", "rabbitmq = {}\nrebalance = {")


@pytest.mark.parametrize(("key", "read"), DURATION_KEYS, ids=[k for k, _ in DURATION_KEYS])
@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2", 2.0), ("0.5", 0.5), ('"250ms"', 0.25), ('"5s"', 5.0), ('"2m"', 120.0), ('"1h"', 3600.0)],
)
def test_every_duration_key_takes_seconds_or_a_unit(
    tmp_path: Path, key: str, read: object, value: str, seconds: float
) -> None:
    cfg = config_mod.load(write(tmp_path, with_key(key, value)), env={})
    assert read(cfg.services[0]) == seconds  # type: ignore[operator]


@pytest.mark.parametrize(("key", "read"), DURATION_KEYS, ids=[k for k, _ in DURATION_KEYS])
def test_a_bad_duration_names_the_key_and_shows_the_grammar(tmp_path: Path, key: str, read: object) -> None:
    (line,) = errors_of(tmp_path, with_key(key, '"5 minutes"'))
    assert split(line)[0] == f"{SVC}.{key}", line
    assert GRAMMAR in line


def test_keepalive_takes_whole_seconds_in_any_unit(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, in_service('tcp_keepalive = { idle = "2m", interval = "15s" }')), env={})
    ka = cfg.services[0].tcp_keepalive
    assert ka is not None and (ka.idle, ka.interval) == (120, 15)


# -- reading the file --------------------------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, b"\xef\xbb\xbf" + BASE.encode()), env={})
    assert cfg.services[0].name == "amqp"


def test_undecodable_bytes_are_named_by_offset_and_line(tmp_path: Path) -> None:
    text = BASE.encode()
    offset = text.index(b"r2")
    line_no = text[:offset].count(b"\n") + 1
    (line,) = errors_of(tmp_path, text[:offset] + b"\xff" + text[offset + 1 :])
    assert line == f"not UTF-8: byte 0xff at offset {offset} (line {line_no}); TOML files are UTF-8"


def test_windows_line_ends_read_as_before(tmp_path: Path) -> None:
    assert config_mod.load(write(tmp_path, BASE.replace("\n", "\r\n").encode()), env={}).services[0].name == "amqp"


# -- the admin token comes from the environment serve runs in ----------------------------------------------------------


def test_the_admin_token_may_come_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[admin]\nlisten = "0.0.0.0:9080"\n' + BASE)
    assert config_mod.load(path, env={"RABBITPROXY_ADMIN_TOKEN": "t"}).admin.listen == "0.0.0.0:9080"
    with pytest.raises(ConfigError, match=r"admin\.token: required"):
        config_mod.load(path, env={"RABBITPROXY_ADMIN_TOKEN": ""})


def test_a_disabled_admin_needs_no_token(tmp_path: Path) -> None:
    path = write(tmp_path, '[admin]\nenabled = false\nlisten = "0.0.0.0:9080"\n' + BASE)
    assert not config_mod.load(path, env={}).admin.enabled


def test_a_bracketed_ipv6_backend_is_stored_bare(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, in_r1("").replace('address = "127.0.0.1"', 'address = "[::1]"', 1)), env={})
    assert cfg.services[0].backends[0].address == "::1"

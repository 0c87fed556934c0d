"""``[admin] state_file``: what is saved, how it is written and restored, what a bad file does (issue 26, item 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from rabbitproxy.control import state_file
from rabbitproxy.relay.service import Service
from tests.support.proxy import make_service

BACKENDS = [
    {"name": "r1", "address": "127.0.0.1", "port": 5672, "weight": 100},
    {"name": "r2", "address": "127.0.0.1", "port": 5673, "weight": 50},
    {"name": "r3", "address": "127.0.0.1", "port": 5674},
]


def services(**weights: int) -> dict[str, Service]:
    """A fresh service ``amqp`` as a start would build it; ``weights`` edit the file's weight of a backend."""
    backends = [dict(b, weight=weights.get(str(b["name"]), b.get("weight", 100))) for b in BACKENDS]
    return {"amqp": make_service(backends)}


def changed(svcs: dict[str, Service]) -> None:
    pool = svcs["amqp"].pool.by_name
    pool["r1"].operator_state = "drain"
    pool["r2"].set_weight(7)
    pool["r3"].operator_state = "maint"


def test_only_what_an_operator_changed_is_saved_with_the_file_weight_it_overrode() -> None:
    svcs = services()
    assert state_file.snapshot(svcs) == {"version": 1, "services": {}}
    changed(svcs)
    assert state_file.snapshot(svcs) == {
        "version": 1,
        "services": {
            "amqp": {
                "r1": {"state": "drain"},
                "r2": {"state": "ready", "weight": 7, "file_weight": 50},
                "r3": {"state": "maint"},
            }
        },
    }


def test_a_restart_restores_states_and_weights(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = services()
    changed(before)
    assert state_file.save(path, before)
    after = services()
    state_file.restore(path, after)
    pool = after["amqp"].pool.by_name
    assert [pool[n].operator_state for n in ("r1", "r2", "r3")] == ["drain", "ready", "maint"]
    assert (pool["r2"].configured_weight, pool["r2"].weight_overridden) == (7, True)
    assert not pool["r1"].usable and not pool["r3"].usable
    # Nothing but the file itself is left in the directory: the temporary file was renamed into place.
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_weight_edited_in_the_file_since_the_override_wins(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    before = services()
    changed(before)
    state_file.save(path, before)
    after = services(r2=80)
    with capture_logs() as logs:
        state_file.restore(path, after)
    r2 = after["amqp"].pool.by_name["r2"]
    assert (r2.configured_weight, r2.weight_overridden) == (80, False)
    assert any("file's weight changed" in e["event"] and e["runtime_weight"] == 7 for e in logs)
    # The states are restored all the same.
    assert after["amqp"].pool.by_name["r1"].operator_state == "drain"


def test_backends_no_longer_configured_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    doc = {"version": 1, "services": {"amqp": {"gone": {"state": "drain"}}, "old": {"x": {"state": "maint"}}}}
    path.write_text(json.dumps(doc))
    svcs = services()
    state_file.restore(path, svcs)
    assert all(b.operator_state == "ready" for b in svcs["amqp"].pool.backends)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b'{"version": 99, "services": {}}', "version 1"),
        (b"[]", "version 1"),
        (b'{"version": 1, "services": {"amqp": {"r1": {"state": "asleep"}}}}', "services.amqp.r1: state"),
        (b'{"version": 1, "services": {"amqp": {"r1": {"state": "ready", "weight": 5000, "file_weight": 1}}}}',
         "services.amqp.r1.weight"),
        (b'{"version": 1, "services": {"amqp": {"r1": {"state": "ready", "weight": 5}}}}', "go together"),
        (b'{"version": 1, "services": {"amqp": []}}', "services.amqp: not a table"),
    ],
)  # fmt: skip
def test_a_bad_state_file_is_set_aside_and_the_configuration_applies(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    svcs = services()
    with capture_logs() as logs:
        state_file.restore(path, svcs)
    assert all(b.operator_state == "ready" and not b.weight_overridden for b in svcs["amqp"].pool.backends)
    [event] = [e for e in logs if e["log_level"] == "error"]
    assert event["event"] == "state file ignored: starting from the configuration"
    assert reason in event["reason"]
    assert not path.exists()
    [aside] = list(tmp_path.glob("state.json.bad-*"))
    assert event["moved_to"] == str(aside)
    assert aside.read_bytes() == content


def test_an_unreadable_state_file_does_not_stop_a_start(tmp_path: Path) -> None:
    # A directory where the file should be: reading fails with an OSError, which is reported like a bad file.
    path = tmp_path / "state.json"
    path.mkdir()
    svcs = services()
    with capture_logs() as logs:
        state_file.restore(path, svcs)
    assert any(e["event"] == "state file ignored: starting from the configuration" for e in logs)


def test_no_state_file_yet_is_a_fresh_start(tmp_path: Path) -> None:
    svcs = services()
    with capture_logs() as logs:
        state_file.restore(tmp_path / "state.json", svcs)
    assert [e["event"] for e in logs] == ["no state file yet: starting from the configuration"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "state.json"
    svcs = services()
    changed(svcs)
    state_file.save(path, svcs)
    old = path.read_bytes()
    svcs["amqp"].pool.by_name["r1"].operator_state = "ready"

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_file.os, "fsync", full_disk)
    with capture_logs() as logs:
        assert state_file.save(path, svcs) is False
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert any("No space left" in e.get("error", "") for e in logs)

"""``rabbitproxy --help`` as the pinned typer renders it (issue 26, item 7).

typer 0.29 brought its own copy of click and shows ``<bool>`` after every flag (``--version <bool>``), which reads
as if the flag took a value. pyproject.toml keeps typer below that release; this test notices a version that
renders the help differently.
"""

from __future__ import annotations

import re

from typer.testing import CliRunner

from rabbitproxy.cli import app


def help_text(*args: str) -> str:
    env = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
    res = CliRunner().invoke(app, [*args, "--help"], prog_name="rabbitproxy", env=env)
    assert res.exit_code == 0, res.output
    return res.output


def test_the_top_level_help_lists_flags_without_a_value_placeholder() -> None:
    text = help_text()
    assert "Usage: rabbitproxy [OPTIONS] COMMAND [ARGS]..." in text
    assert re.search(r"--version\s+Print the version and exit\.", text), text
    assert re.search(r"--help\s+Show this message and exit\.", text), text
    assert "<bool>" not in text
    for command in ("serve", "check-config", "status", "reload", "backend", "connections", "healthcheck"):
        assert re.search(rf"│ {re.escape(command)}\s", text), command


def test_the_backend_help_lists_reset_and_the_admin_socket() -> None:
    text = help_text("backend")
    for command in ("drain", "maint", "ready", "weight", "reset"):
        assert re.search(rf"│ {command}\s", text), command
    text = help_text("backend", "drain")
    assert "--force" in text and "<bool>" not in text
    assert "unix:PATH" in text

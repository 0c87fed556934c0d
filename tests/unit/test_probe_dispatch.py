"""The cheap `rabbitproxy healthcheck` path: the dispatcher's option parsing agrees with typer's, and the stdlib
reading of the `[admin]` table agrees with the pydantic configuration `serve` loads. No sockets: the probe itself is
replaced where a test would otherwise make a request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from rabbitproxy import cli
from rabbitproxy.admin import probe
from rabbitproxy.cli import parse_healthcheck
from rabbitproxy.cli.commands import app
from rabbitproxy.config import ConfigError, load, load_admin

SERVICES = '\n[[services]]\nname = "amqp"\n[[services.backends]]\nname = "r1"\naddress = "127.0.0.1"\n'


def test_the_fast_parser_knows_exactly_the_typer_options() -> None:
    group = typer.main.get_command(app)
    command = group.commands["healthcheck"]  # type: ignore[attr-defined]
    declared = {opt for param in command.params for opt in param.opts if opt != "--help"}
    assert declared == set(cli._VALUE_OPTIONS) | set(cli._FLAG_OPTIONS)


def _typer_parse(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...] | None:
    """What the typer command hands to probe.run for ``args``, or None if typer refuses them."""
    seen: list[tuple[Any, ...]] = []

    def fake_run(admin: str | None, config: Path | None, timeout: float, quiet: bool, _env: object) -> probe.Outcome:
        seen.append((admin, config, timeout, quiet))
        return probe.Outcome(0, "", False)

    monkeypatch.setattr(probe, "run", fake_run)
    clean: dict[str, str | None] = {"RABBITPROXY_ADMIN": None, "RABBITPROXY_CONFIG": None}
    result = CliRunner().invoke(app, ["healthcheck", *args], env=clean | env)
    if result.exit_code != 0:
        return None
    return seen[0]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], {}),
        (["--admin", "10.0.0.1:9080"], {}),
        (["--admin=http://h:1/x", "-q"], {}),
        (["--admin", "-q"], {}),
        (["--admin", ""], {"RABBITPROXY_ADMIN": "10.9.9.9:1"}),
        (["-c", "/tmp/x.toml", "--timeout", "0.5"], {}),
        (["--config=/tmp/x.toml", "--timeout=2", "--quiet", "--quiet"], {}),
        (["--timeout", "1e3", "--admin", "a:1", "--admin", "b:2"], {}),
        ([], {"RABBITPROXY_ADMIN": "10.1.1.1:1", "RABBITPROXY_CONFIG": "/etc/x.toml"}),
        ([], {"RABBITPROXY_ADMIN": "", "RABBITPROXY_CONFIG": ""}),
        (["--admin", "x:1", "-c", "/y.toml"], {"RABBITPROXY_ADMIN": "10.1.1.1:1", "RABBITPROXY_CONFIG": "/e.toml"}),
    ],
)
def test_plain_forms_parse_as_typer_parses_them(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = parse_healthcheck(args, env)
    assert fast is not None
    # The fast path hands probe.run the path as given, typer a Path; the probe opens and shows either alike.
    config = Path(fast.config) if fast.config is not None else None
    assert (fast.admin, config, fast.timeout, fast.quiet) == _typer_parse(args, env, monkeypatch)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--admin"],
        ["--bogus"],
        ["extra"],
        ["-qc", "/x.toml"],
        ["-cx.toml"],
        ["--quiet=yes"],
        ["--timeout", "0.01"],
        ["--timeout", "soon"],
        ["--timeout", "nan"],
        ["--adm", "x:1"],
    ],
)
def test_anything_else_is_left_to_typer(args: list[str]) -> None:
    assert parse_healthcheck(args, {}) is None


def test_main_answers_healthcheck_without_the_typer_app(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(probe, "check", lambda url, timeout: probe.HealthResult(True, f"{url}: ok"))
    monkeypatch.delenv("RABBITPROXY_CONFIG", raising=False)
    monkeypatch.delenv("RABBITPROXY_ADMIN", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main(["healthcheck", "--admin", "127.0.0.1:9"])
    assert info.value.code == 0
    assert capsys.readouterr().out == "healthy: http://127.0.0.1:9/healthz: ok\n"


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["--version"])
    assert capsys.readouterr().out.startswith("rabbitproxy ")


def _file(tmp_path: Path, admin: str) -> Path:
    p = tmp_path / "rabbitproxy.toml"
    p.write_text(admin + SERVICES)
    return p


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        ("", (True, "127.0.0.1:9080")),
        ('[admin]\nlisten = "0.0.0.0:9999"\ntoken = "s"\n', (True, "0.0.0.0:9999")),
        ("[admin]\nenabled = false\n", (False, "127.0.0.1:9080")),
        ('[admin]\nenabled = false\nlisten = "[::1]:9081"\n', (False, "[::1]:9081")),
        # Forms the probe's own scanner leaves to tomllib (rabbitproxy.admin.tomlscan).
        ('[admin]\nlisten = """0.0.0.0:9999"""\n', (True, "0.0.0.0:9999")),
        ('admin = { listen = "127.0.0.1:\\u0039998", enabled = false }\n', (False, "127.0.0.1:9998")),
        ("admin.listen = '127.0.0.1:9997'\n", (True, "127.0.0.1:9997")),
    ],
)
def test_admin_table_agrees_with_serve(tmp_path: Path, admin: str, expected: tuple[bool, str]) -> None:
    path = _file(tmp_path, admin)
    assert probe.admin_settings(path) == expected
    cfg = load_admin(path)
    assert (cfg.enabled, cfg.listen) == expected


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ('[admin]\nlisten = "127.0.0.1"\n', "admin.listen: '127.0.0.1': missing ':port'"),
        ("[admin]\nlisten = 9080\n", "admin.listen: must be a string (in quotes), not 9080"),
        # A quoted boolean is refused by serve (strict types), so the probe refuses it too.
        ('[admin]\nenabled = "false"\n', "admin.enabled: must be true or false, not the string 'false'"),
        ('[admin]\nlisen = "127.0.0.1:9080"\n', "admin.lisen: unknown key"),
        ("[admin]\nenabled = 3\n", "admin.enabled:"),
        ('admin = "127.0.0.1:9080"\n', "admin: must be a table, not '127.0.0.1:9080'"),
        ("[admin\n", "TOML syntax"),
    ],
)
def test_a_bad_admin_table_is_the_error_serve_gives(tmp_path: Path, admin: str, message: str) -> None:
    path = _file(tmp_path, admin)
    with pytest.raises(probe.AdminConfigError) as info:
        probe.admin_settings(path)
    # The whole-file loader serve uses reports the same lines for the same table.
    with pytest.raises(ConfigError) as full:
        load(path)
    assert message in str(info.value)
    assert str(info.value) == str(full.value)


def test_run_reports_config_problems_with_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    outcome = probe.run(None, missing, 1.0, True, {})
    assert (outcome.code, outcome.to_stderr) == (2, True)
    assert outcome.message.startswith(f"{missing}: invalid configuration:\n  cannot read the file:")

    outcome = probe.run("ftp://127.0.0.1:9080", None, 1.0, True, {})
    assert (outcome.code, outcome.message) == (
        2,
        "invalid configuration:\n  --admin: 'ftp://127.0.0.1:9080': the admin URL must start with http:// or https://",
    )


def test_a_config_that_is_not_utf8_is_exit_2_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "rabbitproxy.toml"
    data = b'[admin]\nlisten = "127.0.0.1:9080" # caf\xe9\n'
    path.write_bytes(data)
    outcome = probe.run(None, path, 1.0, True, {})
    assert (outcome.code, outcome.to_stderr) == (2, True)
    # The offset counts from 0, as a hex dump or ``cmp`` shows it.
    at = data.index(0xE9)
    assert outcome.message == (
        f"{path}: invalid configuration:\n  not UTF-8: byte 0xe9 at offset {at} (line 2); TOML files are UTF-8"
    )


def test_run_with_the_admin_api_disabled_probes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "check", lambda url, timeout: pytest.fail("must not probe"))
    path = _file(tmp_path, "[admin]\nenabled = false\n")
    outcome = probe.run(None, path, 1.0, False, {})
    assert (outcome.code, outcome.to_stderr) == (1, True)
    assert outcome.message == f"{path}: the admin API is disabled (admin.enabled = false); nothing to probe"


def test_run_names_a_str_path_as_typer_names_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast dispatcher hands probe.run the --config text as given; the message shows it as a Path would.
    monkeypatch.setattr(probe, "check", lambda url, timeout: pytest.fail("must not probe"))
    path = _file(tmp_path, "[admin]\nenabled = false\n")
    given = f"{tmp_path}//./{path.name}"
    outcome = probe.run(None, given, 1.0, False, {})
    assert outcome.message == f"{path}: the admin API is disabled (admin.enabled = false); nothing to probe"


def test_an_empty_config_path_is_the_current_directory_as_before() -> None:
    # typer hands over Path("") (the current directory); the fast dispatcher hands over "", which must read alike.
    fast, typer_path = probe.run(None, "", 1.0, True, {}), probe.run(None, Path(""), 1.0, True, {})
    assert (fast.code, fast.message) == (typer_path.code, typer_path.message)
    assert fast.code == 2


def test_run_quiet_prints_nothing_and_passes_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float]] = []

    def fake_check(url: str, timeout: float) -> probe.HealthResult:
        calls.append((url, timeout))
        return probe.HealthResult(False, f"{url}: no answer within {timeout:g}s")

    monkeypatch.setattr(probe, "check", fake_check)
    outcome = probe.run(None, None, 0.25, True, {"RABBITPROXY_ADMIN_LISTEN": "0.0.0.0:9123"})
    assert (outcome.code, outcome.message) == (1, "")
    assert calls == [("http://127.0.0.1:9123/healthz", 0.25)]

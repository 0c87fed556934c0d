"""The command line: check-config output and exit codes, flag handling, --version."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rabbitproxy import __version__
from rabbitproxy.cli import app, build_config
from rabbitproxy.config import ConfigError

runner = CliRunner()

CONFIG = """
[[services]]
name = "amqp"
listen = "127.0.0.1:5672"

  [[services.backends]]
  name = "rabbit1"
  address = "10.0.0.10"
"""


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"rabbitproxy {__version__}"


def test_check_config_ok_prints_a_summary(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(CONFIG)
    result = runner.invoke(app, ["check-config", str(p)])
    assert result.exit_code == 0, result.output
    assert "service amqp: listen 127.0.0.1:5672" in result.stdout
    assert "rabbit1: 10.0.0.10:5672 weight 100" in result.stdout


def test_check_config_bad_exits_2_naming_the_key(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(CONFIG.replace('address = "10.0.0.10"', 'address = "10.0.0.10"\n  wieght = 3'))
    result = runner.invoke(app, ["check-config", str(p)])
    assert result.exit_code == 2
    assert "services['amqp'].backends['rabbit1'].wieght: unknown key" in result.stderr


def test_flags_build_a_service_without_a_file() -> None:
    cfg = build_config(None, "0.0.0.0:5672", ["10.0.0.10", "10.0.0.11:5673=200"], {}, env={})
    (svc,) = cfg.services
    assert [(b.address, svc.backend_port(b), b.weight) for b in svc.backends] == [
        ("10.0.0.10", 5672, 100),
        ("10.0.0.11", 5673, 200),
    ]


def test_flags_override_only_what_was_passed(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(CONFIG.replace("[[services]]", '[log]\nformat = "json"\n\n[[services]]'))
    cfg = build_config(p, None, ["10.9.9.9"], {"log.level": "debug"})
    assert cfg.log.format == "json" and cfg.log.level == "debug"
    assert cfg.services[0].listen == "127.0.0.1:5672"
    assert [b.address for b in cfg.services[0].backends] == ["10.9.9.9"]


def test_no_config_no_backends_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="give --config FILE"):
        build_config(None, None, None, {}, env={})


def test_serve_with_a_bad_flag_exits_2() -> None:
    result = runner.invoke(app, ["serve", "--backend", "h=heavy"])
    assert result.exit_code == 2
    assert "--backend" in result.stderr


def test_check_config_refuses_a_backend_address_that_cannot_be_a_host_name(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(CONFIG.replace('address = "10.0.0.10"', 'address = "rabbit1..example.com"'))
    result = runner.invoke(app, ["check-config", str(p)])
    assert result.exit_code == 2
    assert "services['amqp'].backends['rabbit1'].address: 'rabbit1..example.com' is not a valid host name" in (
        result.stderr
    )


# Switches written as ``false`` in TOML that the models store as None: serve re-validates the file's settings after
# merging the flags, so each must survive that second pass (tcp_keepalive = false once made serve refuse the file).
ROUND_TRIP = CONFIG.replace(
    'listen = "127.0.0.1:5672"',
    'listen = "127.0.0.1:5672"\ntcp_keepalive = false\nclient_idle_timeout = "auto"\nprotocol = "tcp"',
)


@pytest.mark.parametrize(
    "text",
    [ROUND_TRIP, *(p.read_text() for p in sorted((Path(__file__).parents[2] / "examples").rglob("*.toml")))],
)
def test_serve_reads_a_file_as_check_config_does(tmp_path: Path, text: str) -> None:
    from rabbitproxy import config as config_mod

    p = tmp_path / "c.toml"
    p.write_text(text)
    # The examples' admin API is not on loopback: their deployments give the token in the environment.
    env = {"RABBITPROXY_ADMIN_TOKEN": "t"}
    assert build_config(p, None, None, {}, env=env) == config_mod.load(p, env=env)


# -- check-config is serve's judge (issue 26) ------------------------------------------------------------------------


def test_check_config_prints_warnings_on_stderr_and_exits_0(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(CONFIG.replace('address = "10.0.0.10"', 'address = "10.0.0.10"\n  backup = true'))
    result = runner.invoke(app, ["check-config", str(p)])
    assert result.exit_code == 0, result.output
    assert (
        result.stderr == "warning: services['amqp'].backends: every backend is a backup: with no primary to prefer,"
        " all serve all the time\n"
    )
    assert f"{p}: OK" in result.stdout and "warning" not in result.stdout


def test_check_config_reports_every_error_at_once_and_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        "workers = 0\n"
        + CONFIG.replace('address = "10.0.0.10"', 'address = "010.0.0.10"\n  port = "5672"\n  backup = "on"').replace(
            'listen = "127.0.0.1:5672"', 'listen = ":::5674"\nconnect_timeout = "5 seconds"'
        )
    )
    result = runner.invoke(app, ["check-config", str(p)], env={"RABBITPROXY_ADMIN_TOKEN": ""})
    assert result.exit_code == 2
    lines = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert sorted(line.partition(": ")[0] for line in lines) == [
        "services['amqp'].backends['rabbit1'].address",
        "services['amqp'].backends['rabbit1'].backup",
        "services['amqp'].backends['rabbit1'].port",
        "services['amqp'].connect_timeout",
        "services['amqp'].listen",
        "workers",
    ]
    assert result.stdout == ""


def test_check_config_takes_the_admin_token_from_the_environment_as_serve_does(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[admin]\nlisten = "0.0.0.0:9080"\n' + CONFIG)
    refused = runner.invoke(app, ["check-config", str(p)], env={"RABBITPROXY_ADMIN_TOKEN": ""})
    assert refused.exit_code == 2
    assert "admin.token: required because admin.listen (0.0.0.0:9080) is not a loopback address" in refused.stderr
    served = runner.invoke(app, ["serve", "-c", str(p)], env={"RABBITPROXY_ADMIN_TOKEN": ""})
    assert (served.exit_code, served.stderr) == (2, refused.stderr)
    assert runner.invoke(app, ["check-config", str(p)], env={"RABBITPROXY_ADMIN_TOKEN": "t"}).exit_code == 0


def test_check_config_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b"\xef\xbb\xbf" + CONFIG.encode())
    result = runner.invoke(app, ["check-config", str(p)])
    assert result.exit_code == 0, result.output


def test_undecodable_bytes_exit_2_naming_the_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rabbitproxy.cli import main

    p = tmp_path / "c.toml"
    p.write_bytes(b"# caf\xe9\n" + CONFIG.encode())
    result = runner.invoke(app, ["check-config", str(p)])
    assert result.exit_code == 2
    assert "not UTF-8: byte 0xe9 at offset 5 (line 1)" in result.stderr
    # healthcheck -c reads the same file the same way (rabbitproxy.config.read_toml), before asking anything.
    with pytest.raises(SystemExit) as info:
        main(["healthcheck", "-c", str(p)])
    assert info.value.code == 2
    assert "not UTF-8: byte 0xe9 at offset 5 (line 1)" in capsys.readouterr().err


def test_healthcheck_reads_a_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    from rabbitproxy.admin import probe

    p = tmp_path / "c.toml"
    p.write_bytes(b'\xef\xbb\xbf[admin]\nlisten = "127.0.0.1:9999"\n')
    assert probe.admin_settings(p) == (True, "127.0.0.1:9999")

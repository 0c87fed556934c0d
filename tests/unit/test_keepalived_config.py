"""``rabbitproxy keepalived-config``: the keepalived.conf of one side of a pair, checked as text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rabbitproxy.admin.keepalived import KeepalivedSide, healthcheck_command, render, validate
from rabbitproxy.cli import app

GOLDEN = """\
# keepalived.conf for one side of a rabbitproxy pair, written by `rabbitproxy keepalived-config`.
# Both sides run state BACKUP; the higher priority wins the first election; nopreempt then keeps the VIP in place.

global_defs {
    enable_script_security
    script_user nobody
    max_auto_priority
}

vrrp_script rabbitproxy_healthy {
    script "/opt/rabbitproxy/bin/rabbitproxy healthcheck --quiet --timeout 2"
    interval 1
    timeout 30
    fall 1
    rise 2
}

vrrp_instance rabbitproxy {
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority 110
    advert_int 1
    nopreempt
    unicast_src_ip 10.0.0.11
    unicast_peer {
        10.0.0.12
    }
    authentication {
        auth_type PASS
        auth_pass s3cret
    }
    virtual_ipaddress {
        10.0.0.100/24 dev eth0
    }
    track_script {
        rabbitproxy_healthy
    }
    notify "/usr/bin/logger -t rabbitproxy-vrrp"
}
"""


def side(**changes: object) -> KeepalivedSide:
    base: dict[str, object] = {
        "vip": "10.0.0.100/24",
        "interface": "eth0",
        "peers": ["10.0.0.12"],
        "priority": 110,
        "password": "s3cret",
        "source": "10.0.0.11",
        "rabbitproxy": "/opt/rabbitproxy/bin/rabbitproxy",
    }
    base.update(changes)
    return KeepalivedSide(**base)  # type: ignore[arg-type]


def blocks(text: str) -> dict[str, str]:
    """Top-level blocks by their header line (``vrrp_instance rabbitproxy``), each with its body."""
    found = re.finditer(r"^(\S[^{\n]*)\{\n(.*?)^\}", text, re.DOTALL | re.MULTILINE)
    return {m.group(1).strip(): m.group(2) for m in found}


def test_golden_text() -> None:
    assert render(side()) == GOLDEN


def test_both_sides_start_as_backup_with_nopreempt_and_differ_only_where_they_must() -> None:
    a = render(side())
    b = render(side(priority=100, source="10.0.0.12", peers=["10.0.0.11"]))
    for text in (a, b):
        inst = blocks(text)["vrrp_instance rabbitproxy"]
        # keepalived ignores nopreempt on an instance that starts as MASTER.
        assert "state BACKUP" in inst
        assert "nopreempt" in inst
    diff = [(x, y) for x, y in zip(a.splitlines(), b.splitlines(), strict=True) if x != y]
    assert diff == [
        ("    priority 110", "    priority 100"),
        ("    unicast_src_ip 10.0.0.11", "    unicast_src_ip 10.0.0.12"),
        ("        10.0.0.12", "        10.0.0.11"),
    ]


def test_preempt_and_optional_parts() -> None:
    text = render(side(preempt=True, password=None, source=None, notify=None, peers=["10.0.0.12", "10.0.0.13"]))
    inst = blocks(text)["vrrp_instance rabbitproxy"]
    assert "nopreempt" not in inst
    assert "authentication" not in inst
    assert "unicast_src_ip" not in inst
    assert "notify" not in inst
    assert "unicast_peer {\n        10.0.0.12\n        10.0.0.13\n    }" in inst


def test_track_script_probes_healthz_through_rabbitproxy_healthcheck() -> None:
    s = side(admin="http://127.0.0.1:9081", config="/etc/rabbitproxy/rabbitproxy.toml", probe_timeout=1.5)
    script = blocks(render(s))["vrrp_script rabbitproxy_healthy"]
    cmd = healthcheck_command(s)
    assert f'script "{cmd}"' in script
    assert cmd == (
        "/opt/rabbitproxy/bin/rabbitproxy healthcheck --quiet --timeout 1.5 --admin http://127.0.0.1:9081 "
        "--config /etc/rabbitproxy/rabbitproxy.toml"
    )
    # keepalived's own timeout is far longer: a probe slowed by a busy host must not count as a dead proxy.
    assert "    timeout 30\n" in script


def test_health_file_is_tracked_with_weight_0() -> None:
    text = render(side(health_file="/run/rabbitproxy/health"))
    found = blocks(text)
    assert found["track_file rabbitproxy_health_file"] == '    file "/run/rabbitproxy/health"\n    weight 0\n'
    assert "    track_file {\n        rabbitproxy_health_file\n    }\n" in found["vrrp_instance rabbitproxy"]
    assert "track_file" not in render(side())


def test_ipv6_vip() -> None:
    text = render(side(vip="2001:db8::10/64", peers=["2001:db8::12"], source="2001:db8::11", interface="ens3"))
    assert "        2001:db8::10/64 dev ens3\n" in text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vip": "10.0.0.300/24"}, "--vip: '10.0.0.300/24' is not an address"),
        ({"interface": "eth0 dev lo"}, "--interface: 'eth0 dev lo' is not an interface name"),
        ({"peers": []}, "--peer: give the other proxy's address"),
        ({"peers": ["2001:db8::1"]}, "--peer: 2001:db8::1 is IPv6 but the VIP is IPv4"),
        ({"peers": ["10.0.0.100"]}, "--peer: 10.0.0.100 is the VIP itself"),
        ({"source": "10.0.0.12"}, "--source: 10.0.0.12 is also given as a --peer"),
        ({"priority": 255}, "--priority: 255 is not in 1..254"),
        ({"router_id": 0}, "--router-id: 0 is not in 1..255"),
        ({"password": "123456789"}, "--password: must be 1 to 8 bytes"),
        ({"password": 'a"b'}, "--password: must not contain"),
        ({"fall": 0}, "--fall: 0 is not in 1..100"),
        ({"probe_timeout": 30.0}, "--probe-timeout: 30 must be shorter than --check-timeout (30)"),
        ({"rabbitproxy": "rabbitproxy"}, "--rabbitproxy: 'rabbitproxy' must be an absolute path"),
        ({"admin": 'x" ; evil'}, "--admin: 'x\" ; evil' must be non-empty"),
        ({"notify": "/bin/sh -c 'x'"}, "--notify: \"/bin/sh -c 'x'\" must be non-empty"),
        ({"instance": "a b"}, "--instance: 'a b' may contain only"),
        ({"health_file": "run/health"}, "--health-file: 'run/health' must be an absolute path"),
    ],
)
def test_invalid_input_is_refused_naming_the_option(changes: dict[str, object], message: str) -> None:
    problems = validate(side(**changes))
    assert any(p.startswith(message) for p in problems), problems
    with pytest.raises(ValueError, match=re.escape(message)):
        render(side(**changes))


def test_cli_prints_the_config_and_exits_2_on_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    probe = tmp_path / "rabbitproxy"
    probe.write_text("#!/bin/sh\n")
    probe.chmod(0o755)
    args = ["keepalived-config", "--vip", "10.0.0.100/24", "--interface", "eth0", "--peer", "10.0.0.12"]
    given = ["--priority", "110", "--password", "s3cret", "--source", "10.0.0.11", "--rabbitproxy", str(probe)]
    result = runner.invoke(app, [*args, *given])
    assert result.exit_code == 0, result.output
    assert result.stdout == GOLDEN.replace("/opt/rabbitproxy/bin/rabbitproxy", str(probe))
    result = runner.invoke(app, [*args, "--priority", "0", "--rabbitproxy", "/x/rabbitproxy", "--notify", ""])
    assert result.exit_code == 2
    assert "--priority: 0 is not in 1..254" in result.stderr
    # keepalived silently disables a track script it cannot find, and then never gives up the VIP.
    result = runner.invoke(app, [*args, "--priority", "110", "--rabbitproxy", "/nonexistent/rabbitproxy"])
    assert result.exit_code == 2
    assert "--rabbitproxy: /nonexistent/rabbitproxy is not an executable here" in result.stderr


def test_the_configuration_shown_in_deployment_md_is_what_the_command_prints() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    shown = doc.split("   which writes:\n\n   ```\n", 1)[1].split("   ```\n", 1)[0]
    printed = render(
        side(
            vip="192.0.2.10/24",
            source="192.0.2.11",
            peers=["192.0.2.12"],
            priority=200,
            password="Ch4ngeMe",
            health_file="/run/rabbitproxy/health",
            script_user="nobody",
        )
    )
    assert shown == "".join(f"   {line}\n" if line else "\n" for line in printed.splitlines())

"""examples/systemd/rabbitproxy.service: valid for systemd, sized and hardened as documented, and its commands work.

This machine (like CI's) does not run systemd as PID 1, so the unit cannot be started for real. Instead
``systemd-analyze verify`` checks it (on a copy whose commands point at this checkout's ``rabbitproxy``: verify
refuses a command that does not exist), and the unit's own command lines are run the way systemd runs them for
``start``, ``reload`` and ``stop``: ExecStartPre, then ExecStart with a ``NOTIFY_SOCKET`` until READY=1, ExecReload
with ``$MAINPID``, then KillSignal within TimeoutStopSec. The sandboxing lines are only checked by verify.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from rabbitproxy.config import ServiceConfig
from tests.support.net import free_port
from tests.support.process import to_toml
from tests.support.proxy import proxy_config, service_config
from tests.support.waiting import wait_for_sync

UNIT = Path(__file__).resolve().parents[2] / "examples" / "systemd" / "rabbitproxy.service"
INSTALLED = "/opt/rabbitproxy/bin/rabbitproxy"
CONFIG = "/etc/rabbitproxy/rabbitproxy.toml"
SOCKET = "/run/rabbitproxy/admin.sock"
RABBITPROXY = str(Path(sys.executable).parent / "rabbitproxy")


def settings(text: str) -> dict[str, list[str]]:
    """The [Service] section's keys, each with all its values in order (ExecReload= may be given twice)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def one(s: dict[str, list[str]], key: str) -> str:
    assert len(s.get(key, [])) == 1, f"{key}: {s.get(key)}"
    return s[key][0]


def local_copy(tmp_path: Path, text: str, name: str = "rabbitproxy.service") -> Path:
    path = tmp_path / name
    path.write_text(text.replace(INSTALLED, RABBITPROXY))
    return path


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, timeout=60, check=False, cwd=unit.parent,
    )  # fmt: skip


def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path) -> None:
    text = UNIT.read_text()
    done = verify(local_copy(tmp_path, text))
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")
    # verify only warns, exit 0, about a setting it cannot parse: that is why the output above must be empty.
    # Shown on a copy with a misspelt value, so this test would notice a verify that says nothing at all.
    broken = verify(local_copy(tmp_path, text.replace("ProtectSystem=strict", "ProtectSystem=stric"), "broken.service"))
    assert "Failed to parse protect system value" in broken.stderr


def test_the_unit_is_sized_and_hardened_as_documented() -> None:
    text = UNIT.read_text()
    s = settings(text)
    defaults = ServiceConfig.model_validate({"name": "x", "backends": [{"name": "b", "address": "127.0.0.1"}]})
    assert one(s, "Type") == "notify"
    # Reload through the CLI, which waits for the outcome (not kill -HUP, which succeeds whatever the proxy does).
    assert s["ExecReload"] == [f"{INSTALLED} reload --admin unix:{SOCKET}"]
    assert one(s, "RuntimeDirectory") == "rabbitproxy" and SOCKET.startswith("/run/rabbitproxy/")
    assert one(s, "StateDirectory") == "rabbitproxy"
    assert f'#   socket = "{SOCKET}"' in text and '#   state_file = "/var/lib/rabbitproxy/state.json"' in text
    assert int(one(s, "WatchdogSec")) >= 10
    # The drain (shutdown_timeout) and the last flushes (close_timeout) must fit before systemd kills the process.
    assert int(one(s, "TimeoutStopSec")) > defaults.shutdown_timeout + defaults.close_timeout
    # Two descriptors per connection at the default max_connections, plus at least a fifth more of headroom.
    assert int(one(s, "LimitNOFILE")) >= 2 * defaults.max_connections * 1.2
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    }.items():
        assert one(s, key) == value, key
    # The transparent-mode variant is there, commented out, and adds exactly CAP_NET_ADMIN.
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert f"#{key}=CAP_NET_BIND_SERVICE CAP_NET_ADMIN\n" in text


def command(line: str, config: Path, pid: int | None = None) -> list[str]:
    """A unit's command line as this machine can run it: our rabbitproxy, the test's config and admin socket (beside
    the config), systemd's $MAINPID."""
    line = line.replace(INSTALLED, RABBITPROXY).replace(CONFIG, str(config))
    line = line.replace(SOCKET, str(config.parent / "admin.sock"))
    if pid is not None:
        line = line.replace("$MAINPID", str(pid))
    return shlex.split(line)


def test_start_reload_and_stop_with_the_units_own_commands(tmp_path: Path) -> None:
    s = settings(UNIT.read_text())
    config = tmp_path / "rabbitproxy.toml"
    backend = {"name": "b", "address": "127.0.0.1", "port": free_port()}
    admin = {"listen": f"127.0.0.1:{free_port()}", "socket": str(tmp_path / "admin.sock")}
    data = proxy_config(service_config([backend]), admin=admin)
    config.write_text(to_toml(data))

    for line in s["ExecStartPre"]:
        subprocess.run(command(line, config), check=True, capture_output=True, timeout=60)
    log_path = tmp_path / "journal"
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log_path.open("wb") as journal:
        notify.bind(str(notify_path))
        notify.settimeout(0.2)

        def notified(state: str) -> bool:
            try:
                return notify.recv(256).startswith(state.encode())
            except TimeoutError:
                return False

        # As systemd sets them for WatchdogSec=.
        watchdog_usec = str(int(one(s, "WatchdogSec")) * 1_000_000)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC=watchdog_usec)
        proc = subprocess.Popen(command(one(s, "ExecStart"), config), stdout=journal, stderr=journal, env=env)
        try:
            wait_for_sync(lambda: notified("READY=1"), timeout=60, what="READY=1")

            def events() -> list[str]:
                return [json.loads(line)["event"] for line in log_path.read_text().splitlines() if line.startswith("{")]

            # Reload as "systemctl reload" would: every ExecReload line in order, the last one with $MAINPID.
            data["services"][0]["backends"][0]["weight"] = 7
            config.write_text(to_toml(data))
            for line in s["ExecReload"]:
                subprocess.run(command(line, config, proc.pid), check=True, capture_output=True, timeout=60)
            wait_for_sync(lambda: "configuration reloaded" in events(), timeout=30, what="the reload in the log")
            # The watchdog's keep-alive arrives with the STATUS= line.
            wait_for_sync(lambda: notified("WATCHDOG=1\nSTATUS=1 service(s)"), timeout=60, what="WATCHDOG=1")

            # A reload the proxy refuses (a port in use) fails "systemctl reload", with the reason.
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = f"127.0.0.1:{taken.getsockname()[1]}"
                refused = dict(data, services=[*data["services"], service_config([backend], name="b2", listen=busy)])
                config.write_text(to_toml(refused))
                [line] = s["ExecReload"]
                done = subprocess.run(command(line, config, proc.pid), capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, done.stdout + done.stderr
            assert f"services['b2'].listen: cannot listen on {busy}" in done.stderr

            # Stop as "systemctl stop" would: KillSignal, then at most TimeoutStopSec.
            proc.send_signal(getattr(signal, one(s, "KillSignal")))
            assert proc.wait(float(one(s, "TimeoutStopSec"))) == 0
            wait_for_sync(lambda: notified("STOPPING=1"), timeout=5, what="STOPPING=1")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

"""The shipped example configs pass the real `rabbitproxy check-config` command, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.examples import compose_proxy_config_path, load_compose, load_kubernetes


def check_config(path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "rabbitproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_compose_config_passes_check_config() -> None:
    assert "amqp: listen 0.0.0.0:5672" in check_config(compose_proxy_config_path(load_compose()))


def test_kubernetes_config_passes_check_config(tmp_path: Path) -> None:
    path = tmp_path / "rabbitproxy.toml"
    path.write_text(load_kubernetes()["ConfigMap"]["data"]["rabbitproxy.toml"])
    assert "3 backend(s)" in check_config(path)

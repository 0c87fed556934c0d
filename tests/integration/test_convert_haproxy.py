"""convert-haproxy end to end: HAProxy 2.6 accepts each input (``haproxy -c``), ``check-config`` each output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.haproxy_configs import bench_configs, hand_configs

REPO = Path(__file__).resolve().parents[2]
NAMES = ["full", "weights", "lbo-layer7", "lbo-two-vips", "bench", "bench-tuned", "faults"]


def rabbitproxy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITPROXY_")} | {"PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "rabbitproxy", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.mark.parametrize("name", NAMES)
def test_haproxy_accepts_the_input_and_check_config_the_output(tmp_path: Path, name: str) -> None:
    text = {**hand_configs(tmp_path), **bench_configs(tmp_path)}[name]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    out = tmp_path / "rabbitproxy.toml"
    converted = rabbitproxy("convert-haproxy", str(cfg), "--output", str(out))
    assert converted.returncode == 0, converted.stderr
    # Every line on stderr is a file:line warning, then the summary.
    *warnings, summary = converted.stderr.splitlines()
    assert all(w.startswith(f"{cfg}:") for w in warnings)
    assert summary.startswith("converted ")

    checked = rabbitproxy("check-config", str(out))
    assert checked.returncode == 0, checked.stderr
    assert f"{out}: OK" in checked.stdout

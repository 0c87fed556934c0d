"""check-config is serve's judge: the real commands, run as a user runs them, agree on every file (issue 26).

Every broken file of the table (tests/support/config_files.py) is refused by both with exit 2 and the same lines;
every good one, and every shipped example, passes check-config and then starts ``rabbitproxy serve`` (on free
loopback ports instead of its own). The examples get the admin token their deployments put in the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.config_files import BROKEN, GOOD, Case
from tests.support.examples import compose_proxy_config_path, load_compose, load_kubernetes
from tests.support.net import free_port
from tests.support.process import ProxyProcess

# What the compose file and the Kubernetes Deployment give the proxy (a Secret's value there).
TOKEN_ENV = {"RABBITPROXY_ADMIN_TOKEN": "example-token"}


def rabbitproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitproxy", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "RABBITPROXY_ADMIN_TOKEN"} | (env or {}),
    )


def check_config(path: Path, env: dict[str, str] | None = None) -> str:
    proc = rabbitproxy("check-config", str(path), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def serves(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> str:
    """``rabbitproxy serve`` starts (READY=1) on the file, moved to free loopback ports, then stops cleanly; its log."""
    data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    for service in data["services"]:
        service["listen"] = f"127.0.0.1:{free_port()}"
    data.setdefault("admin", {})["listen"] = f"127.0.0.1:{free_port()}"
    # ProxyProcess passes this process's environment on.
    monkeypatch.delenv("RABBITPROXY_ADMIN_TOKEN", raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    proc = ProxyProcess(data, tmp_path, log_level="warning")
    with proc:
        pass
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()
    return proc.log()


def test_compose_config_passes_check_config_and_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = compose_proxy_config_path(load_compose())
    assert "amqp: listen 0.0.0.0:5672" in check_config(path, TOKEN_ENV)
    serves(path, tmp_path, monkeypatch, TOKEN_ENV)


def test_kubernetes_config_passes_check_config_and_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rabbitproxy.toml"
    path.write_text(load_kubernetes()["ConfigMap"]["data"]["rabbitproxy.toml"])
    assert "3 backend(s)" in check_config(path, TOKEN_ENV)
    serves(path, tmp_path, monkeypatch, TOKEN_ENV)


def test_without_the_token_both_refuse_the_examples(tmp_path: Path) -> None:
    path = compose_proxy_config_path(load_compose())
    checked, served = rabbitproxy("check-config", str(path)), rabbitproxy("serve", "-c", str(path))
    assert (checked.returncode, served.returncode) == (2, 2)
    assert "admin.token: required" in checked.stderr
    assert checked.stderr == served.stderr


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.id)
def test_serve_refuses_what_check_config_refuses_with_the_same_words(tmp_path: Path, case: Case) -> None:
    path = tmp_path / "rabbitproxy.toml"
    path.write_text(case.text)
    checked, served = rabbitproxy("check-config", str(path)), rabbitproxy("serve", "-c", str(path), "--loop", "asyncio")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert served.returncode == 2, served.stdout + served.stderr
    assert checked.stderr == served.stderr
    assert len(checked.stderr.splitlines()) == 1 + len(case.expected), checked.stderr
    assert "Traceback" not in checked.stderr + served.stderr


@pytest.mark.parametrize("case", GOOD, ids=lambda c: c.id)
def test_serve_starts_on_what_check_config_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    path = tmp_path / "c.toml"
    path.write_text(case.text)
    proc = rabbitproxy("check-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("warning: ")]) == len(case.expected)
    # serve logs the same warnings.
    assert serves(path, tmp_path, monkeypatch).count("configuration warning") == len(case.expected)

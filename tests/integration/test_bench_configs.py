"""The configs the bench writes for HAProxy and nginx match its routes and pass the real binaries' own checks."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.bench import ROUTES, common


def test_haproxy_config_matches_routes_and_is_accepted_by_haproxy(tmp_path: Path) -> None:
    text = common.haproxy_config(ROUTES, maxconn=1000)
    assert "listen amqp\n    bind 127.0.0.1:15672\n    balance roundrobin\n" in text
    assert "    server b1 127.0.0.1:5001\n    server b2 127.0.0.1:5002\n" in text
    assert "mode tcp" in text
    assert "splice" not in text
    tuned = common.haproxy_config(ROUTES, tuned=True, maxconn=1000)
    assert "option splice-auto" in tuned
    assert f"maxpipes {common.TUNED_MAXPIPES}" in tuned
    threads = common.haproxy_config(ROUTES, maxconn=1000, nbthread=2)
    assert "    nbthread 2\n" in threads
    for i, cfg in enumerate((text, tuned, threads)):
        path = tmp_path / f"h{i}.cfg"
        path.write_text(cfg)
        check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def test_nginx_config_matches_routes_and_is_accepted_by_nginx(tmp_path: Path) -> None:
    text = common.nginx_config(ROUTES, workdir=tmp_path, nofile=4000)
    assert "upstream amqp {\n        server 127.0.0.1:5001;\n        server 127.0.0.1:5002;\n    }" in text
    assert "listen 127.0.0.1:15673 backlog=4096;" in text
    assert "worker_connections 3900;" in text
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    check = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

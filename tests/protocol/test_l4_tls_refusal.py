"""mode = "l4-nat" refuses TLS termination by name: with a real certificate and key, so that the file itself is valid
and only the mode forbids it (making certificates needs the openssl binary, hence this tier)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabbitproxy import config as config_mod
from rabbitproxy.config import ConfigError
from tests.support.tls import make_ca


def test_tls_termination_is_refused_by_name(tmp_path: Path) -> None:
    cert, key = make_ca(tmp_path / "pki", "l4").issue("server")
    service = {
        "name": "l4",
        "mode": "l4-nat",
        "listen": "10.0.0.1:5672",
        "tls": {"cert": str(cert), "key": str(key)},
        "backends": [{"name": "a", "address": "10.0.0.2"}],
    }
    with pytest.raises(ConfigError) as info:
        config_mod.validate({"services": [service]})
    assert any(
        e.startswith("services['l4']") and 'tls cannot apply with mode = "l4-nat"' in e for e in info.value.errors
    )

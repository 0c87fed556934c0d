"""``freebind``: a listener on an address this host does not own yet (the VIP on a keepalived standby)."""

from __future__ import annotations

import errno

import pytest

from rabbitproxy.config import ServiceConfig
from rabbitproxy.relay.listeners import bind_listener
from tests.support.net import free_port

# TEST-NET-1 (RFC 5737): never assigned to this machine, and nothing is ever sent to it here; we only bind.
NOT_OURS = "192.0.2.77"


def _service(freebind: bool) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "name": "amqp",
            "listen": f"{NOT_OURS}:{free_port()}",
            "freebind": freebind,
            "backends": [{"name": "b", "address": "127.0.0.1"}],
        }
    )


def test_a_foreign_address_is_refused_without_freebind() -> None:
    with pytest.raises(OSError) as info:
        bind_listener(_service(freebind=False)).close()
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_freebind_listens_on_an_address_not_yet_ours() -> None:
    sock = bind_listener(_service(freebind=True))
    try:
        assert sock.getsockname()[0] == NOT_OURS
    finally:
        sock.close()

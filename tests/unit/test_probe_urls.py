"""The probe's short cuts past urllib.parse and json give the answers those modules give (issue 19).

``admin_url`` turns a plain ``host:port`` into the URL without urlsplit, ``check`` splits a plain ``http://`` URL
without it, and ``_status_of`` recognises our admin API's healthy body without json. Each is compared here with
the general path it skips.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbitproxy.addresses import format_host_port, split_host_port
from rabbitproxy.admin import probe


def general_url(raw: str) -> str:
    """What ``admin_url`` answered for a bare address before it had a short cut: everything through urlsplit."""
    host, port = split_host_port(raw.strip())
    return probe._healthz_url(f"http://{format_host_port(probe._WILDCARDS.get(host, host), port)}")


@pytest.mark.parametrize(
    "raw",
    [
        "127.0.0.1:9080",
        "0.0.0.0:9080",
        "  localhost:1  ",
        "Proxy-1.Example.COM:65535",
        "host:09080",
        "[::]:9080",
        "[::1]:9080",
        "[fe80::1%eth0]:9080",
        "a_b:80",
        "a/b:80",
        "a?b:80",
        "user@host:80",
        "h\u00e9:80",
        "h:\u0663",
    ],
)
def test_bare_addresses_give_the_url_urlsplit_gives(raw: str) -> None:
    try:
        want: str | type[ValueError] = general_url(raw)
    except ValueError:
        want = ValueError
    if want is ValueError:
        with pytest.raises(ValueError):
            probe.admin_url(raw, {})
    else:
        assert probe.admin_url(raw, {}) == want


HOSTS = st.text(string.ascii_letters + string.digits + ".-_:[]%@/?#é ", min_size=1, max_size=12)


@given(HOSTS, st.integers(1, 65535))
def test_any_bare_address_gives_the_url_urlsplit_gives(host: str, port: int) -> None:
    raw = f"{host}:{port}"
    try:
        want = general_url(raw)
    except ValueError:
        with pytest.raises(ValueError):
            probe.admin_url(raw, {})
        return
    assert probe.admin_url(raw, {}) == want


@given(
    st.sampled_from(["http://", "https://", "HTTP://"]),
    st.text(string.ascii_letters + string.digits + ".-:[]@", min_size=1, max_size=12),
    st.text(string.ascii_letters + string.digits + "/?#% .~é\t", max_size=12),
)
def test_plain_urls_split_as_urlsplit_splits_them(scheme: str, netloc: str, path: str) -> None:
    url = f"{scheme}{netloc}/{path}"
    plain = probe._plain_target(url)
    if plain is not None:
        assert plain == probe._split_target(url)


def test_the_usual_url_takes_the_short_cut() -> None:
    assert probe._plain_target("http://127.0.0.1:9080/healthz") == ("http", "127.0.0.1", 9080, "/healthz")
    assert probe._plain_target("https://127.0.0.1:9080/healthz") is None


@pytest.mark.parametrize(
    "body",
    [b'{"status": "ok"}', b'{"status":"ok"}', b' {"status": "ok"} ', b'{"status": "starting"}', b"ok", b"", b"[]"],
)
def test_status_matches_json(body: bytes) -> None:
    try:
        data = json.loads(body)
    except ValueError:
        want = None
    else:
        want = data.get("status") if isinstance(data, dict) else None
    assert probe._status_of(body) == want

"""Addresses as operators write them: ``host:port`` parsing and the defaults both ``serve`` and the probe use.

Standard library only, and nothing heavy even from there: ``rabbitproxy healthcheck`` imports this module on a
path that must stay cheap (see :mod:`rabbitproxy.admin.probe`), and ``rabbitproxy.config`` builds on it, so the
probe and the proxy read an address the same way from one copy of the code.
"""

from __future__ import annotations

DEFAULT_PORT = 5672
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9080"
# The container image's CMD always names this file, so one image serves both a mounted config and plain env vars.
# A string rather than a Path: pathlib is not free to import, and the probe only needs to test that it exists.
DEFAULT_CONFIG_FILE = "/etc/rabbitproxy/rabbitproxy.toml"
# The one wording of a bad port, whether it is a ``port`` key or the end of a ``host:port``.
PORT_RULE = "port must be a number from 1 to 65535"


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port``, a bare host or a bracketed IPv6 address (``[::1]``).

    A missing port takes ``default_port``; with none given, the port is required. An IPv6 address must be in
    brackets: ``fd00::1:5672`` could be an address with a port or an address alone.
    """
    value = value.strip()
    if not value:
        raise ValueError("empty address")
    host: str
    port_text: str | None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"{value!r}: missing ']' after an IPv6 address")
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    elif value.count(":") > 1:
        raise ValueError(f"{value!r}: put IPv6 addresses in brackets, {_bracketed(value, default_port)}")
    elif ":" in value:
        host, port_text = value.rsplit(":", 1)
    else:
        host, port_text = value, None
    if not host:
        raise ValueError(f"{value!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{value!r}: missing ':port'")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: {PORT_RULE}")
    return host, int(port_text)


def _bracketed(value: str, default_port: int | None) -> str:
    """How ``value`` (an IPv6 address without brackets) is written: ``[::]:5674`` for ``:::5674``."""
    # An import here, not at the top: the probe reads addresses on every run and never takes this path.
    import ipaddress

    for host, port in ((value, None), tuple(value.rsplit(":", 1))):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            continue
        if port is not None and port.isdigit():
            return f'e.g. "[{host}]:{port}"'
        if port is None and default_port is not None:
            return f'e.g. "[{host}]" or "[{host}]:{default_port}"'
        if port is None:
            return f'e.g. "[{host}]:PORT"'
    return 'e.g. "[::1]:5672"'


def format_host_port(host: str, port: int) -> str:
    """Inverse of :func:`split_host_port`: brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""SSL contexts built from the frozen configuration: phase two of the config, like the listening sockets.

A terminating service listens with a :class:`ServerTLS`, built anew on every reload. OpenSSL keeps a server's
session cache and ticket keys in the context the listener was created with, and a resumed session skips the client
certificate check. So a reload never patches a context in place: the supervisor starts a new listener (on a
duplicate of the same listening socket, so the port never closes) with the fresh context, whose cache is empty. A
session from before the reload therefore cannot be resumed under settings that would refuse its certificate, a
renewed certificate takes effect at once, and the TLS connections already open keep what they were set up with.

Everything here raises :class:`~rabbitproxy.config.ConfigError` naming the key when a file cannot be used, so a
bad certificate at reload leaves the running one in place.
"""

from __future__ import annotations

import ssl
from typing import Final

from rabbitproxy.config import ConfigError, ServiceConfig, TLSConfig

_VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY: Final = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _where(service: str, key: str) -> str:
    return f"services[{service!r}].{key}"


def server_context(tls: TLSConfig, service: str = "") -> ssl.SSLContext:
    """A server-side context for ``tls``; ConfigError names the key whose file is unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    # No stateless tickets: their keys would outlive the context. What remains is the server-side session cache
    # of this very context (TLS 1.2 session IDs, TLS 1.3 stateful tickets), which ends with it at the next reload.
    ctx.options |= ssl.OP_NO_TICKET
    if tls.verify_client != "none":
        # A resumed session is not checked against the CA again. With client verification on, TLS 1.3 issues no
        # tickets at all, so every TLS 1.3 client proves its certificate in full on every connection. (Python
        # offers no way to switch the TLS 1.2 session cache off; a reload's fresh context empties it.)
        ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"{_where(service, 'tls.cert')}: cannot load the certificate and key ({tls.cert}, {tls.key}): {exc}"]
        ) from None
    if tls.ca:
        try:
            ctx.load_verify_locations(cafile=tls.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"{_where(service, 'tls.ca')}: cannot load {tls.ca}: {exc}"]) from None
    ctx.verify_mode = _VERIFY[tls.verify_client]
    return ctx


class ServerTLS:
    """The context of one listener; a reload builds a new one (and a new listener) instead of changing it."""

    __slots__ = ("listener",)

    def __init__(self, tls: TLSConfig, service: str = "") -> None:
        self.listener = server_context(tls, service)


class ServiceTLS:
    """All SSL contexts of one service: the terminating side (or None) and the one towards the backends."""

    __slots__ = ("backend", "server")

    def __init__(self, config: ServiceConfig) -> None:
        self.server = ServerTLS(config.tls, config.name) if config.tls is not None else None
        self.backend = backend_context(config)


def backend_context(config: ServiceConfig) -> ssl.SSLContext | None:
    """The client-side context for connections to the backends, or None without ``backend_tls``."""
    if not config.backend_tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=config.backend_tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"{_where(config.name, 'backend_tls_ca')}: cannot load {config.backend_tls_ca}: {exc}"]
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not config.backend_tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def backend_server_name(config: ServiceConfig, address: str) -> str:
    """The name checked against a backend's certificate: the configured one, else the backend's address."""
    return config.backend_tls_server_name or address


# Short names of the subject attributes a client certificate usually carries, as RabbitMQ writes them.
_DN_SHORT: Final = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
}


def cert_subject(peercert: object) -> str | None:
    """The subject of a verified client certificate (``transport.get_extra_info("peercert")``) as ``CN=...,O=...``.

    What the EXTERNAL mechanism logs in as, when we terminate TLS. None without a certificate (or an unverified one,
    which Python does not decode).
    """
    if not isinstance(peercert, dict):
        return None
    parts: list[str] = []
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            parts.append(f"{_DN_SHORT.get(name, name)}={value}")
    return ",".join(parts)[:256] or None

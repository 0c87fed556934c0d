"""SSL contexts built from the frozen configuration: phase two of the config, like the listening sockets.

A terminating service listens with a :class:`ServerTLS`. Its listener context never changes for the life of the
listener; instead, a server-name callback hands every new handshake to the *current* context, which a reload
replaces. That is how a renewed certificate takes effect on SIGHUP without closing the listener, while the TLS
connections already open keep the certificate they were set up with.

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
    # No session tickets: a ticket would outlive a certificate rotation and a client-CA change.
    ctx.options |= ssl.OP_NO_TICKET
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
    """The listener's context plus the context new handshakes actually use; ``update`` swaps the latter."""

    __slots__ = ("current", "listener")

    def __init__(self, tls: TLSConfig, service: str = "") -> None:
        self.current = server_context(tls, service)
        # The listener's own context is complete too, so a handshake works even if the callback never ran.
        self.listener = server_context(tls, service)
        self.listener.sni_callback = self._pick

    def _pick(self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        # OpenSSL calls this for every ClientHello, with or without SNI; switching the context here is the
        # documented way to serve another certificate.
        ssl_obj.context = self.current
        return None

    def adopt(self, fresh: ServerTLS) -> None:
        """Serve new handshakes with ``fresh``'s context (reload); open connections are untouched."""
        current = fresh.current
        # OpenSSL copies the verify mode and protocol bounds into each connection from the listener's context, not
        # from the one the callback switches to, so those must be set on the listener as well.
        self.listener.verify_mode = current.verify_mode
        self.listener.minimum_version = current.minimum_version
        self.current = current


class ServiceTLS:
    """All SSL contexts of one service: the terminating side (or None) and the one towards the backends."""

    __slots__ = ("backend", "server")

    def __init__(self, config: ServiceConfig) -> None:
        self.server = ServerTLS(config.tls, config.name) if config.tls is not None else None
        self.backend = backend_context(config)

    def updated(self, fresh: ServiceTLS) -> ServiceTLS:
        """``fresh`` for a reload, keeping this listener context (and thus the listener) when both terminate TLS."""
        if self.server is not None and fresh.server is not None:
            self.server.adopt(fresh.server)
            fresh.server = self.server
        return fresh


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

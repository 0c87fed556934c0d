"""A converted service's listen address and listener settings, from its HAProxy ``bind`` lines.

rabbitproxy listens on one address per service, so the first bind (and its first address) is taken and the
others reported. ``transparent`` (binding an address the host does not own yet, a VIP) becomes ``freebind``;
``ssl crt FILE`` becomes ``[services.tls]`` with FILE as certificate and key (HAProxy's PEM holds both, and
Python's TLS reads the key from it). Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from rabbitproxy.migrate.haproxy import Directive, Section, split_address
from rabbitproxy.migrate.proxies import Proxy, Warn

_WILDCARD_HOSTS = {"": "0.0.0.0", "*": "0.0.0.0", "::": "::"}
# bind options that take a value (HAProxy 2.6); the others are flags.
_VALUED = frozenset(
    {"crt", "ca-file", "verify", "ciphers", "ciphersuites", "name", "interface", "maxconn", "process", "thread"}
    | {"id", "nice", "backlog", "mss", "tcp-ut", "user", "group", "mode", "uid", "gid", "alpn", "curves", "ecdhe"}
    | {"crl-file", "crt-list", "ssl-min-ver", "ssl-max-ver", "namespace", "level", "severity-output", "proto"}
    | {"npn", "ca-sign-file", "ca-sign-pass", "sigalgs", "client-sigalgs", "ca-verify-file", "label", "shards"}
    | {"ca-ignore-err", "crt-ignore-err"}
)
_VERIFY = {"none": "none", "optional": "optional", "required": "required"}


def listener(section: Section, proxy: Proxy, warn: Warn) -> dict[str, Any] | None:
    """``listen`` and, when the bind says so, ``freebind`` and ``tls``; None (after a warning) without a bind."""
    if not proxy.binds:
        warn(section.line, f"{section.kind} {section.name}: no bind line, skipped")
        return None
    first = proxy.binds[0]
    for extra in proxy.binds[1:]:
        warn(extra.line, f"{extra.text}: a service listens on one address; only {first.words[1]} is converted")
    addresses = first.words[1].split(",")
    if len(addresses) > 1:
        warn(first.line, f"{first.text}: a service listens on one address; only {addresses[0]} is converted")
    host, port = split_address(addresses[0])
    if not port.isdigit():
        warn(first.line, f"{first.text}: port {port or '(none)'} is not one port number, {section.name} skipped")
        return None
    host = _WILDCARD_HOSTS.get(host, host)
    out: dict[str, Any] = {"listen": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    options = _options(first)
    if "transparent" in options:
        out["freebind"] = True
    if "ssl" in options:
        tls = _tls(first, options, warn)
        if tls is not None:
            out["tls"] = tls
    for option, value in options.items():
        if option not in ("transparent", "v6only", "ssl", "crt", "ca-file", "verify"):
            shown = f"{option} {value}" if value else option
            warn(first.line, f"bind ... {shown}: {_note(option)}, left out")
    return out


def _options(bind: Directive) -> dict[str, str]:
    options: dict[str, str] = {}
    words = bind.words[2:]
    i = 0
    while i < len(words):
        if words[i] in _VALUED and i + 1 < len(words):
            options[words[i]] = words[i + 1]
            i += 2
        else:
            options[words[i]] = ""
            i += 1
    return options


def _tls(bind: Directive, options: dict[str, str], warn: Warn) -> dict[str, Any] | None:
    crt = options.get("crt")
    if not crt:
        warn(bind.line, f"{bind.text}: ssl without crt (crt-list?): set [services.tls] cert and key by hand")
        return None
    tls: dict[str, Any] = {"cert": crt, "key": crt}
    if options.get("ca-file"):
        tls["ca"] = options["ca-file"]
        tls["verify_client"] = _VERIFY.get(options.get("verify", "required"), "required")
    return tls


def _note(option: str) -> str:
    if option == "accept-proxy":
        return "set accept_proxy_protocol = true with proxy_protocol_from (the trusted load balancers)"
    if option == "v4v6":
        return "an IPv6 listener takes IPv6 only; IPv4 clients need a service on 0.0.0.0 as well"
    return "no rabbitproxy equivalent"

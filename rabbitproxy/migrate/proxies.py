"""The settings of one HAProxy proxy (``defaults``, ``listen``, ``frontend`` or ``backend``), directive by directive.

A proxy starts as a copy of the ``defaults`` section in force where it is declared, as in HAProxy, then takes its
own directives. Every directive is either kept here for :mod:`rabbitproxy.migrate.convert`, known to need nothing
in rabbitproxy (:data:`NOTHING_TO_CARRY`), or reported through ``warn``. Pure: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from rabbitproxy.migrate.haproxy import Directive, parse_time

Warn = Callable[[int, str], None]

# Directives whose effect rabbitproxy has without a setting: TCP keepalive is on for both legs, a failed connect is
# retried on another backend, every connection is logged when it ends, splicing and smart accept are HAProxy's own
# performance switches.
NOTHING_TO_CARRY = frozenset(
    {
        "mode tcp",
        "log global",
        "option tcplog",
        "option tcpka",
        "option clitcpka",
        "option srvtcpka",
        "option redispatch",
        "option log-health-checks",
        "option splice-auto",
        "option splice-request",
        "option splice-response",
        "option tcp-smart-accept",
        "option tcp-smart-connect",
        "option dontlognull",
    }
)
_TIMEOUT_NOTES = {
    "client": 'kept "auto": idle AMQP clients are timed by their negotiated heartbeat (client_idle_timeout)',
    "server": "no idle timeout towards the broker: RabbitMQ's heartbeats close a dead connection",
    "tunnel": "no idle timeout towards the broker: RabbitMQ's heartbeats close a dead connection",
}


@dataclass
class Proxy:
    """What the converter reads of one proxy; directives are kept with their line for messages."""

    mode: str = "tcp"
    binds: list[Directive] = field(default_factory=list)
    balance: Directive | None = None
    timeouts: dict[str, tuple[int, float]] = field(default_factory=dict)
    retries: int | None = None
    maxconn: int | None = None
    default_server: list[Directive] = field(default_factory=list)
    servers: list[Directive] = field(default_factory=list)
    httpchk: Directive | None = None
    default_backend: str = ""
    stats: Directive | None = None

    def inherit(self) -> Proxy:
        """A new proxy that starts from this one's settings (a ``defaults`` section), without its servers."""
        child = copy.deepcopy(self)
        child.binds, child.servers = [], []
        return child


def apply(proxy: Proxy, d: Directive, warn: Warn) -> None:
    """Take one directive into ``proxy``, or report it."""
    words, key = d.words, d.keyword
    if d.text in NOTHING_TO_CARRY:
        return
    if key == "mode" and len(words) == 2:
        proxy.mode = words[1]
    elif key == "bind":
        proxy.binds.append(d)
    elif key == "balance" and len(words) >= 2:
        proxy.balance = d
    elif key == "server" and len(words) >= 3:
        proxy.servers.append(d)
    elif key == "default-server":
        proxy.default_server.append(d)
    elif key == "timeout" and len(words) == 3:
        _timeout(proxy, d, warn)
    elif key in ("retries", "maxconn") and len(words) == 2 and words[1].isdigit():
        setattr(proxy, key, int(words[1]))
    elif key == "default_backend" and len(words) == 2:
        proxy.default_backend = words[1]
    elif key == "option" and words[1:2] == ("httpchk",):
        proxy.httpchk = d
    elif key == "stats" and words[1:2] != ("socket",):
        proxy.stats = d
    else:
        warn(d.line, f"{d.text}: {_why(d)}, left out")


def _timeout(proxy: Proxy, d: Directive, warn: Warn) -> None:
    kind, value = d.words[1], d.words[2]
    try:
        seconds = parse_time(value)
    except ValueError as exc:
        warn(d.line, f"{d.text}: {exc}, left out")
        return
    if kind in ("connect", "check", "client", "server", "tunnel"):
        proxy.timeouts[kind] = (d.line, seconds)
    else:
        warn(d.line, f"{d.text}: no rabbitproxy equivalent, left out")


def timeout_notes(proxy: Proxy, warn: Warn) -> None:
    """Say once per line what became of the client, server and tunnel timeouts."""
    for kind, note in _TIMEOUT_NOTES.items():
        if kind in proxy.timeouts:
            warn(proxy.timeouts[kind][0], f"timeout {kind}: {note}")


def _why(d: Directive) -> str:
    key = d.keyword
    if key in ("use_backend", "use-server", "acl"):
        return "rules that pick a backend by content are not supported: one backend list per service"
    if key in ("tcp-request", "tcp-response"):
        return "no content rules in rabbitproxy (PROXY headers: accept_proxy_protocol and proxy_protocol_from)"
    if key in ("stick-table", "stick", "persist", "hash-type"):
        return 'no stick tables; balance = "source-hash" keeps a client on one backend'
    if key in ("log", "option") and "log" in d.text:
        return "rabbitproxy logs every connection to stderr ([log] format, level)"
    if key in ("tcp-check", "http-check"):
        return "the health check is a TCP connect, an AMQP handshake or an HTTP GET (health_check.type)"
    return "no rabbitproxy equivalent"

"""A converted service's backends, health check and feedback agent, from its HAProxy servers.

HAProxy sets check timing, agent and PROXY protocol per server; rabbitproxy sets the check and the agent per
service (a backend may still have its own check port, agent port and PROXY protocol version). Where the servers
disagree, the first checked server's settings are taken and the difference is reported. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from rabbitproxy.migrate.haproxy import Directive, Section
from rabbitproxy.migrate.proxies import Proxy, Warn
from rabbitproxy.migrate.servers import ServerParams

Server = tuple[Directive, str, str, ServerParams]
# rabbitproxy's largest weight; HAProxy's weights go to 256 and default to 1, ours default to 100.
MAX_WEIGHT = 1000


def backend_settings(
    service: dict[str, Any], servers: list[Server], back: Proxy, section: Section, warn: Warn, notes: dict[str, str]
) -> None:
    """Fill ``service`` with its health check, feedback, service-wide server settings and backends."""
    params = [p for _, _, _, p in servers]
    service_proxy = _common(params, "send_proxy", servers, warn)
    if service_proxy not in (None, "off"):
        service["send_proxy_protocol"] = service_proxy
    slow = _common(params, "slowstart", servers, warn)
    if slow:
        service["slow_start"] = slow
    if all(p.ssl for p in params):
        service["backend_tls"] = True
        if all(p.verify == "none" for p in params):
            service["backend_tls_verify"] = False
    elif any(p.ssl for p in params):
        warn(servers[0][0].line, "ssl on some servers only: backend_tls is per service, left off")
    _health_check(service, servers, back, section, warn, notes)
    _feedback(service, servers, back, warn)
    factor = _weight_factor(params)
    same_agent_port = len({p.agent_port for p in params if p.agent_check}) == 1
    service["backends"] = [
        _backend(d, host, port, p, factor, service_proxy is None, same_agent_port) for d, host, port, p in servers
    ]


def _common(params: list[ServerParams], attr: str, servers: list[Server], warn: Warn) -> Any:
    """The value all servers share, or None after a warning when they differ."""
    values = {getattr(p, attr) for p in params}
    if len(values) == 1:
        return values.pop()
    if attr != "send_proxy":
        warn(servers[0][0].line, f"{attr} differs between servers: set per service in rabbitproxy, left out")
    return None


def _first_checked(servers: list[Server], flag: str, what: str, keys: tuple[str, ...], warn: Warn) -> ServerParams:
    checked = [(d, p) for d, _, _, p in servers if getattr(p, flag)]
    first = checked[0][1]
    for d, p in checked[1:]:
        if any(getattr(p, k) != getattr(first, k) for k in keys):
            shown = ", ".join(k.replace("_", "-") for k in keys)
            warn(d.line, f"{d.words[1]}: its {what} timing ({shown}) differs; rabbitproxy has one per service")
    for d, _, _, p in servers:
        if not getattr(p, flag):
            warn(d.line, f"{d.words[1]}: no {what} while others have one; rabbitproxy {what}s every backend")
    return first


def _health_check(
    service: dict[str, Any], servers: list[Server], back: Proxy, section: Section, warn: Warn, notes: dict[str, str]
) -> None:
    if not any(p.check for _, _, _, p in servers):
        service["health_check"] = {"type": "none"}
        notes["health_check.type"] = 'no server had "check"; "amqp" checks each node\'s AMQP listener'
        warn(section.line, f'{section.kind} {section.name}: no server has "check": health_check.type = "none"')
        return
    first = _first_checked(servers, "check", "check", ("inter", "fall", "rise"), warn)
    check: dict[str, Any] = {"type": "tcp"}
    notes["health_check.type"] = 'HAProxy\'s "check" is a TCP connect; "amqp" also reads the broker\'s greeting'
    if back.httpchk is not None:
        check = {"type": "http", "url": _check_url(back.httpchk, warn)}
        notes.pop("health_check.type")
    check.update(interval=first.inter, fall=first.fall, rise=first.rise)
    if "check" in back.timeouts:
        check["timeout"] = min(back.timeouts["check"][1], first.inter)
    shutdown = {p.shutdown_sessions for _, _, _, p in servers if p.check}
    check["on_marked_down"] = "close" if shutdown == {True} else "keep"
    if check["on_marked_down"] == "keep":
        notes["health_check.on_marked_down"] = "as HAProxy without on-marked-down shutdown-sessions"
    service["health_check"] = check


def _check_url(d: Directive, warn: Warn) -> str:
    # option httpchk [<method>] [<uri> [<version>]]
    args = d.words[2:]
    method, uri = ("GET", args[0]) if len(args) == 1 else (args[0], args[1]) if len(args) >= 2 else ("GET", "/")
    if method.upper() != "GET" or len(args) > 2:
        warn(d.line, f"{d.text}: the HTTP check is a GET of the URL, left as GET {uri}")
    return "http://{address}:{port}" + (uri if uri.startswith("/") else "/" + uri)


def _feedback(service: dict[str, Any], servers: list[Server], back: Proxy, warn: Warn) -> None:
    agents = [(d, p) for d, _, _, p in servers if p.agent_check]
    if not agents:
        return
    first = _first_checked(servers, "agent_check", "agent check", ("agent_inter",), warn)
    feedback: dict[str, Any] = {"type": "agent", "interval": first.agent_inter}
    ports = {p.agent_port for _, p in agents}
    if len(ports) == 1 and first.agent_port is not None:
        feedback["port"] = first.agent_port
    for d, p in agents:
        if p.agent_port is None:
            warn(d.line, f"{d.words[1]}: agent-check without agent-port; the agent is asked on port 3333")
    if "check" in back.timeouts:
        feedback["timeout"] = min(back.timeouts["check"][1], first.agent_inter)
    service["feedback"] = feedback


def _weight_factor(params: list[ServerParams]) -> int:
    """What HAProxy weights are multiplied by: 100 while they are small (HAProxy's default 1 is our 100), else 1
    (HAProxy's largest, 256, is within ours); the ratios between servers are what matters, and stay."""
    largest = max((p.weight for p in params), default=1)
    return 100 if largest <= MAX_WEIGHT // 100 else 1


def _backend(
    d: Directive, host: str, port: str, p: ServerParams, factor: int, own_proxy: bool, same_agent_port: bool
) -> dict[str, Any]:
    backend: dict[str, Any] = {"name": d.words[1], "address": host}
    if port:
        backend["port"] = int(port)
    if p.weight * factor != 100:
        backend["weight"] = min(p.weight * factor, MAX_WEIGHT)
    if p.backup:
        backend["backup"] = True
    if p.check and p.check_port is not None:
        backend["check_port"] = p.check_port
    if p.agent_check and p.agent_port is not None and not same_agent_port:
        backend["agent_port"] = p.agent_port
    if p.maxconn:
        backend["max_connections"] = p.maxconn
    if own_proxy and p.send_proxy != "off":
        backend["send_proxy_protocol"] = p.send_proxy
    return backend

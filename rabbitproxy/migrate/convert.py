"""``rabbitproxy convert-haproxy``: an HAProxy configuration's TCP proxies as a rabbitproxy configuration.

Each ``listen`` section in TCP mode, and each ``frontend`` with the ``backend`` its ``default_backend`` names,
becomes one ``[[services]]`` entry: the first bind address, the balance algorithm, the servers with their address,
port, weight, backup flag, check and agent settings, PROXY protocol, connection limits and the timeouts. Every
directive that does not carry over, HTTP-mode and stats sections included, is reported as ``file:line: ...`` so
that nothing is dropped silently. Pure: text in, text and warnings out; the CLI reads the file and validates the
result (docs/migrating.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rabbitproxy.migrate.backends import backend_settings
from rabbitproxy.migrate.binds import listener
from rabbitproxy.migrate.haproxy import Directive, Section, parse_time, read_sections, split_address
from rabbitproxy.migrate.output import render
from rabbitproxy.migrate.proxies import Proxy, Warn, apply, timeout_notes
from rabbitproxy.migrate.servers import ServerParams, read_params

_BALANCE = {
    "roundrobin": "weighted-round-robin",
    "static-rr": "weighted-round-robin",
    "leastconn": "least-connections",
    "source": "source-hash",
}


@dataclass
class Conversion:
    """The TOML text (empty when no service could be converted) and the warnings, each ``file:line: message``."""

    toml: str
    warnings: list[str]
    services: int


@dataclass
class _Globals:
    workers: int | None = None
    hard_stop_after: float | None = None


@dataclass
class _State:
    source: str
    warnings: list[str] = field(default_factory=list)
    seen: set[tuple[int, str]] = field(default_factory=set)
    notes: dict[int, dict[str, str]] = field(default_factory=dict)

    def warn(self, line: int, message: str) -> None:
        # A defaults section's directive is met again by every proxy that inherits it: one warning per line.
        if (line, message) not in self.seen:
            self.seen.add((line, message))
            self.warnings.append(f"{self.source}:{line}: {message}")


def convert(text: str, source: str) -> Conversion:
    """Convert an HAProxy configuration file's text; ``source`` names it in messages and the header."""
    state = _State(source)
    sections, problems = read_sections(text)
    for line, message in problems:
        state.warn(line, message)
    globals_ = _Globals()
    defaults = Proxy()
    proxies: list[tuple[Section, Proxy]] = []
    backends: dict[str, tuple[Section, Proxy]] = {}
    for section in sections:
        if section.kind == "global":
            _read_global(section, globals_, state.warn)
        elif section.kind == "defaults":
            # As in HAProxy, each defaults section starts afresh and applies to the proxies after it.
            defaults = Proxy()
            for d in section.directives:
                apply(defaults, d, state.warn)
        elif section.kind in ("listen", "frontend", "backend"):
            proxy = defaults.inherit()
            if section.kind == "listen" and section.args:
                proxy.binds.append(Directive(section.line, ("bind", *section.args)))
            for d in section.directives:
                apply(proxy, d, state.warn)
            if section.kind == "backend":
                backends[section.name] = (section, proxy)
            else:
                proxies.append((section, proxy))
        else:
            state.warn(section.line, f"{section.kind} {section.name}: a section rabbitproxy does not use, skipped")
    services = _services(proxies, backends, globals_, state)
    top: dict[str, Any] = {"workers": globals_.workers} if globals_.workers else {}
    toml = render(source, top, services, state.notes) if services else ""
    return Conversion(toml, state.warnings, len(services))


def _read_global(section: Section, globals_: _Globals, warn: Warn) -> None:
    for d in section.directives:
        words = d.words
        if d.keyword == "nbthread" and len(words) == 2 and words[1].isdigit():
            globals_.workers = int(words[1])
            warn(d.line, f"{d.text}: written as workers = {words[1]} (processes sharing the listeners)")
        elif d.keyword == "hard-stop-after" and len(words) == 2:
            try:
                globals_.hard_stop_after = parse_time(words[1])
            except ValueError as exc:
                warn(d.line, f"{d.text}: {exc}, left out")
        elif d.keyword in ("daemon", "master-worker", "pidfile", "user", "group", "uid", "gid", "chroot"):
            warn(d.line, f"{d.text}: process management is systemd's or the container's job, left out")
        elif d.keyword == "maxconn":
            warn(d.line, f"{d.text}: a process-wide limit; rabbitproxy limits each service (max_connections), left out")
        elif d.keyword == "log":
            warn(d.line, f"{d.text}: rabbitproxy logs to stderr ([log] format and level), left out")
        elif d.keyword == "stats":
            warn(d.line, f"{d.text}: the admin API ([admin] listen) replaces HAProxy's runtime API, left out")
        else:
            warn(d.line, f"{d.text}: no rabbitproxy equivalent in the global section, left out")


def _services(
    proxies: list[tuple[Section, Proxy]],
    backends: dict[str, tuple[Section, Proxy]],
    globals_: _Globals,
    state: _State,
) -> list[dict[str, Any]]:
    services: list[dict[str, Any]] = []
    used: set[str] = set()
    for section, front in proxies:
        if _skipped(section, front, state.warn):
            continue
        back, origin = front, f"listen {section.name} ({state.source}:{section.line})"
        if section.kind == "frontend":
            target = backends.get(front.default_backend)
            if target is None:
                why = (
                    f"default_backend {front.default_backend} is not defined"
                    if front.default_backend
                    else ("no default_backend")
                )
                state.warn(section.line, f"frontend {section.name}: {why}, skipped")
                continue
            used.add(front.default_backend)
            if _skipped(target[0], target[1], state.warn):
                continue
            back = target[1]
            origin = (
                f"frontend {section.name} ({state.source}:{section.line}) with backend {target[0].name} "
                f"({state.source}:{target[0].line})"
            )
        state.notes[len(services)] = {}
        service = _service(section, front, back, globals_, state, len(services))
        if service is not None:
            service["_origin"] = origin
            services.append(service)
    for name, (section, _) in backends.items():
        if name not in used:
            state.warn(section.line, f"backend {name}: no frontend names it in default_backend, skipped")
    return services


def _skipped(section: Section, proxy: Proxy, warn: Warn) -> bool:
    where = f"{section.kind} {section.name}"
    if proxy.stats is not None:
        warn(section.line, f"{where}: a stats page; rabbitproxy's admin API and overview page replace it, skipped")
        return True
    if proxy.mode != "tcp":
        warn(section.line, f"{where}: mode {proxy.mode}; only TCP-mode proxies are converted, skipped")
        return True
    return False


def _service(
    section: Section, front: Proxy, back: Proxy, globals_: _Globals, state: _State, index: int
) -> dict[str, Any] | None:
    service: dict[str, Any] = {"name": section.name}
    listen = listener(section, front, state.warn)
    if listen is None:
        return None
    service.update(listen)
    if back.balance is not None:
        service["balance"] = _balance(back.balance, state.warn)
    if "connect" in back.timeouts:
        service["connect_timeout"] = back.timeouts["connect"][1]
    if back.retries is not None:
        service["retries"] = back.retries
    if front.maxconn is not None:
        service["max_connections"] = front.maxconn
    if globals_.hard_stop_after is not None:
        service["shutdown_timeout"] = globals_.hard_stop_after
    timeout_notes(front, state.warn)
    timeout_notes(back, state.warn)
    servers = _servers(back, state.warn)
    if not servers:
        state.warn(section.line, f"{section.kind} {section.name}: no server that carries over, skipped")
        return None
    backend_settings(service, servers, back, section, state.warn, state.notes[index])
    return service


def _balance(d: Directive, warn: Warn) -> str:
    algorithm = d.words[1]
    if algorithm == "static-rr":
        warn(d.line, f"{d.text}: weighted round robin (weights may still change at runtime)")
    elif algorithm not in _BALANCE:
        warn(d.line, f"{d.text}: not available, weighted round robin instead")
    return _BALANCE.get(algorithm, "weighted-round-robin")


def _servers(proxy: Proxy, warn: Warn) -> list[tuple[Directive, str, str, ServerParams]]:
    """``(line, address, port text, params)`` of each server that can be a backend."""
    base = ServerParams()
    for d in proxy.default_server:
        base = read_params(d.words[1:], d.line, base, warn)
    found = []
    for d in proxy.servers:
        host, port = split_address(d.words[2])
        if host.startswith(("unix@", "abns@", "/", "sockpair@")) or not host:
            warn(d.line, f"{d.text}: only TCP servers carry over, left out")
            continue
        if port and not port.isdigit():
            warn(d.line, f"{d.text}: port {port} is not one port number, left out")
            continue
        found.append((d, host, port, read_params(d.words[3:], d.line, base, warn)))
    return found

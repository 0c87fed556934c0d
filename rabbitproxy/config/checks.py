"""What the models alone cannot judge: rules across list entries, the admin token, and warnings.

pydantic reports a field's own errors (and rules between fields of one table, written as field validators that
read the fields before them), but a table whose fields have errors never reaches a model-wide check, so rules that
span the entries of a list would come in a second round. They run here on the parsed file instead, always, so one
run of ``check-config`` names every error. Warnings are for settings that are valid but cannot work as written:
the proxy starts (``check-config`` exits 0) and says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any

from rabbitproxy.addresses import DEFAULT_PORT, split_host_port
from rabbitproxy.config.errors import loc_path
from rabbitproxy.config.sections import AdminConfig
from rabbitproxy.config.service import Config, ServiceConfig

TOKEN_ENV = "RABBITPROXY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
READ_TOKEN_ENV = "RABBITPROXY_ADMIN_READ_TOKEN"  # noqa: S105 - the variable's name, not a secret


def _entries(data: Any, key: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    items = data.get(key) if isinstance(data, Mapping) else None
    if isinstance(items, list):
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                yield i, item


def cross_errors(data: Mapping[str, Any]) -> list[str]:
    """Unique service names, listen addresses and backend names; no PROXY header under backend TLS."""
    errors: list[str] = []
    names: dict[str, int] = {}
    listens: dict[tuple[str, int], str] = {}
    for i, svc in _entries(data, "services"):
        name = svc.get("name")
        if isinstance(name, str):
            if name in names:
                errors.append(f"{loc_path(data, ('services', i, 'name'))}: service name {name!r} is used twice")
            names.setdefault(name, i)
        listen = svc.get("listen", f"0.0.0.0:{DEFAULT_PORT}")
        try:
            key = split_host_port(listen, DEFAULT_PORT) if isinstance(listen, str) else None
        except ValueError:
            key = None  # reported by the model
        if key is not None and isinstance(name, str):
            if key in listens:
                errors.append(
                    f"{loc_path(data, ('services', i, 'listen'))}: services {listens[key]!r} and {name!r} both listen"
                    f" on {listen}"
                )
            listens.setdefault(key, name)
        errors.extend(_backend_errors(data, i, svc))
    errors.extend(_node_port_errors(data, listens))
    return errors


def _node_port_errors(data: Mapping[str, Any], listens: dict[tuple[str, int], str]) -> list[str]:
    """protocol = "stream": each backend's node_port is a listener of its own, on the service's listen host."""
    errors: list[str] = []
    for i, svc in _entries(data, "services"):
        listen = svc.get("listen", f"0.0.0.0:{DEFAULT_PORT}")
        try:
            host, own = split_host_port(listen, DEFAULT_PORT) if isinstance(listen, str) else ("", 0)
        except ValueError:
            continue  # reported by the model
        for j, backend in _entries(svc, "backends"):
            port = backend.get("node_port")
            if not isinstance(port, int) or isinstance(port, bool):
                continue  # absent, or reported by the model
            where = loc_path(data, ("services", i, "backends", j, "node_port"))
            if svc.get("protocol", "amqp") != "stream":
                errors.append(f'{where}: needs protocol = "stream"')
            elif port == own:
                errors.append(f"{where}: {port} is the service's own listen port")
            elif (host, port) in listens:
                errors.append(f"{where}: {port} is already the port of {listens[(host, port)]!r}")
            else:
                listens[(host, port)] = f"{svc.get('name')}/{backend.get('name')}"
    return errors


def _backend_errors(data: Mapping[str, Any], i: int, svc: Mapping[str, Any]) -> list[str]:
    errors: list[str] = []
    seen: set[str] = set()
    for j, backend in _entries(svc, "backends"):
        name = backend.get("name")
        if isinstance(name, str):
            if name in seen:
                errors.append(f"{loc_path(data, ('services', i, 'backends', j, 'name'))}: {name!r} is used twice")
            seen.add(name)
        if svc.get("backend_tls") is True and backend.get("send_proxy_protocol") in ("v1", "v2"):
            # The header would have to go out in clear before the TLS handshake; not supported (yet).
            where = loc_path(data, ("services", i, "backends", j, "send_proxy_protocol"))
            errors.append(f"{where}: cannot be combined with backend_tls")
    return errors


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; any other name may resolve to a public address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token_error(cfg: AdminConfig, env: Mapping[str, str]) -> str | None:
    """Why the admin tokens in force (config first, then the environment) cannot serve; None when they can.

    The API must not listen beyond loopback with no token at all, and the readers' token must not be the operator's.
    """
    if not cfg.enabled:
        return None
    token = cfg.token or env.get(TOKEN_ENV) or None
    read = cfg.read_token or env.get(READ_TOKEN_ENV) or None
    if token is not None and token == read:
        return "admin.read_token: must differ from the operator's token, or a reader could do everything"
    if token is not None or read is not None or is_loopback(split_host_port(cfg.listen)[0]):
        return None
    return (
        f"admin.token: required because admin.listen ({cfg.listen}) is not a loopback address; "
        f"set [admin] token or {TOKEN_ENV} (or only read_token, and make changes through admin.socket)"
    )


def warnings(cfg: Config) -> list[str]:
    """``"key.path: why"`` for each setting that is valid but cannot work as written."""
    out: list[str] = []
    admin_unused = cfg.admin.model_fields_set - {"enabled"}
    if not cfg.admin.enabled and admin_unused:
        out.append(f"admin: enabled = false, so {_keys(admin_unused)} take no effect")
    for svc in cfg.services:
        out.extend(_service_warnings(svc))
    return out


def _keys(keys: set[str]) -> str:
    return ", ".join(sorted(keys))


def _service_warnings(svc: ServiceConfig) -> list[str]:
    where = f"services[{svc.name!r}]"
    out: list[str] = []
    checks: list[tuple[str, Any, bool]] = [
        ("health_check", svc.health_check, svc.health_check.type != "none"),
        ("feedback", svc.feedback, svc.feedback.type != "none"),
    ]
    if svc.rabbitmq is not None:
        checks.append(("rabbitmq", svc.rabbitmq, True))
    for key, table, active in checks:
        unused = table.model_fields_set - {"type"}
        if not active and unused:
            out.append(f'{where}.{key}: type = "none", so {_keys(unused)} take no effect')
        elif active and table.timeout > table.interval:
            out.append(
                f"{where}.{key}.timeout: {table.timeout:g} s is longer than interval ({table.interval:g} s): a"
                " check that hangs holds up the next one, so checks run less often than the interval says"
            )
    if svc.health_check.type != "http" and "url" in svc.health_check.model_fields_set:
        out.append(f'{where}.health_check.url: only used with type = "http"')
    unused = svc.rebalance.model_fields_set - {"enabled"}
    if not svc.rebalance.enabled and unused:
        out.append(f"{where}.rebalance: enabled = false, so {_keys(unused)} take no effect")
    if not svc.backend_tls and "backend_tls_verify" in svc.model_fields_set:
        out.append(f"{where}.backend_tls_verify: only used with backend_tls = true")
    if not svc.accept_proxy_protocol and svc.proxy_protocol_from:
        out.append(f"{where}.proxy_protocol_from: only used with accept_proxy_protocol = true")
    if svc.tls is not None and svc.tls.ca and svc.tls.verify_client == "none":
        out.append(f'{where}.tls.ca: verify_client = "none", so no client certificate is asked for')
    if svc.rabbitmq is None:
        out.extend(
            f"{where}.backends[{b.name!r}].management_port: only used with [services.rabbitmq]"
            for b in svc.backends
            if b.management_port is not None
        )
    if all(b.backup for b in svc.backends):
        out.append(f"{where}.backends: every backend is a backup: with no primary to prefer, all serve all the time")
    if all(b.weight == 0 for b in svc.backends):
        out.append(f"{where}.backends: every backend has weight 0, so no new connection can be placed")
    return out

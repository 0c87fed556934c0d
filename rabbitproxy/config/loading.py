"""Reading a configuration: TOML files, validation with key-path errors, the environment, command-line overrides."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rabbitproxy.addresses import DEFAULT_PORT, split_host_port
from rabbitproxy.config.base import ConfigError
from rabbitproxy.config.sections import AdminConfig
from rabbitproxy.config.service import Config


def _loc(config: Mapping[str, Any], loc: Iterable[int | str]) -> str:
    """Render a pydantic error location with service and backend names instead of bare list indexes."""
    parts: list[str] = []
    node: Any = config
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], Mapping):
                name = node[item].get("name")
            parts[-1] += f"[{name!r}]" if isinstance(name, str) else f"[{item}]"
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        else:
            parts.append(item)
            node = node.get(item) if isinstance(node, Mapping) else None
    return ".".join(parts) or "(top level)"


def _errors(exc: ValidationError, data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    """One ``"key.path: reason"`` line per pydantic error; ``prefix`` places a sub-model's errors in the file."""
    errors: list[str] = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        loc = _loc(data, (*prefix, *err["loc"]))
        # A check that finds several problems at once (mode = "l4-nat"'s refusals) says one per line.
        errors.extend(f"{loc}: {line}" for line in msg.split("\n"))
    return errors


def validate(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate a parsed mapping; raise :class:`ConfigError` naming every bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_errors(exc, data), source) from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and parse a TOML file, unvalidated; raise :class:`ConfigError` if it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], str(p)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax: {exc}"], str(p)) from None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML configuration file."""
    return validate(read_toml(path), str(Path(path)))


def load_admin(path: str | os.PathLike[str]) -> AdminConfig:
    """Read a configuration file's ``[admin]`` table, validated exactly as :func:`load` validates it.

    ``rabbitproxy healthcheck`` comes here when its own stdlib reading finds anything unusual in that table, so
    its error messages (and any coercion, such as ``enabled = "false"``) are the ones ``serve`` would give.
    The rest of the file is not checked: the probe asks the running proxy, ``check-config`` judges the file.
    """
    data = read_toml(path)
    try:
        return AdminConfig.model_validate(data.get("admin", {}))
    except ValidationError as exc:
        raise ConfigError(_errors(exc, data, ("admin",)), str(Path(path))) from None


def parse_backend_spec(spec: str, index: int) -> dict[str, Any]:
    """Parse a command-line backend: ``host``, ``host:port``, ``[v6]:port``, each optionally ``=weight``."""
    address, sep, weight = spec.partition("=")
    host, port = split_host_port(address, default_port=0)
    out: dict[str, Any] = {"name": f"backend{index + 1}", "address": host}
    if port:
        out["port"] = port
    if sep:
        if not weight.strip().isdigit():
            raise ValueError(f"{spec!r}: weight after '=' must be a whole number")
        out["weight"] = int(weight)
    return out


def from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """Build a one-service config mapping from ``RABBITPROXY_BACKENDS`` (and friends), or None if unset.

    This is what a container without a config file runs on: ``RABBITPROXY_BACKENDS="rabbit1:5672,rabbit2:5672"``,
    optional ``RABBITPROXY_LISTEN``, ``RABBITPROXY_ADMIN_LISTEN`` and ``RABBITPROXY_HEALTH_CHECK``.
    """
    backends = env.get("RABBITPROXY_BACKENDS", "").strip()
    if not backends:
        return None
    specs = [s.strip() for s in backends.split(",") if s.strip()]
    service: dict[str, Any] = {
        "name": env.get("RABBITPROXY_SERVICE_NAME", "amqp"),
        "listen": env.get("RABBITPROXY_LISTEN", f"0.0.0.0:{DEFAULT_PORT}"),
        "backends": [parse_backend_spec(s, i) for i, s in enumerate(specs)],
    }
    if "RABBITPROXY_HEALTH_CHECK" in env:
        service["health_check"] = {"type": env["RABBITPROXY_HEALTH_CHECK"]}
    data: dict[str, Any] = {"services": [service]}
    if "RABBITPROXY_ADMIN_LISTEN" in env:
        data["admin"] = {"listen": env["RABBITPROXY_ADMIN_LISTEN"]}
    return data


def with_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key overrides applied (``"log.level": "debug"``).

    Only options the user actually passed reach here, so a flag never resets a file value to a default
    (hypercorn's ``__main__`` rule).
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if not leaf:
            out[section] = value
            continue
        sub = out.setdefault(section, {})
        sub[leaf] = value
    return out

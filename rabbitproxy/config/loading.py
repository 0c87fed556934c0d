"""Reading a configuration: TOML files, validation with key-path errors, the environment, command-line overrides."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rabbitproxy.addresses import DEFAULT_PORT, split_host_port
from rabbitproxy.config.base import ConfigError
from rabbitproxy.config.checks import admin_token_error, cross_errors
from rabbitproxy.config.errors import error_lines
from rabbitproxy.config.l4 import l4_errors
from rabbitproxy.config.sections import AdminConfig
from rabbitproxy.config.service import Config


def validate(data: Mapping[str, Any], source: str = "", env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed mapping; raise :class:`ConfigError` naming every bad key at once.

    ``serve``, a reload and ``check-config`` all come here (through :func:`load` or ``build_config``). ``env`` is
    where the admin token may come from (``RABBITPROXY_ADMIN_TOKEN``); the process's environment by default, as
    ``serve`` reads it.
    """
    errors: list[str] = []
    cfg: Config | None = None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        errors.extend(error_lines(exc, data))
    errors.extend(cross_errors(data))
    if cfg is not None:
        errors.extend(l4_errors(cfg))
    admin = cfg.admin if cfg is not None else _admin_alone(data)
    problem = admin_token_error(admin, os.environ if env is None else env) if admin is not None else None
    if problem is not None:
        errors.append(problem)
    if errors or cfg is None:
        raise ConfigError(errors, source)
    return cfg


def _admin_alone(data: Mapping[str, Any]) -> AdminConfig | None:
    """The ``[admin]`` table validated on its own, so its token rule is judged even when another table is wrong."""
    try:
        return AdminConfig.model_validate(data.get("admin", {}))
    except ValidationError:
        return None  # its errors are among the file's


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and parse a TOML file, unvalidated; raise :class:`ConfigError` if it cannot be read or parsed.

    A UTF-8 byte order mark, which some Windows editors write, is skipped. Bytes that are not UTF-8 are named by
    their offset and line, so the operator can find them.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], str(p)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}); TOML files are UTF-8"],
            str(p),
        ) from None
    # Universal newlines, as text-mode reading gave tomllib before.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax: {exc}"], str(p)) from None


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML configuration file."""
    return validate(read_toml(path), str(Path(path)), env)


def load_admin(path: str | os.PathLike[str]) -> AdminConfig:
    """Read a configuration file's ``[admin]`` table, validated exactly as :func:`load` validates it.

    ``rabbitproxy healthcheck`` comes here when its own stdlib reading finds anything unusual in that table, so
    its error messages are the ones ``serve`` would give. The rest of the file is not checked: the probe asks the
    running proxy, ``check-config`` judges the file.
    """
    data = read_toml(path)
    try:
        return AdminConfig.model_validate(data.get("admin", {}))
    except ValidationError as exc:
        raise ConfigError(error_lines(exc, data, ("admin",)), str(Path(path))) from None


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

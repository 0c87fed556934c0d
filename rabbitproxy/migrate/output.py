"""Writing the converted configuration as TOML: the same layout as the examples, comments where they help.

Just enough TOML for what the converter builds (strings, numbers, booleans, one level of tables and the
``[[services.backends]]`` array); the CLI reads the result back with ``tomllib`` and validates it before printing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Keys whose value is a table or an array of tables, written after the service's plain keys.
_TABLES = ("tls", "health_check", "feedback")


def scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string for everything we write (JSON's escapes are TOML's).
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _pairs(table: Mapping[str, Any], notes: Mapping[str, str]) -> list[str]:
    lines = []
    for key, value in table.items():
        note = notes.get(key)
        lines.append(f"{key} = {scalar(value)}" + (f"  # {note}" if note else ""))
    return lines


def render(
    source: str, top: Mapping[str, Any], services: list[dict[str, Any]], notes: Mapping[int, Mapping[str, str]]
) -> str:
    """The TOML text: a header, the top-level keys, then each service with its tables and backends.

    ``services[i]["_origin"]`` is a comment naming the HAProxy section; ``notes[i]`` maps ``key`` or
    ``table.key`` to a comment written after that key.
    """
    out = [
        f"# Converted from {source} by `rabbitproxy convert-haproxy`.",
        "# Read the warnings it printed, then check the result: rabbitproxy check-config --config THIS_FILE",
    ]
    if top:
        out += ["", *_pairs(top, {})]
    for index, service in enumerate(services):
        service_notes = notes.get(index, {})
        plain = {k: v for k, v in service.items() if k not in (*_TABLES, "backends", "_origin")}
        out += ["", f"# {service['_origin']}", "[[services]]", *_pairs(plain, service_notes)]
        for table in _TABLES:
            if table in service:
                prefixed = {k.partition(".")[2]: v for k, v in service_notes.items() if k.startswith(f"{table}.")}
                out += ["", f"[services.{table}]", *_pairs(service[table], prefixed)]
        for backend in service["backends"]:
            out += ["", "[[services.backends]]", *_pairs(backend, {})]
    return "\n".join(out) + "\n"
